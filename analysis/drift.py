"""Parameter drift: how far, how widely and in how many directions the weights moved.

Weights only (no model, no generation). A checkpoint's safetensors are compared tensor by
tensor (two tensors in memory at a time) with two references from the registry:

* base:     follow `parent` links back to the run's entry of stage "base", else the first
            checkpoint of the run;
* previous: the checkpoint's `parent`.

Per parameter tensor, grouped per layer and per module (weight and bias together):

* changed fraction: share of entries with |W - W_ref| > atol + rtol * |W_ref| (defaults 0:
  any change; tensors stored in different dtypes are first rounded to the coarser one);
* changed beyond rounding: share of entries that still differ once both are rounded to the
  `rounding` dtype (default bfloat16): an update that storage in that dtype would keep;
* relative update:  ||W - W_ref||_F / ||W_ref||_F;
* effective rank of the update (2-D weights): exp of the entropy of its normalised singular
  values (Roy & Vetterli), 1 for a rank-1 update, up to min(shape) for an isotropic one;
  means over modules count the updated matrices only.

With `seeds` (e.g. "1,2"), the changed set against the base is compared with that of each
other seed's run (`<run>-seed<N>`, `train.registry.seed_run`) at the same step: Jaccard index and
shared fraction, against independent choices at each tensor's own rates (`update_overlap`).

The registry is the one the harness read when the context carries it (`ctx.registry`),
else the `registry` option, else the `ckpts.yaml` the checkpoint's relative path points
from, else `./ckpts.yaml`.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from analysis.harness import Analysis, AnalysisContext, HarnessError, register_analysis
from train.errors import UserError
from train.registry import DEFAULT_REGISTRY, Checkpoint, Registry, parse_seeds, seed_run

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


ROUNDING_DTYPES = ("bfloat16", "float16", "float32")


def rounding_dtype(name: str | None):
    """The torch dtype of a `rounding` option ("" or None: no rounding comparison)."""
    import torch

    if not name:
        return None
    if name not in ROUNDING_DTYPES:
        raise DriftError(f"rounding {name!r}: use one of {', '.join(ROUNDING_DTYPES)} (or empty for none)")
    return getattr(torch, name)


def _common_precision(w, ref):
    """Both tensors at the coarser of their two dtypes (integers as float64)."""
    if w.dtype != ref.dtype and w.is_floating_point() and ref.is_floating_point():
        common = _coarser(w, ref)
        w, ref = w.to(common), ref.to(common)
    if not w.is_floating_point():
        w, ref = w.double(), ref.double()
    return w, ref


def changed_mask(w, ref, *, atol: float = 0.0, rtol: float = 0.0, rounding: str | None = None):
    """Boolean mask of the changed entries of `w` against `ref`: beyond the storage dtype's
    rounding (the two differ once both are rounded to `rounding`) when `rounding` is given,
    else |w - ref| > atol + rtol * |ref| at the coarser of the two stored dtypes."""
    w, ref = _common_precision(w, ref)
    dtype = rounding_dtype(rounding)
    if dtype is not None:
        return w.to(dtype) != ref.to(dtype)
    return (w.float() - ref.float()).abs() > atol + rtol * ref.float().abs()


def tensor_drift(w, ref, *, atol: float = 0.0, rtol: float = 0.0, rank: bool = True,
                 rounding: str | None = None) -> dict:
    """Changed entries (against atol/rtol and, with `rounding`, beyond that dtype's rounding),
    squared norms and (2-D, when `rank`) effective rank of w - ref."""
    import torch

    w, ref = _common_precision(w, ref)
    d = w.float() - ref.float()
    changed = int((d.abs() > atol + rtol * ref.float().abs()).sum())
    out = {"numel": int(d.numel()), "changed": changed,
           "changed_rounded": int(changed_mask(w, ref, rounding=rounding).sum()) if rounding else None,
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
    rounded = [r["changed_rounded"] for r in rows if r.get("changed_rounded") is not None]
    cr = sum(rounded) if rounded and len(rounded) == len(rows) else None
    dsq = sum(r["delta_sq"] for r in rows)
    rsq = sum(r["ref_sq"] for r in rows)
    ranks = [r["eff_rank"] for r in rows if r.get("eff_rank") is not None and r["delta_sq"] > 0]
    return {"numel": n, "changed": c, "frac_changed": c / n if n else None,
            "changed_rounded": cr, "frac_changed_rounded": cr / n if n and cr is not None else None,
            "rel_update": _rel(dsq, rsq), "delta_norm": float(np.sqrt(dsq)), "ref_norm": float(np.sqrt(rsq)),
            "eff_rank_mean": float(np.mean(ranks)) if ranks else None}


class _Weights:
    """Tensors of an HF folder by name, each safetensors file opened once."""

    def __init__(self, folder: str | Path):
        self.folder, self.index, self._stack = Path(folder), safetensors_index(folder), contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def get(self, name: str):
        from safetensors import safe_open

        f = self.index[name]
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return self._handles[f].get_tensor(name)

    def __enter__(self) -> "_Weights":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def paired_tensors(*folders: str | Path) -> Iterator[tuple[str, list]]:
    """(name, [tensor of each folder]) for every parameter all the folders hold, one name at a
    time; a shape that differs between folders is a DriftError naming it."""
    with contextlib.ExitStack() as stack:
        weights = [stack.enter_context(_Weights(f)) for f in folders]
        names = [k for k in weights[0].index if all(k in w.index for w in weights[1:])]
        if not names:
            raise DriftError(f"{' and '.join(str(f) for f in folders)} share no parameter names")
        for k in names:
            tensors = [w.get(k) for w in weights]
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise DriftError(f"{k}: shapes differ between "
                                 + ", ".join(f"{tuple(t.shape)} in {f}" for t, f in zip(tensors, folders)))
            yield k, tensors
            del tensors


def _group_order(key: tuple[int | None, str]) -> tuple[int, str]:
    return (-1 if key[0] is None else key[0], key[1])


def weight_drift(path: str | Path, ref_path: str | Path, *, atol: float = 0.0, rtol: float = 0.0,
                 rank: bool = True, rounding: str | None = None) -> dict:
    """Drift of the weights in `path` against `ref_path` (HF folders with safetensors): per
    module (layer, module), per layer, per module type and in total. With `rounding` (a dtype
    name) the changed fraction is also counted beyond that dtype's rounding."""
    if atol < 0 or rtol < 0:
        raise DriftError(f"tolerances must be >= 0, got atol={atol} rtol={rtol}")
    rounding_dtype(rounding)
    modules: dict[tuple[int | None, str], list[dict]] = {}
    for k, (w, r) in paired_tensors(path, ref_path):
        layer, module, kind = split_name(k)
        row = tensor_drift(w, r, atol=atol, rtol=rtol, rank=rank and kind == "weight", rounding=rounding)
        row["name"], row["kind"] = k, kind
        modules.setdefault((layer, module), []).append(row)
    module_rows = []
    for (layer, module), rows in sorted(modules.items(), key=lambda kv: _group_order(kv[0])):
        s = _summary(rows)
        weight = next((r for r in rows if r["kind"] == "weight"), rows[0])
        module_rows.append({"layer": layer, "module": module, "shape": weight["shape"],
                            "numel": s["numel"], "changed": s["changed"], "frac_changed": s["frac_changed"],
                            "frac_changed_rounded": s["frac_changed_rounded"],
                            "rel_update": s["rel_update"], "eff_rank": weight.get("eff_rank")})
    all_rows = [r for rows in modules.values() for r in rows]
    keep = ("frac_changed", "frac_changed_rounded", "rel_update", "eff_rank_mean")
    per_layer = []
    for l in sorted({l for l, _ in modules if l is not None}):
        s = _summary(r for (ll, _), rows in modules.items() if ll == l for r in rows)
        per_layer.append({"layer": l, **{k: s[k] for k in keep}})
    by_type = {}
    for m in sorted({m for _, m in modules}):
        s = _summary(r for (_, mm), rows in modules.items() if mm == m for r in rows)
        by_type[m] = {k: s[k] for k in keep}
    cur, ref = safetensors_index(path), safetensors_index(ref_path)
    return {"total": _summary(all_rows), "modules": module_rows, "layers": per_layer, "by_module": by_type,
            "rounding": rounding or None,
            "missing": sorted(k for k in ref if k not in cur), "extra": sorted(k for k in cur if k not in ref)}


# --------------------------------------------------------------------------- overlap between runs

def _overlap_summary(rows: Iterable[dict]) -> dict:
    """Jaccard and shared fraction of two changed sets, and what independent choices at each
    tensor's own rates would give (the chance level)."""
    rows = list(rows)
    n = sum(r["numel"] for r in rows)
    a, b = sum(r["a"] for r in rows), sum(r["b"] for r in rows)
    both, union = sum(r["both"] for r in rows), sum(r["union"] for r in rows)
    # Expected counts under independence, tensor by tensor: n * pa * pb and n * (pa + pb - pa * pb).
    e_both = sum(r["a"] * r["b"] / r["numel"] for r in rows if r["numel"])
    e_union = a + b - e_both
    jaccard = both / union if union else None
    chance = e_both / e_union if e_union else None
    return {"numel": n, "frac_a": a / n if n else None, "frac_b": b / n if n else None,
            "jaccard": jaccard, "jaccard_chance": chance,
            "jaccard_over_chance": jaccard / chance if jaccard is not None and chance else None,
            "shared": both / a if a else None, "shared_chance": e_both / a if a else None}


def mask_overlap(mask_a, mask_b) -> dict:
    """Counts of two boolean masks of the same tensor: entries, each set, both, either."""
    return {"numel": int(mask_a.numel()), "a": int(mask_a.sum()), "b": int(mask_b.sum()),
            "both": int((mask_a & mask_b).sum()), "union": int((mask_a | mask_b).sum())}


def update_overlap(a: str | Path, base_a: str | Path, b: str | Path, base_b: str | Path, *,
                   atol: float = 0.0, rtol: float = 0.0, rounding: str | None = None) -> dict:
    """How far the parameters changed from `base_a` to `a` and those changed from `base_b` to
    `b` are the same ones: Jaccard index and shared fraction (of a's changed entries, the share
    also changed in b) against their chance levels, in total, per module type and per layer.
    Changed as in `changed_mask`."""
    rounding_dtype(rounding)
    groups: dict[tuple[int | None, str], list[dict]] = {}
    for k, (wa, ra, wb, rb) in paired_tensors(a, base_a, b, base_b):
        layer, module, _ = split_name(k)
        row = mask_overlap(changed_mask(wa, ra, atol=atol, rtol=rtol, rounding=rounding),
                           changed_mask(wb, rb, atol=atol, rtol=rtol, rounding=rounding))
        groups.setdefault((layer, module), []).append(row)
    rows = [r for g in groups.values() for r in g]
    return {"total": _overlap_summary(rows),
            "by_module": {m: _overlap_summary(r for (_, mm), g in groups.items() if mm == m for r in g)
                          for m in sorted({m for _, m in groups})},
            "layers": [{"layer": l, **_overlap_summary(r for (ll, _), g in groups.items() if ll == l for r in g)}
                       for l in sorted({l for l, _ in groups if l is not None})]}


_SEED_SUFFIX = re.compile(r"-seed\d+$")


def seed_siblings(registry: Registry, ck: Checkpoint, seeds: Sequence[int]) -> dict[int, Checkpoint | str]:
    """For each seed, the checkpoint of that seed's run at `ck`'s global step (or why there is
    none). Seed N's run is `<run>-seed<N>` (`train.registry.seed_run`); for seed 0 the plain
    `<run>` when no `<run>-seed0` exists (a single-seed training is seed 0)."""
    stem = _SEED_SUFFIX.sub("", ck.run)
    entries = registry.checkpoints()
    runs = {c.run for c in entries}
    out: dict[int, Checkpoint | str] = {}
    for seed in seeds:
        run = seed_run(stem, seed)
        if run not in runs and seed == 0 and stem in runs:
            run = stem
        if run == ck.run:
            continue
        if run not in runs:
            out[seed] = f"no run {run} in {registry.path}"
            continue
        same = [c for c in entries if c.run == run and c.global_step == ck.global_step and c.stage == ck.stage]
        same = same or [c for c in entries if c.run == run and c.global_step == ck.global_step]
        out[seed] = same[0] if same else f"run {run} has no checkpoint at step {ck.global_step}"
    return out


# --------------------------------------------------------------------------- plug-in

@register_analysis
class DriftAnalysis(Analysis):
    """Parameter drift against the run's base checkpoint and the previous checkpoint; with
    `seeds`, the overlap of the changed parameters with other seeds' runs at the same step."""

    name = NAME
    title = "Parameter drift"
    order = 60
    version = 2
    uses_generations = False
    uses_model = False

    def __init__(self, atol: float = 0.0, rtol: float = 0.0, rank: bool = True, registry: str | None = None,
                 rounding: str = "bfloat16", seeds: str = ""):
        self.atol, self.rtol, self.rank = float(atol), float(rtol), bool(rank)
        if self.atol < 0 or self.rtol < 0:
            raise DriftError(f"drift tolerances must be >= 0, got atol={atol} rtol={rtol}")
        self.registry = registry
        self.rounding = str(rounding or "")
        try:
            rounding_dtype(self.rounding)
        except DriftError as exc:
            raise DriftError(f"--set drift.{exc}") from None
        self.seeds = parse_seeds(str(seeds)) if str(seeds).strip() else []

    def params(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "rank": self.rank, "rounding": self.rounding,
                "seeds": self.seeds}

    def run(self, ctx: AnalysisContext) -> dict:
        refs = references(ctx, self.registry)
        out: dict[str, Any] = {"checkpoint": ctx.checkpoint.id, "atol": self.atol, "rtol": self.rtol,
                               "rounding": self.rounding or None, "references": {}}
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
                    done[ref_id] = weight_drift(ctx.path, ref_path, atol=self.atol, rtol=self.rtol, rank=self.rank,
                                                rounding=self.rounding)
                except DriftError as exc:  # one bad reference does not cost the other
                    done[ref_id] = {"error": str(exc)}
            out["references"][label] = {"id": ref_id, **done[ref_id]}
        if self.seeds:
            out["seed_overlap"] = self._seed_overlap(ctx, refs["base"])
        return json.loads(json.dumps(out, default=float))

    def _seed_overlap(self, ctx: AnalysisContext, base: tuple[str, Path] | None) -> list[dict]:
        """One entry per other seed: its checkpoint at this step and the overlap of the two
        changed sets (each against its own base), or why there is none."""
        registry = find_registry(ctx, self.registry)
        if registry is None or base is None or base[0] == ctx.checkpoint.id:
            return []
        rows = []
        for seed, sibling in seed_siblings(registry, ctx.checkpoint, self.seeds).items():
            if isinstance(sibling, str):
                rows.append({"seed": seed, "error": sibling})
                continue
            sib_base, _ = lineage(registry, sibling)
            row = {"seed": seed, "run": sibling.run, "id": sibling.id}
            try:
                if sib_base is None:
                    raise DriftError(f"{sibling.id} has no base checkpoint in the registry")
                row |= update_overlap(ctx.path, base[1], registry.resolve(sibling), registry.resolve(sib_base),
                                      atol=self.atol, rtol=self.rtol, rounding=self.rounding)
            except DriftError as exc:
                row["error"] = str(exc)
            rows.append(row)
        return rows

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

        rounding = result.get("rounding")
        beyond = f"changed beyond {rounding} rounding" if rounding else None
        lines = [f"Changed = |W - W_ref| > {result['atol']:g} + {result['rtol']:g}·|W_ref|"
                 + (f"; changed beyond {rounding} rounding = W and W_ref differ once both are rounded to "
                    f"{rounding} (an update the {rounding} storage would keep)" if rounding else "") + "."
                 + ("".join(f" Cannot compare with {e}." for e in errors)), "",
                 "| reference | checkpoint | changed fraction |" + (f" {beyond} |" if beyond else "")
                 + " relative update | mean effective rank (2-D) |",
                 "|---|---|---|" + ("---|" if beyond else "") + "---|---|"]
        for label, r in refs.items():
            t = r["total"]
            lines.append(f"| {label} | {r['id']} | {f(t['frac_changed'])} |"
                         + (f" {f(t.get('frac_changed_rounded'))} |" if beyond else "")
                         + f" {f(t['rel_update'])} | {f(t['eff_rank_mean'], 3)} |")
        parts = "changed" + (" · beyond rounding" if beyond else "") + " · rel. update · eff. rank"

        def cells(d: dict) -> str:
            vals = [d.get("frac_changed")] + ([d.get("frac_changed_rounded")] if beyond else []) \
                + [d.get("rel_update"), d.get("eff_rank_mean")]
            return " · ".join(f(v, 3) for v in vals)

        types = sorted({m for r in refs.values() for m in r["by_module"]})
        head = " | ".join(f"{label}: {parts}" for label in refs)
        lines += ["", "Per module type:", "", f"| module | {head} |", "|---|" + "---|" * len(refs)]
        for m in types:
            lines.append(f"| {m} | " + " | ".join(cells(r["by_module"].get(m, {})) for r in refs.values()) + " |")
        layer_ids = sorted({row["layer"] for r in refs.values() for row in r["layers"]})
        if layer_ids:
            lines += ["", "Per layer:", "", f"| layer | {head} |", "|---|" + "---|" * len(refs)]
            for l in layer_ids:
                lines.append(f"| {l} | " + " | ".join(
                    cells(next((row for row in r["layers"] if row["layer"] == l), {})) for r in refs.values()) + " |")
        lines += self._overlap_lines(result.get("seed_overlap") or [], f)

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
        if "base" in refs and layer_types:
            figs.append(self._sparsity_figure(refs["base"], layer_types, n_layers, rounding))
        return "\n".join(lines) + "\n", figs

    @staticmethod
    def _overlap_lines(rows: list[dict], f) -> list[str]:
        if not rows:
            return []
        lines = ["", "Overlap of the changed parameters with other seeds' runs at the same step (each against "
                 "its own base; chance = independent choices at each tensor's own rates):", "",
                 "| seed | checkpoint | Jaccard | by chance | ratio | shared (of ours) | by chance |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['seed']} | – | {r['error']} | | | | |")
                continue
            t = r["total"]
            lines.append(f"| {r['seed']} | {r['id']} | {f(t['jaccard'], 3)} | {f(t['jaccard_chance'], 3)} | "
                         f"{f(t['jaccard_over_chance'], 3)} | {f(t['shared'], 3)} | {f(t['shared_chance'], 3)} |")
        ok = [r for r in rows if "error" not in r]
        if ok:
            lines += ["", "Per module type (Jaccard / by chance, first seed):", "",
                      "| module | Jaccard | by chance |", "|---|---|---|"]
            for m, s in ok[0]["by_module"].items():
                lines.append(f"| {m} | {f(s['jaccard'], 3)} | {f(s['jaccard_chance'], 3)} |")
        return lines

    @staticmethod
    def _sparsity_figure(ref: dict, layer_types: list[str], n_layers: int, rounding: str | None):
        from matplotlib.figure import Figure

        key = "frac_changed_rounded" if rounding else "frac_changed"
        grid = np.full((n_layers, len(layer_types)), np.nan)
        for row in ref["modules"]:
            if row["layer"] is not None and row.get(key) is not None and row["layer"] < n_layers:
                grid[row["layer"], layer_types.index(row["module"])] = row[key]
        fig = Figure(figsize=(5.2, 0.22 * n_layers + 2.6), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1)
        ax.set_xticks(range(len(layer_types)), layer_types, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("layer")
        what = f"changed beyond {rounding} rounding" if rounding else "changed"
        ax.set_title(f"share of parameters {what} vs base", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        return (f"Update sparsity: share of parameters {what} against the base, per layer and module", fig)

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        rounding = result.get("rounding")
        for label, name in (("base", "vs base"), ("parent", "vs previous")):
            r = result["references"].get(label)
            if not r or "error" in r:
                continue
            t = r["total"]
            out[f"relative weight update {name}"] = t["rel_update"]
            out[f"changed parameter fraction {name}"] = t["frac_changed"]
            if label == "base":
                out["update effective rank vs base"] = t["eff_rank_mean"]
                if rounding:
                    out[f"changed beyond {rounding} rounding vs base"] = t.get("frac_changed_rounded")
        ok = [r["total"] for r in result.get("seed_overlap") or [] if "error" not in r]
        if ok:
            for key, label in (("jaccard", "seed overlap of changed parameters (Jaccard)"),
                               ("jaccard_chance", "seed overlap expected by chance (Jaccard)")):
                vals = [t[key] for t in ok if t[key] is not None]
                if vals:
                    out[label] = float(np.mean(vals))
        return {k: v for k, v in out.items() if v is not None}
