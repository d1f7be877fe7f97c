"""Parameter drift: how far, how widely and in how many directions the weights moved.

Weights only (no model, no generation). A checkpoint's safetensors are compared tensor by
tensor (two tensors in memory at a time) with two references from the registry:

* base:     follow `parent` links back to the run's entry of stage "base", else the first
            checkpoint of the run;
* previous: the checkpoint's `parent`.

Per parameter tensor, grouped per layer and per module (weight and bias together):

* changed fraction: share of entries with |W - W_ref| > atol + rtol * |W_ref| (defaults 0:
  any change; tensors stored in different dtypes are first rounded to the coarser one);
* relative update:  ||W - W_ref||_F / ||W_ref||_F;
* effective rank of the update (2-D weights): exp of the entropy of its normalised singular
  values (Roy & Vetterli), 1 for a rank-1 update, up to min(shape) for an isotropic one;
  means over modules count the updated matrices only.

The registry is the one the harness read when the context carries it (`ctx.registry`),
else the `registry` option, else the `ckpts.yaml` the checkpoint's relative path points
from, else `./ckpts.yaml`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from analysis.harness import Analysis, AnalysisContext, HarnessError, register_analysis
from train.errors import UserError
from train.registry import DEFAULT_REGISTRY, Checkpoint, Registry

NAME = "drift"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


class DriftError(HarnessError):
    pass


# --------------------------------------------------------------------------- registry lineage

def find_registry(ctx: AnalysisContext, explicit: str | Path | None = None) -> Registry | None:
    """The registry that lists `ctx.checkpoint` (see module doc for the search order)."""
    reg = getattr(ctx, "registry", None)
    candidates: list[Path] = []
    if isinstance(reg, Registry):
        candidates.append(reg.path)
    elif reg:
        candidates.append(Path(reg))
    if explicit:
        if not Path(explicit).is_file():
            raise DriftError(f"registry {explicit} does not exist")
        candidates.append(Path(explicit))
    raw = Path(ctx.checkpoint.path).expanduser()
    if not raw.is_absolute():
        root = Path(ctx.path)
        for _ in raw.parts:
            root = root.parent
        candidates.append(root / DEFAULT_REGISTRY)
    candidates.append(Path.cwd() / DEFAULT_REGISTRY)
    for path in candidates:
        if not path.is_file():
            continue
        registry = Registry(path)
        try:
            if any(c.id == ctx.checkpoint.id for c in registry.checkpoints()):
                return registry
        except UserError:
            continue
    return None


def lineage(registry: Registry, ck: Checkpoint) -> tuple[Checkpoint | None, Checkpoint | None]:
    """(base, parent) of a checkpoint; None where there is none (a base has no base)."""
    entries = registry.checkpoints()
    by_id = {c.id: c for c in entries}
    parent = by_id.get(ck.parent) if ck.parent else None
    if ck.stage == "base":
        return None, parent
    base, cur, seen = None, ck, {ck.id}
    while cur.parent and cur.parent in by_id and cur.parent not in seen:
        cur = by_id[cur.parent]
        seen.add(cur.id)
        if cur.stage == "base":
            base = cur
            break
    if base is None and ck.run != "external":  # hand-added checkpoints share no run
        run = [c for c in entries if c.run == ck.run]
        first = min(run, key=lambda c: c.global_step) if run else None
        base = first if first is not None and first.id != ck.id else None
    return base, parent


def references(ctx: AnalysisContext, registry_path: str | Path | None = None) -> dict[str, tuple[str, Path] | None]:
    """{"base": (id, folder) | None, "parent": ...} for the context's checkpoint; a run's
    base (or first) checkpoint is its own base."""
    registry = find_registry(ctx, registry_path)
    if registry is None:
        return {"base": None, "parent": None}
    base, parent = lineage(registry, ctx.checkpoint)
    if base is None and ctx.checkpoint.run != "external":  # a run's base is its own base: zero drift
        base = ctx.checkpoint
    return {"base": (base.id, registry.resolve(base)) if base else None,
            "parent": (parent.id, registry.resolve(parent)) if parent else None}


# --------------------------------------------------------------------------- weights

def safetensors_index(folder: str | Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file holding it."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DriftError(f"{folder}: no *.safetensors weights (drift reads safetensors only)")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                out[key] = f
    return out


def split_name(name: str) -> tuple[int | None, str, str]:
    """"model.layers.3.self_attn.q_proj.weight" -> (3, "self_attn.q_proj", "weight")."""
    stem, _, kind = name.rpartition(".")
    if not stem:
        stem, kind = name, ""
    m = _LAYER.search(stem)
    if m:
        return int(m.group(1)), m.group(2), kind
    return None, stem.removeprefix("model."), kind


def effective_rank(delta) -> float:
    """exp(entropy of normalised singular values) of a 2-D update (0 for a zero update);
    singular values from the Gram matrix of the smaller side, in float64."""
    import torch

    d = delta.double()
    if d.shape[0] < d.shape[1]:
        d = d.T
    gram = d.T @ d
    ev = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
    total = ev.sum()
    if total <= 0:
        return 0.0
    p = ev / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _coarser(a, b):
    import torch

    bits = {torch.float64: 53, torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}
    return a.dtype if bits.get(a.dtype, 24) <= bits.get(b.dtype, 24) else b.dtype


def tensor_drift(w, ref, *, atol: float = 0.0, rtol: float = 0.0, rank: bool = True) -> dict:
    """Changed entries, squared norms and (2-D, when `rank`) effective rank of w - ref."""
    import torch

    if w.dtype != ref.dtype and w.is_floating_point() and ref.is_floating_point():
        common = _coarser(w, ref)
        w, ref = w.to(common), ref.to(common)
    if not w.is_floating_point():
        w, ref = w.double(), ref.double()
    d = w.float() - ref.float()
    changed = int((d.abs() > atol + rtol * ref.float().abs()).sum())
    out = {"numel": int(d.numel()), "changed": changed,
           "delta_sq": float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2),
           "ref_sq": float(torch.linalg.vector_norm(ref.float(), dtype=torch.float64) ** 2),
           "shape": list(d.shape), "eff_rank": None}
    if rank and d.dim() == 2:
        out["eff_rank"] = effective_rank(d) if changed or out["delta_sq"] > 0 else 0.0
    return out


def _rel(delta_sq: float, ref_sq: float) -> float | None:
    return float(np.sqrt(delta_sq / ref_sq)) if ref_sq > 0 else (0.0 if delta_sq == 0 else None)


def _summary(rows: Iterable[dict]) -> dict:
    rows = list(rows)
    n = sum(r["numel"] for r in rows)
    c = sum(r["changed"] for r in rows)
    dsq = sum(r["delta_sq"] for r in rows)
    rsq = sum(r["ref_sq"] for r in rows)
    ranks = [r["eff_rank"] for r in rows if r.get("eff_rank") is not None and r["delta_sq"] > 0]
    return {"numel": n, "changed": c, "frac_changed": c / n if n else None,
            "rel_update": _rel(dsq, rsq), "delta_norm": float(np.sqrt(dsq)), "ref_norm": float(np.sqrt(rsq)),
            "eff_rank_mean": float(np.mean(ranks)) if ranks else None}


def weight_drift(path: str | Path, ref_path: str | Path, *, atol: float = 0.0, rtol: float = 0.0,
                 rank: bool = True) -> dict:
    """Drift of the weights in `path` against `ref_path` (HF folders with safetensors): per
    module (layer, module), per layer, per module type and in total."""
    from safetensors import safe_open

    if atol < 0 or rtol < 0:
        raise DriftError(f"tolerances must be >= 0, got atol={atol} rtol={rtol}")
    cur, ref = safetensors_index(path), safetensors_index(ref_path)
    common = [k for k in cur if k in ref]
    if not common:
        raise DriftError(f"{path} and {ref_path} share no parameter names")
    by_file: dict[tuple[Path, Path], list[str]] = {}
    for k in common:
        by_file.setdefault((cur[k], ref[k]), []).append(k)
    modules: dict[tuple[int | None, str], list[dict]] = {}
    for (fa, fb), keys in by_file.items():
        with safe_open(str(fa), framework="pt") as ha, safe_open(str(fb), framework="pt") as hb:
            for k in keys:
                w, r = ha.get_tensor(k), hb.get_tensor(k)
                if w.shape != r.shape:
                    raise DriftError(f"{k}: shape {tuple(w.shape)} in {path} but {tuple(r.shape)} in {ref_path}")
                layer, module, kind = split_name(k)
                row = tensor_drift(w, r, atol=atol, rtol=rtol, rank=rank and kind == "weight")
                row["name"], row["kind"] = k, kind
                modules.setdefault((layer, module), []).append(row)
                del w, r
    module_rows = []
    for (layer, module), rows in sorted(modules.items(), key=lambda kv: (-1 if kv[0][0] is None else kv[0][0], kv[0][1])):
        s = _summary(rows)
        weight = next((r for r in rows if r["kind"] == "weight"), rows[0])
        module_rows.append({"layer": layer, "module": module, "shape": weight["shape"],
                            "numel": s["numel"], "changed": s["changed"], "frac_changed": s["frac_changed"],
                            "rel_update": s["rel_update"], "eff_rank": weight.get("eff_rank")})
    all_rows = [r for rows in modules.values() for r in rows]
    layers = sorted({l for l, _ in modules if l is not None})
    per_layer = []
    for l in layers:
        s = _summary(r for (ll, _), rows in modules.items() if ll == l for r in rows)
        per_layer.append({"layer": l, "frac_changed": s["frac_changed"], "rel_update": s["rel_update"],
                          "eff_rank_mean": s["eff_rank_mean"]})
    by_type = {}
    for m in sorted({m for _, m in modules}):
        s = _summary(r for (_, mm), rows in modules.items() if mm == m for r in rows)
        by_type[m] = {"frac_changed": s["frac_changed"], "rel_update": s["rel_update"],
                      "eff_rank_mean": s["eff_rank_mean"]}
    return {"total": _summary(all_rows), "modules": module_rows, "layers": per_layer, "by_module": by_type,
            "missing": sorted(k for k in ref if k not in cur), "extra": sorted(k for k in cur if k not in ref)}


# --------------------------------------------------------------------------- plug-in

@register_analysis
class DriftAnalysis(Analysis):
    """Parameter drift against the run's base checkpoint and the previous checkpoint."""

    name = NAME
    title = "Parameter drift"
    order = 60
    version = 1
    uses_generations = False
    uses_model = False

    def __init__(self, atol: float = 0.0, rtol: float = 0.0, rank: bool = True, registry: str | None = None):
        self.atol, self.rtol, self.rank = float(atol), float(rtol), bool(rank)
        if self.atol < 0 or self.rtol < 0:
            raise DriftError(f"drift tolerances must be >= 0, got atol={atol} rtol={rtol}")
        self.registry = registry

    def params(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "rank": self.rank}

    def run(self, ctx: AnalysisContext) -> dict:
        refs = references(ctx, self.registry)
        out: dict[str, Any] = {"checkpoint": ctx.checkpoint.id, "atol": self.atol, "rtol": self.rtol,
                               "references": {}}
        done: dict[str, dict] = {}
        for label in ("base", "parent"):
            ref = refs[label]
            if ref is None:
                out["references"][label] = None
                continue
            ref_id, ref_path = ref
            if ref_id not in done:
                try:
                    if not Path(ref_path).is_dir():
                        raise DriftError(f"{label} checkpoint {ref_id} has no folder {ref_path}")
                    done[ref_id] = weight_drift(ctx.path, ref_path, atol=self.atol, rtol=self.rtol, rank=self.rank)
                except DriftError as exc:  # one bad reference does not cost the other
                    done[ref_id] = {"error": str(exc)}
            out["references"][label] = {"id": ref_id, **done[ref_id]}
        return json.loads(json.dumps(out, default=float))

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        errors = [f"{k} ({v['id']}): {v['error']}" for k, v in result["references"].items() if v and "error" in v]
        refs = {k: v for k, v in result["references"].items() if v and "error" not in v}
        if not refs and errors:
            return "Cannot compare: " + "; ".join(errors) + "\n", []
        if not refs:
            return ("No reference checkpoint (this is a run's base or first checkpoint, or it has no parent "
                    "in the registry): nothing to compare.\n", [])
        from matplotlib.figure import Figure

        def f(x: Any, digits: int = 4) -> str:
            return "–" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))

        lines = [f"Changed = |W - W_ref| > {result['atol']:g} + {result['rtol']:g}·|W_ref|."
                 + ("".join(f" Cannot compare with {e}." for e in errors)), "",
                 "| reference | checkpoint | changed fraction | relative update | mean effective rank (2-D) |",
                 "|---|---|---|---|---|"]
        for label, r in refs.items():
            t = r["total"]
            lines.append(f"| {label} | {r['id']} | {f(t['frac_changed'])} | {f(t['rel_update'])} | {f(t['eff_rank_mean'], 3)} |")
        types = sorted({m for r in refs.values() for m in r["by_module"]})
        head = " | ".join(f"{label}: changed · rel. update · eff. rank" for label in refs)
        lines += ["", f"| module | {head} |", "|---|" + "---|" * len(refs)]
        for m in types:
            cells = []
            for r in refs.values():
                d = r["by_module"].get(m, {})
                cells.append(f"{f(d.get('frac_changed'), 3)} · {f(d.get('rel_update'), 3)} · {f(d.get('eff_rank_mean'), 3)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")

        first = next(iter(refs.values()))
        layer_types = sorted({row["module"] for row in first["modules"] if row["layer"] is not None})
        n_layers = len(first["layers"])
        figs = []
        if n_layers and layer_types:
            fig = Figure(figsize=(4.6 * len(refs), 0.22 * n_layers + 2.6), layout="constrained")
            axes = np.atleast_1d(fig.subplots(1, len(refs)))
            for ax, (label, r) in zip(axes, refs.items()):
                grid = np.full((n_layers, len(layer_types)), np.nan)
                for row in r["modules"]:
                    if row["layer"] is not None and row["rel_update"] is not None and row["layer"] < n_layers:
                        grid[row["layer"], layer_types.index(row["module"])] = row["rel_update"]
                im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
                ax.set_xticks(range(len(layer_types)), layer_types, rotation=60, ha="right", fontsize=7)
                ax.set_ylabel("layer")
                ax.set_title(f"relative update vs {label}", fontsize=9)
                fig.colorbar(im, ax=ax, shrink=0.8)
            figs.append(("Relative update ||W - W_ref|| / ||W_ref|| per layer and module", fig))
        return "\n".join(lines) + "\n", figs

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, name in (("base", "vs base"), ("parent", "vs previous")):
            r = result["references"].get(label)
            if not r or "error" in r:
                continue
            t = r["total"]
            out[f"relative weight update {name}"] = t["rel_update"]
            out[f"changed parameter fraction {name}"] = t["frac_changed"]
            if label == "base":
                out["update effective rank vs base"] = t["eff_rank_mean"]
        return {k: v for k, v in out.items() if v is not None}
