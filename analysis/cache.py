"""Results cached per (checkpoint, analysis, parameters).

A unit of work is stored as one JSON file (plus optional sidecar files, e.g. parquet) under
`<root>/<checkpoint id>/<analysis>-<params hash>.json`, written atomically, so a rerun
computes only what is missing and a killed run loses at most the unit in progress.
The key includes a fingerprint of the checkpoint's weights file (size + mtime), so a
checkpoint replaced at the same path is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from train.errors import UserError

DEFAULT_ROOT = Path("reports/cache")


def params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def weights_fingerprint(model_dir: str | Path) -> str:
    """Cheap identity of an HF folder's weights (names, sizes, mtimes)."""
    parts = []
    for f in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def safe_id(ckpt_id: str) -> str:
    return ckpt_id.replace("/", "__").replace(os.sep, "__")


def json_safe(obj: Any) -> Any:
    """Strict-JSON form of an analysis result, recursively: NaN and infinities become None,
    numpy scalars and arrays become Python numbers and lists."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):   # numpy scalar or array
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ResultCache:
    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)

    def path(self, ckpt_id: str, analysis: str, params: dict[str, Any]) -> Path:
        folder = self.root / safe_id(ckpt_id)
        if safe_id(ckpt_id) in ("", ".", "..") or folder.resolve().parent != self.root.resolve():
            raise UserError(f"checkpoint id {ckpt_id!r} cannot name a folder of the result cache {self.root}")
        return folder / f"{analysis}-{params_hash(params)}.json"

    def sidecar(self, ckpt_id: str, analysis: str, params: dict[str, Any], suffix: str) -> Path:
        """A companion file of a cached result (e.g. generations as parquet)."""
        return self.path(ckpt_id, analysis, params).with_suffix(suffix)

    def get(self, ckpt_id: str, analysis: str, params: dict[str, Any]) -> Any | None:
        p = self.path(ckpt_id, analysis, params)
        if not p.exists():
            return None
        try:
            record = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):       # torn, not JSON, not UTF-8 (UnicodeDecodeError is a ValueError)
            return None
        if not isinstance(record, dict) or "result" not in record:
            return None                     # a foreign file counts as missing too
        return record["result"]

    def put(self, ckpt_id: str, analysis: str, params: dict[str, Any], result: Any) -> None:
        record = {"checkpoint": ckpt_id, "analysis": analysis, "params": params, "result": result}
        atomic_write_text(self.path(ckpt_id, analysis, params), json.dumps(record, default=float) + "\n")

    def get_or_compute(self, ckpt_id: str, analysis: str, params: dict[str, Any],
                       compute: Callable[[], Any]) -> Any:
        hit = self.get(ckpt_id, analysis, params)
        if hit is not None:
            return hit
        result = compute()
        self.put(ckpt_id, analysis, params, result)
        return result
