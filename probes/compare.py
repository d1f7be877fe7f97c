"""Probes across checkpoints: layer x checkpoint heatmaps, transfer and direction cosines.

    frame = metric_frame(results, "answer_correct", "auroc")          # layers x checkpoints
    T = transfer_matrix({ck: (X, y, groups, sizes) ...}, fold_map, cfg) # train ck (rows) x test ck
    cosine_matrix({ck: probe.direction ...}), cosine_matrix({ck: diff_of_means(X, y) ...})
    files = write_comparison(entries, out_dir, ...)                   # figures, summary.md, results.json

Transfer uses the same puzzle folds for every checkpoint: the probe trained on checkpoint a's
rows outside fold k is tested on checkpoint b's rows in fold k (its own labels), so a puzzle
is never in both; the diagonal is a's own cross-validated AUROC.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from analysis.cache import atomic_write_text, json_safe, safe_id
from analysis.verify_prob import KINDS
from probes.fit import FitConfig, ProbeError, binary_metrics, fit_model, load_probe, single_thread


# --------------------------------------------------------------------------- matrices

def metric_frame(results: Mapping[str, dict], target: str, metric: str = "auroc"):
    """DataFrame (layer x checkpoint) of a per-layer metric; NaN where a target was skipped."""
    import pandas as pd

    cols = {}
    for ck, res in results.items():
        r = res["targets"].get(target, {})
        cols[ck] = {x["layer"]: x[metric] for x in r.get("layers", [])}
    frame = pd.DataFrame(cols, columns=list(results), dtype=float)
    frame.index.name = "layer"
    return frame.sort_index()


def best_layer(frame) -> int | None:
    """The layer with the highest mean over checkpoints (None when all NaN)."""
    mean = frame.mean(axis=1, skipna=True)
    return None if mean.isna().all() else int(mean.idxmax())


@single_thread
def transfer_matrix(data: Mapping[str, tuple[Any, Any, Any, Any]], fold_map: Mapping[Any, int],
                    config: FitConfig):
    """AUROC of probes trained on checkpoint a (rows) and tested on checkpoint b (columns),
    on the intercept-free scores (see `probes.fit`).

    data: {checkpoint: (X (rows, hidden) at one layer, labels, puzzle ids, sizes)}.
    """
    import pandas as pd

    names = list(data)
    out = pd.DataFrame(np.nan, index=names, columns=names, dtype=float)
    out.index.name, out.columns.name = "train", "test"
    folds = {ck: np.array([fold_map[g] for g in np.asarray(d[2])]) for ck, d in data.items()}
    for a in names:
        Xa, ya, ga, sa = (np.asarray(v) for v in data[a])
        ya = ya.astype(int)
        proba = {b: np.full(len(data[b][1]), np.nan) for b in names}
        for k in np.unique(folds[a]):
            tr = folds[a] != k
            if not tr.any():
                continue
            model, _ = fit_model(Xa[tr], ya[tr], ga[tr], sa[tr], config)
            for b in names:
                te = folds[b] == k
                if te.any():
                    proba[b][te] = model.score(np.asarray(data[b][0])[te])
        for b in names:
            yb = np.asarray(data[b][1]).astype(int)
            ok = ~np.isnan(proba[b])
            out.loc[a, b] = binary_metrics(yb[ok], proba[b][ok])["auroc"] if ok.any() else np.nan
    return out


def diff_of_means(X: Any, y: Sequence[int]) -> np.ndarray:
    """mean(X | y=1) - mean(X | y=0)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=int)
    if not (y == 1).any() or not (y == 0).any():
        return np.full(X.shape[1], np.nan)
    return X[y == 1].mean(0) - X[y == 0].mean(0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if not (na > 0 and nb > 0) or np.isnan(na) or np.isnan(nb):
        return float("nan")
    return float(a @ b / (na * nb))


def cosine_matrix(vectors: Mapping[str, np.ndarray]):
    """DataFrame of pairwise cosines between the checkpoints' vectors."""
    import pandas as pd

    names = list(vectors)
    return pd.DataFrame([[cosine(np.asarray(vectors[a], dtype=np.float64), np.asarray(vectors[b], dtype=np.float64))
                          for b in names] for a in names], index=names, columns=names)


# --------------------------------------------------------------------------- figures

def _short(ck: str) -> str:
    """A checkpoint id shortened for axis labels (the run prefix dropped)."""
    parts = ck.split("/")
    return "/".join(parts[1:]) if len(parts) > 2 else ck


def heatmap(frame, title: str, *, vmin: float | None = None, vmax: float | None = None, center: float | None = None,
            cmap: str = "viridis", xlabel: str = "checkpoint", ylabel: str = "layer"):
    """A seaborn heatmap of a frame, annotated when small enough."""
    import seaborn as sns
    from matplotlib.figure import Figure

    rows, cols = frame.shape
    fig = Figure(figsize=(min(2.2 + 0.75 * cols, 18), min(1.6 + 0.38 * rows, 14)), layout="constrained")
    ax = fig.subplots()
    shown = frame.copy()
    shown.columns = [_short(str(c)) for c in shown.columns]
    if shown.index.dtype == object:
        shown.index = [_short(str(i)) for i in shown.index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # seaborn's own colormap call
        sns.heatmap(shown.astype(float), ax=ax, vmin=vmin, vmax=vmax, center=center, cmap=cmap,
                    annot=rows * cols <= 400, fmt=".2f", annot_kws={"size": 7}, cbar_kws={"shrink": 0.8})
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    return fig


def frame_markdown(frame, digits: int = 2) -> str:
    cols = [_short(str(c)) for c in frame.columns]
    lines = [f"| {frame.index.name or ''} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        cells = ["–" if (v is None or (isinstance(v, float) and math.isnan(v))) else f"{v:.{digits}f}" for v in row]
        lines.append(f"| {_short(str(idx))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing

@dataclass
class ComparisonEntry:
    """One analysed checkpoint: its id, global step, plug-in result, features and saved probes."""

    checkpoint: str
    step: int
    result: dict
    features: Any                 # probes.features.FeatureSet
    probe_dir: Path | None


@dataclass
class ComparisonFiles:
    summary: Path
    results: Path
    figures: list[Path] = field(default_factory=list)
    probes: list[Path] = field(default_factory=list)


def fmt(x: Any, digits: int = 2) -> str:
    """A number for a Markdown table ("–" for none or NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def best_entry(r: dict) -> dict | None:
    """A target result's entry of its best layer (None when skipped)."""
    if r.get("skipped") or not r.get("layers"):
        return None
    return next(x for x in r["layers"] if x["layer"] == r["best_layer"])


def controls_cell(layer: dict) -> str:
    """Control accuracy (balanced) and selectivity (balanced) against each control task of one
    layer's result, e.g. "response: 0.50 (0.50), sel. 0.08 (0.10); token: ..."."""
    return "; ".join(f"{name}: {fmt(c['accuracy'])} ({fmt(c['balanced_accuracy'])}), sel. {fmt(c['selectivity'])} "
                     f"({fmt(c['selectivity_balanced'])})" for name, c in layer.get("controls", {}).items())


def write_comparison(entries: Sequence[ComparisonEntry], out_dir: str | Path, *, targets: Sequence[str],
                     fold_map: Mapping[Any, int], config: FitConfig, layer: int | None = None,
                     header: str = "", progress: Callable[[str], None] | None = None) -> ComparisonFiles:
    """Heatmaps, transfer matrices, cosines, the saved probes and a Markdown summary."""
    for e in entries:
        if layer is not None and layer >= e.features.n_layers:
            raise ProbeError(f"--layer {layer} is beyond the {e.features.n_layers} residual layers of {e.checkpoint}")
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    files = ComparisonFiles(summary=out / "summary.md", results=out / "results.json")
    results = {e.checkpoint: e.result for e in entries}
    md = ["# Linear probes across checkpoints", ""]
    if header:
        md += [header, ""]
    md += ["Residual stream (layer 0 = embeddings, layer i = output of decoder layer i) at each response's "
           "decision points before the final answer starts (step starts, before `</think>`, after "
           "\"X is a knight/knave\" conclusions). Logistic-regression probes, C chosen by inner "
           "cross-validation; outer cross-validation over whole puzzles (stratified by size). "
           "Selectivity = accuracy minus that of a control task (a seeded random label per response for "
           "answer_correct, whose label is one per response, and per token type for the others; same C), also "
           "given on balanced accuracy; the table gives every control task computed, the heatmaps the first. "
           "Probes use balanced class weights: accuracies are of the balanced decision, ECE and Brier of probabilities at the training base rate, AUROC of the "
           "intercept-free scores. The permutation test refits the best layer's probe on permuted labels.", "",
           "| checkpoint | step | responses | accuracy | positions |", "|---|---|---|---|---|"]
    for e in entries:
        md.append(f"| {e.checkpoint} | {e.step} | {e.result['n_contexts']} | {fmt(e.result.get('accuracy'))} "
                  f"| {e.result['n_rows']} |")
    summary: dict[str, Any] = {"checkpoints": [e.checkpoint for e in entries], "targets": {}}

    def save(fig, name: str) -> str:
        path = fig_dir / name
        fig.savefig(path, dpi=110)
        files.figures.append(path)
        return f"figures/{name}"

    for target in targets:
        if progress is not None:
            progress(f"comparing: {target}")
        md += ["", f"## {target}", ""]
        md += ["| checkpoint | rows | positive | best layer | AUROC | acc. | bal. acc. | ECE | Brier "
               "| control acc. (bal.), selectivity (bal.) | permutation p | layer-0 AUROC | bag-of-tokens AUROC |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in entries:
            r = e.result["targets"].get(target, {})
            b = best_entry(r)
            if b is None:
                md.append(f"| {_short(e.checkpoint)} | {r.get('n_rows', 0)} | {fmt(r.get('pos_rate'))} "
                          f"| skipped: {r.get('skipped', 'not run')} |||||||||")
                continue
            base = r.get("baselines", {})
            md.append(f"| {_short(e.checkpoint)} | {r['n_rows']} | {fmt(r['pos_rate'])} | {r['best_layer']} "
                      f"| {fmt(b['auroc'])} | {fmt(b['accuracy'])} | {fmt(b['balanced_accuracy'])} | {fmt(b['ece'])} "
                      f"| {fmt(b['brier'])} | {controls_cell(b)} "
                      f"| {fmt(r.get('permutation', {}).get('p_value'), 3)} "
                      f"| {fmt(base.get('layer0', {}).get('auroc'))} | {fmt(base.get('bag_of_tokens', {}).get('auroc'))} |")
        auroc = metric_frame(results, target, "auroc")
        if auroc.isna().all().all():
            md += ["", "No checkpoint has enough labelled positions of both classes for this target."]
            summary["targets"][target] = {"skipped": True}
            continue
        sel = metric_frame(results, target, "selectivity")
        control = next((r["targets"][target].get("control_task") for r in results.values()
                        if r["targets"].get(target, {}).get("control_task")), "token")
        sel_b = metric_frame(results, target, "selectivity_balanced")
        t_summary: dict[str, Any] = {"auroc": _records(auroc), "selectivity": _records(sel),
                                     "selectivity_balanced": _records(sel_b)}
        md += ["", "Cross-validated AUROC, layer x checkpoint:", "", frame_markdown(auroc), "",
               f"![AUROC]({save(heatmap(auroc, f'{target}: probe AUROC', vmin=0.5, vmax=1.0), f'auroc-{target}.png')})",
               "", f"Selectivity (accuracy - {control} control accuracy), layer x checkpoint:", "", frame_markdown(sel), "",
               f"![selectivity]({save(heatmap(sel, f'{target}: selectivity ({control} control)', center=0.0, cmap='RdBu_r'), f'selectivity-{target}.png')})",
               "", "Selectivity on balanced accuracy, layer x checkpoint:", "", frame_markdown(sel_b), ""]
        prog = {e.checkpoint: e.result["targets"][target].get("by_progress", {}) for e in entries
                if best_entry(e.result["targets"].get(target, {})) is not None}
        if any(prog.values()):
            md += ["", "AUROC at the best layer by where the position lies in the text before the answer "
                   "(thirds):", "", "| checkpoint | early | middle | late |", "|---|---|---|---|"]
            for ck, p in prog.items():
                md.append(f"| {_short(ck)} | " + " | ".join(fmt(p.get(b, {}).get("auroc")) for b in
                                                           ("early", "middle", "late")) + " |")
            t_summary["by_progress"] = prog
        L = layer if layer is not None else best_layer(auroc)
        data, probes, dom = {}, {}, {}
        for e in entries:
            if best_entry(e.result["targets"].get(target, {})) is None or L >= e.features.n_layers:
                continue
            y = e.features.labels(target)
            idx = np.flatnonzero((y >= 0) & e.features.at(e.result.get("at", KINDS)))
            X = e.features.layer(L)[idx]
            data[e.checkpoint] = (X, y[idx].astype(int), e.features.groups[idx], e.features.sizes[idx])
            dom[e.checkpoint] = diff_of_means(X, y[idx])
            if e.probe_dir is not None:
                stem = Path(e.probe_dir) / target / f"layer-{L:02d}"
                if stem.with_name(stem.name + ".npz").is_file():
                    probes[e.checkpoint] = load_probe(stem).direction
        if data:
            T = transfer_matrix(data, fold_map, config)
            C_probe = cosine_matrix(probes) if probes else None
            C_dom = cosine_matrix(dom)
            md += ["", f"Transfer at layer {L} (probe trained on the row's checkpoint, tested on the column's; "
                   "held-out puzzles; diagonal = own cross-validated AUROC):", "", frame_markdown(T), "",
                   f"![transfer]({save(heatmap(T, f'{target}: transfer AUROC, layer {L}', vmin=0.5, vmax=1.0, xlabel='test checkpoint', ylabel='train checkpoint'), f'transfer-{target}.png')})",
                   "", f"Cosine between difference-of-means directions at layer {L}:", "", frame_markdown(C_dom), "",
                   f"![cosine dom]({save(heatmap(C_dom, f'{target}: cosine of diff-of-means, layer {L}', vmin=-1, vmax=1, cmap='RdBu_r', xlabel='checkpoint', ylabel='checkpoint'), f'cosine-dom-{target}.png')})"]
            t_summary.update({"layer": L, "transfer": _records(T), "cosine_diff_of_means": _records(C_dom)})
            if C_probe is not None:
                md += ["", f"Cosine between probe directions (all-row fits) at layer {L}:", "",
                       frame_markdown(C_probe), "",
                       f"![cosine probe]({save(heatmap(C_probe, f'{target}: cosine of probe directions, layer {L}', vmin=-1, vmax=1, cmap='RdBu_r', xlabel='checkpoint', ylabel='checkpoint'), f'cosine-probe-{target}.png')})"]
                t_summary["cosine_probe"] = _records(C_probe)
        summary["targets"][target] = t_summary

    probe_root = out / "probes"
    for e in entries:
        if e.probe_dir is not None and Path(e.probe_dir).is_dir():
            dest = probe_root / safe_id(e.checkpoint)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(e.probe_dir, dest)
            files.probes.append(dest)
    if files.probes:
        md += ["", "## Saved probes", "",
               "All-row fits per checkpoint, target and layer under `probes/<checkpoint>/<target>/layer-XX.npz` "
               "(+ `.json` metadata); read one with `probes.fit.load_probe(path)`."]
    summary["per_checkpoint"] = {e.checkpoint: e.result for e in entries}
    atomic_write_text(files.summary, "\n".join(md) + "\n")
    atomic_write_text(files.results, json.dumps(json_safe(summary), indent=1, default=str) + "\n")
    return files


def _records(frame) -> dict:
    return {str(c): {str(i): (None if math.isnan(v) else float(v)) for i, v in frame[c].items()} for c in frame.columns}


