"""The "probes" analysis: linear probes per layer and target, as a harness plug-in.

Per checkpoint it extracts (or reads from the cache) the residual features of its own
puzzle-set generations (`probes.features`), labels them (`probes.targets`), and for each
target cross-validates a probe at every layer with the control task, the permutation test and
the baselines (`probes.fit`). Probes refitted on all rows (C: the geometric median of the
folds' choices) are saved next to the cached result (`<cache>/<checkpoint>/probes-<hash>.probes/<target>/layer-XX.{npz,json}`).

Report section: best layer per target with AUROC, selectivity and p-value, AUROC per layer.
Trend metrics: best-layer AUROC and selectivity per target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.harness import Analysis, AnalysisContext, analysis_params, register_analysis
from probes.compare import best_entry, controls_cell, fmt
from probes.features import FeatureError, features_for
from probes.fit import (FitConfig, bag_of_tokens, binary_metrics, consensus_C, fit_probe, parse_Cs, probe_target,
                        puzzle_fold_map, save_probe)
from probes.targets import CONTROL_UNITS, KINDS, TARGETS, answer_start, check_kinds, check_targets

PROGRESS_BINS = ("early", "middle", "late")   # thirds of the text before the answer


def probe_file(root: str | Path, target: str, layer: int) -> Path:
    """Stem of a saved probe under a checkpoint's probe folder."""
    return Path(root) / target / f"layer-{layer:02d}"


def progress_bins(fs: Any) -> np.ndarray:
    """Per row: 0, 1 or 2 for the first, middle or last third of the response before its answer."""
    out = np.zeros(len(fs.rows), dtype=int)
    for i, r in enumerate(fs.rows.itertuples()):
        end = max(answer_start(fs.contexts[int(r.context)]["text"]), 1)
        out[i] = min(int(3 * r.char / end), 2)
    return out


@register_analysis
class ProbesAnalysis(Analysis):
    """Linear probes on the residual stream at pre-answer decision points."""

    name = "probes"
    title = "Linear probes on the residual stream"
    order = 40
    version = 2
    uses_generations = True
    uses_model = True

    def __init__(self, targets: Sequence[str] | str = TARGETS, max_points: int = 48, max_tokens: int = 4096,
                 n_splits: int = 5, inner_splits: int = 3, n_permutations: int = 100, seed: int = 0,
                 Cs: Sequence[float] | str | None = None, save_probes: bool = True, control_draws: int = 5,
                 at: Sequence[str] | str = KINDS, batch_tokens: int = 16384):
        if isinstance(targets, str):
            targets = targets.split(",")
        self.targets = check_targets(targets)
        self.at = check_kinds(at)
        self.max_points, self.max_tokens = int(max_points), int(max_tokens)
        self.batch_tokens = int(batch_tokens)   # memory of the feature pass only: not a parameter of the result
        if self.batch_tokens < 1:
            raise FeatureError(f"probes.batch_tokens must be >= 1, got {batch_tokens}")
        grid = parse_Cs(Cs) if Cs is not None else FitConfig.Cs
        self.fit = FitConfig(n_splits=int(n_splits), inner_splits=int(inner_splits),
                             n_permutations=int(n_permutations), seed=int(seed), Cs=grid,
                             control_draws=int(control_draws))
        self.save_probes = bool(save_probes)

    def params(self) -> dict:
        return {"targets": self.targets, "max_points": self.max_points, "max_tokens": self.max_tokens,
                "fit": self.fit.params(), "save_probes": self.save_probes, "at": self.at}

    # ------------------------------------------------------------------ run
    def run(self, ctx: AnalysisContext) -> dict:
        fs = features_for(ctx, max_points=self.max_points, max_tokens=self.max_tokens, batch_tokens=self.batch_tokens)
        fold_map = puzzle_fold_map([p.id for p in ctx.puzzles], [p.people for p in ctx.puzzles],
                                   self.fit.n_splits, self.fit.seed)
        result: dict[str, Any] = {
            "checkpoint": ctx.checkpoint.id, "n_layers": fs.n_layers, "hidden": int(fs.X.shape[2]),
            "n_contexts": len(fs.contexts), "n_rows": len(fs.rows),
            "accuracy": float(np.mean([c["correct"] for c in fs.contexts])) if fs.contexts else None,
            "fit": self.fit.params(), "targets": {}, "probe_dir": None,
        }
        if len(fs.rows) == 0:
            for t in self.targets:
                result["targets"][t] = {"n_rows": 0, "layers": [], "skipped": "no pre-answer decision points"}
            return result
        groups, sizes = fs.groups, fs.sizes
        unit_types = {"token": fs.token_types, "response": fs.rows["context"].to_numpy()}
        folds = np.array([fold_map[g] for g in groups])
        kinds = fs.rows["kinds"].tolist()
        at = fs.at(self.at)
        result["at"] = self.at
        thirds = progress_bins(fs)
        bag = bag_of_tokens(fs.prefix_tokens())
        tmp = None
        if self.save_probes:
            final = ctx.cache.sidecar(ctx.checkpoint.id, self.name,
                                      analysis_params(self, ctx.fingerprint, ctx.config), ".probes")
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix="." + final.name))
        bar = ctx.progress
        task = bar.add_task("probes", total=len(self.targets) * fs.n_layers * (2 if self.save_probes else 1)) \
            if bar is not None else None
        advance = (lambda: bar.advance(task)) if task is not None else None
        try:
            for target in self.targets:
                if bar is not None:
                    bar.update(task, description=f"probes: {target}")
                y = fs.labels(target)
                idx = np.flatnonzero((y >= 0) & at)
                yt = y[idx].astype(int)
                controls = {unit: unit_types[unit][idx] for unit in CONTROL_UNITS[target]}
                r = probe_target(fs.X, yt, groups=groups[idx], folds=folds[idx], controls=controls,
                                 config=self.fit, strata=sizes[idx], rows=idx, bag=bag[idx],
                                 kinds=[kinds[i] for i in idx], progress=advance)
                if "skipped" not in r:
                    oof = {k: np.asarray(v) for k, v in r["oof_best"].items()}
                    r["by_progress"] = {}
                    for b, label in enumerate(PROGRESS_BINS):
                        m = thirds[idx] == b
                        if m.any():
                            r["by_progress"][label] = binary_metrics(yt[m], oof["proba"][m], self.fit.n_bins,
                                                                      oof["score"][m], oof["pred"][m])
                    if tmp is not None:
                        for layer in range(fs.n_layers):
                            meta = {"checkpoint": ctx.checkpoint.id, "target": target, "layer": layer,
                                    "n_rows": int(len(idx)), "n_puzzles": r["n_puzzles"],
                                    "cv": {k: r["layers"][layer][k] for k in ("auroc", "accuracy", "selectivity")}}
                            probe = fit_probe(np.asarray(fs.X[:, layer, :], dtype=np.float32)[idx], yt, groups[idx],
                                              self.fit, strata=sizes[idx], C=consensus_C(r["layers"][layer]["C"]),
                                              meta=meta)
                            save_probe(probe, probe_file(tmp, target, layer))
                            if advance is not None:
                                advance()
                r["oof_best"] = None  # kept out of the cached result (large); recomputable
                result["targets"][target] = r
            if tmp is not None:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                tmp = None
                result["probe_dir"] = str(final.relative_to(ctx.cache.root))
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp)
            if task is not None:
                bar.remove_task(task)
        return result

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure

        lines = [f"{result['n_contexts']} responses (accuracy {fmt(result.get('accuracy'))}), {result['n_rows']} "
                 f"pre-answer positions (probed at: {', '.join(result.get('at', KINDS))}), {result['n_layers']} "
                 f"residual layers (0 = embeddings). Probes: logistic "
                 f"regression, C by inner CV, {result.get('fit', {}).get('n_splits', '?')}-fold CV over whole "
                 "puzzles; selectivity = accuracy minus the control task's (a random label per response for "
                 "answer_correct, per token type otherwise), also on balanced accuracy; AUROC on intercept-free "
                 "scores.", "",
                 "| target | rows | puzzles | positive | best layer | AUROC | bal. acc. | ECE | Brier "
                 "| control acc. (bal.), selectivity (bal.) | permutation p | layer-0 AUROC | bag-of-tokens AUROC |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t, r in result["targets"].items():
            if r.get("skipped"):
                lines.append(f"| {t} | {r.get('n_rows', 0)} | {r.get('n_puzzles', '–')} | {fmt(r.get('pos_rate'))} "
                             f"| skipped: {r['skipped']} |||||||||")
                continue
            b = best_entry(r)
            base = r.get("baselines", {})
            lines.append(f"| {t} | {r['n_rows']} | {r['n_puzzles']} | {fmt(r['pos_rate'])} | {r['best_layer']} "
                         f"| {fmt(b['auroc'])} | {fmt(b['balanced_accuracy'])} | {fmt(b['ece'])} | {fmt(b['brier'])} "
                         f"| {controls_cell(b)} "
                         f"| {fmt(r.get('permutation', {}).get('p_value'), 3)} "
                         f"| {fmt(base.get('layer0', {}).get('auroc'))} "
                         f"| {fmt(base.get('bag_of_tokens', {}).get('auroc'))} |")
        done = {t: r for t, r in result["targets"].items() if not r.get("skipped")}
        if not done:
            return "\n".join(lines) + "\n", []
        n = max(len(r["layers"]) for r in done.values())
        lines += ["", "AUROC (selectivity) per layer:", "",
                  "| layer | " + " | ".join(done) + " |", "|---|" + "---|" * len(done)]
        for layer in range(n):
            cells = []
            for r in done.values():
                x = next((x for x in r["layers"] if x["layer"] == layer), None)
                cells.append("–" if x is None else f"{fmt(x['auroc'])} ({fmt(x['selectivity'])})")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        fig = Figure(figsize=(9, 3.4), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        for t, r in done.items():
            xs = [x["layer"] for x in r["layers"]]
            ax1.plot(xs, [x["auroc"] for x in r["layers"]], marker="o", ms=3, label=t)
            ax2.plot(xs, [x["selectivity"] for x in r["layers"]], marker="o", ms=3, label=t)
        ax1.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax2.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax1.set(xlabel="layer", ylabel="cross-validated AUROC")
        ax2.set(xlabel="layer", ylabel="selectivity (accuracy - control)")
        ax1.legend(fontsize=7)
        return "\n".join(lines) + "\n", [("Probe AUROC and selectivity per layer", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out = {}
        for t, r in result["targets"].items():
            if r.get("skipped"):
                continue
            b = best_entry(r)
            out[f"probe AUROC {t} (best layer)"] = b["auroc"]
            if t == "answer_correct":
                out["probe selectivity answer_correct (best layer)"] = b["selectivity"]
                out["probe best layer answer_correct"] = float(r["best_layer"])
        return {k: v for k, v in out.items() if v is not None and not np.isnan(v)}
