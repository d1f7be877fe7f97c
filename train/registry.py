"""`ckpts.yaml`: the single registry of checkpoints.

Training appends to it, analysis reads it, and a person may add external checkpoints by hand.
The file is YAML with a top-level `checkpoints:` list; comments and key order survive every
rewrite (ruamel round-trip). Writes are atomic (temp file + rename) under a lock file, so a
training run and a veRL watcher can register concurrently. Paths are stored relative to the
registry's folder when they lie inside it, so a clone can move.

    checkpoints:
      - id: kk-tiny/stage1/step-000010       # unique
        path: runs/kk-tiny/stage1/step-000010 # an HF folder
        run: kk-tiny
        stage: stage1                         # base | stage1 | stage2 | stage3 | external
        global_step: 10
        parent: kk-tiny/base
        ...

Only `id` and `path` are required for a hand-added entry; see `Checkpoint` for the rest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import fcntl
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from train.errors import UserError, validation_problem

DEFAULT_REGISTRY = "ckpts.yaml"
HEADER = """\
# Checkpoint registry. Training appends here; `python -m analysis` reads it.
# Add an external checkpoint by hand with at least `id` and `path` (an HF folder), e.g.
#   - id: my-model/step-100
#     path: /data/my-model/step-100
#     stage: external
"""


class RegistryError(UserError):
    pass


class Checkpoint(BaseModel):
    """One registered checkpoint (the contract of DESIGN.md section 4)."""

    model_config = ConfigDict(extra="allow")

    id: str
    path: str
    run: str = "external"
    stage: str = "external"
    global_step: int = 0
    parent: str | None = None
    segment: int | None = None
    segment_final: bool = False        # the last checkpoint of its segment
    stage_final: bool = False          # the last checkpoint of its stage
    sampling: dict[str, Any] = Field(default_factory=dict)   # temperature, top_p, top_k, rollout_n
    lr: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)    # training metrics at this step
    eval: dict[str, Any] = Field(default_factory=dict)       # evaluation summary, if any
    preset: str | None = None
    config_hash: str | None = None
    timestamp: str | None = None
    engine: str | None = None

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        # Ids become folder names of the result cache: no part may leave it.
        parts = v.replace("\\", "/").split("/")
        if not v.strip() or v.startswith(("/", "~")) or any(p in ("", ".", "..") for p in parts) or "\0" in v:
            raise ValueError(f"{v!r} is not a safe checkpoint id (no empty, '.' or '..' part, not absolute)")
        return v

    def resolved_path(self, registry_file: Path) -> Path:
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else (registry_file.parent / p)


def parse_seeds(spec: str) -> list[int]:
    """"0,1,2" or "0-4" -> seeds (non-negative), sorted, each once."""
    seeds: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        lo, dash, hi = part.partition("-")
        try:
            seeds |= set(range(int(lo), int(hi) + 1)) if dash else {int(part)}
        except ValueError:
            raise UserError(f"--seeds {spec!r}: use e.g. 0,1,2 or 0-4") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds {spec!r}: use non-negative seeds, e.g. 0,1,2 or 0-4")
    return sorted(seeds)


def seed_run(run: str, seed: int) -> str:
    """The run name of one seed of a multi-seed study (`python -m train.run --seeds`)."""
    return f"{run}-seed{seed}"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096
    return y


class Registry:
    """Read and append to a `ckpts.yaml` file."""

    def __init__(self, path: str | Path = DEFAULT_REGISTRY):
        self.path = Path(path)

    # ---------------------------------------------------------------- reading
    def _load_doc(self):
        from ruamel.yaml.comments import CommentedMap, CommentedSeq
        from ruamel.yaml.error import MarkedYAMLError, YAMLError

        self.check_path()
        if not self.path.exists():
            doc = _yaml().load(HEADER + "checkpoints: []\n")
            return doc
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RegistryError(f"{self.path}: not a text file (not UTF-8); a registry is YAML") from None
        except OSError as exc:
            raise RegistryError(f"{self.path}: cannot read it ({exc.strerror})") from None
        try:
            doc = _yaml().load(text)
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f":{mark.line + 1}" if mark is not None else ""
            raise RegistryError(f"{self.path}{line}: malformed YAML ({exc.problem or exc.context})") from None
        except YAMLError as exc:
            raise RegistryError(f"{self.path}: malformed YAML ({str(exc).splitlines()[0]})") from None
        if doc is None:
            doc = _yaml().load(HEADER + "checkpoints: []\n")
        if not isinstance(doc, CommentedMap) or "checkpoints" not in doc:
            raise RegistryError(f"{self.path}:1: expected a mapping with a 'checkpoints:' list")
        if doc["checkpoints"] is None:
            doc["checkpoints"] = CommentedSeq()
        if not isinstance(doc["checkpoints"], list):
            raise RegistryError(f"{self.path}: 'checkpoints' must be a list")
        return doc

    def _entries(self, doc) -> list[Checkpoint]:
        out, seen = [], {}
        seq = doc["checkpoints"]
        for i, item in enumerate(seq):
            line = self._line_of(seq, i)
            if not isinstance(item, dict):
                raise RegistryError(f"{self.path}:{line}: checkpoint entry must be a mapping")
            try:
                ck = Checkpoint.model_validate(_plain(item))
            except ValidationError as exc:
                where, msg = validation_problem(exc)
                raise RegistryError(f"{self.path}:{line}: checkpoint field '{where or 'entry'}': {msg}") from None
            if ck.id in seen:
                raise RegistryError(f"{self.path}:{line}: duplicate checkpoint id {ck.id!r} (first at line {seen[ck.id]})")
            seen[ck.id] = line
            out.append(ck)
        return out

    @staticmethod
    def _line_of(seq, i: int) -> int:
        try:
            return seq.lc.item(i)[0] + 1
        except Exception:
            return 0

    def checkpoints(self) -> list[Checkpoint]:
        return self._entries(self._load_doc())

    def get(self, ckpt_id: str) -> Checkpoint:
        for ck in self.checkpoints():
            if ck.id == ckpt_id:
                return ck
        raise RegistryError(f"{self.path}: no checkpoint with id {ckpt_id!r}")

    def resolve(self, ck: Checkpoint) -> Path:
        return ck.resolved_path(self.path)

    def select(self, run: str | None = None, stage: str | None = None, steps: tuple[int | None, int | None] = (None, None),
               every: int = 1, ids: list[str] | None = None) -> list[Checkpoint]:
        """Checkpoints filtered by run, stage (comma list), step range and every k-th, in step order."""
        cks = self.checkpoints()
        if ids:
            known = {c.id: c for c in cks}
            missing = [i for i in ids if i not in known]
            if missing:
                raise RegistryError(f"{self.path}: unknown checkpoint id(s): {', '.join(missing)}")
            return [known[i] for i in ids]
        if run is not None:
            cks = [c for c in cks if c.run == run]
        if stage is not None:
            stages = set(stage.split(","))
            cks = [c for c in cks if c.stage in stages]
        lo, hi = steps
        cks = [c for c in cks if (lo is None or c.global_step >= lo) and (hi is None or c.global_step <= hi)]
        cks.sort(key=lambda c: (c.run, c.global_step))
        if every > 1:
            cks = [c for i, c in enumerate(cks) if i % every == 0 or i == len(cks) - 1]
        if not cks:
            raise RegistryError(f"{self.path}: no checkpoint matches run={run} stage={stage} steps={lo}..{hi}")
        return cks

    def check_path(self) -> None:
        """One line when the registry path cannot be a registry file."""
        if self.path.is_dir():
            raise RegistryError(f"{self.path}: is a folder; a registry is a YAML file (e.g. {self.path / DEFAULT_REGISTRY})")
        parent = self.path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise RegistryError(f"{self.path}: {parent} is a file, not a folder")

    def check_writable(self) -> None:
        """One line, before any work, when this registry cannot be written: a read-only file,
        or a folder where its lock and temporary files cannot be made."""
        self.check_path()
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RegistryError(f"{self.path}: cannot be written ({folder} is not writable)")
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise RegistryError(f"{self.path}: is read-only; make it writable or choose another --registry")

    # ---------------------------------------------------------------- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.check_writable()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name("." + self.path.name + ".lock")
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _write(self, doc) -> None:
        buf = io.StringIO()
        _yaml().dump(doc, buf)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix="." + self.path.name, suffix=".tmp")
        try:
            mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o666 & ~_umask()
            os.chmod(tmp, mode)                # the rewrite keeps the file's mode
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(buf.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def relpath(self, path: str | Path) -> str:
        p = Path(path).resolve()
        try:
            return str(p.relative_to(self.path.parent.resolve()))
        except ValueError:
            return str(p)

    def add(self, ck: Checkpoint, replace: bool = False) -> Checkpoint:
        """Append a checkpoint (idempotent: an identical id is left alone unless `replace`)."""
        from ruamel.yaml.comments import CommentedMap

        with self._locked():
            doc = self._load_doc()
            existing = self._entries(doc)
            data = ck.model_dump(exclude_none=True)
            data["path"] = self.relpath(ck.path)
            data.setdefault("timestamp", now())
            for i, old in enumerate(existing):
                if old.id == ck.id:
                    if not replace:
                        return old
                    doc["checkpoints"][i] = CommentedMap(data)
                    break
            else:
                doc["checkpoints"].append(CommentedMap(data))
            self._write(doc)
        return Checkpoint.model_validate(data)

    def update(self, ckpt_id: str, **fields: Any) -> None:
        """Merge fields into an entry (dict fields are merged one level deep)."""
        with self._locked():
            doc = self._load_doc()
            self._entries(doc)
            for item in doc["checkpoints"]:
                if item.get("id") == ckpt_id:
                    for k, v in fields.items():
                        if isinstance(v, dict) and isinstance(item.get(k), dict):
                            item[k].update(v)
                        else:
                            item[k] = v
                    self._write(doc)
                    return
        raise RegistryError(f"{self.path}: no checkpoint with id {ckpt_id!r}")

    def remove(self, ckpt_ids: set[str]) -> int:
        with self._locked():
            doc = self._load_doc()
            seq = doc["checkpoints"]
            keep = [i for i, item in enumerate(seq) if item.get("id") not in ckpt_ids]
            removed = len(seq) - len(keep)
            for i in reversed(range(len(seq))):
                if i not in keep:
                    del seq[i]
            if removed:
                self._write(doc)
            return removed


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


# --------------------------------------------------------------------------- training records

def read_metrics(path: str | Path):
    """A run's `metrics.jsonl` as a frame, one row per global step, in step order."""
    import pandas as pd

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # A resumed step may be logged twice; the later record wins.
    return df.drop_duplicates("global_step", keep="last").sort_values("global_step")


def metrics_file(registry, run: str) -> Path:
    """`runs/<run>/metrics.jsonl` of a locally trained run, found through its registered checkpoints."""
    for ck in registry.checkpoints():
        if ck.run == run and ck.stage.startswith("stage"):
            path = registry.resolve(ck).parent.parent / "metrics.jsonl"
            if path.exists():
                return path
    raise UserError(f"{registry.path}: no metrics.jsonl found for run {run!r}")
