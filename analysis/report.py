"""Reports: one self-contained HTML page and one Markdown summary per checkpoint, and an
index with trends across checkpoints.

    files = write_reports(outcomes, analyses, "reports")
    files.index_html, files.pages["kk-tiny/stage1/step-000010"]

Each analysis contributes a section through `Analysis.report_section(result)` (Markdown
plus figures) and trend lines through `Analysis.trend_metrics(result)`. HTML pages embed
their figures as base64 PNG; Markdown summaries link PNG files under `figures/`. The index
plots every trend metric over global step (one panel each, one line per run, shaded where a
metric reports `@lo`/`@hi` companions) with stage boundaries as dashed vertical lines, and
writes the numbers to `trends.csv`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from analysis.cache import atomic_write_text, safe_id
from analysis.harness import Analysis, CheckpointOutcome

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
figure { margin: 1em 0; } figcaption { font-size: .85em; color: #555; }
img { max-width: 100%; }
code, pre { background: #f6f6f6; font-size: .85em; } pre { padding: .6em; overflow-x: auto; }
.error { color: #b00; } .meta td:first-child { font-weight: 600; }
"""


@dataclass
class ReportFiles:
    index_html: Path
    index_md: Path
    trends_csv: Path
    pages: dict[str, tuple[Path, Path]] = field(default_factory=dict)   # ckpt id -> (html, md)


# --------------------------------------------------------------------------- helpers

def markdown_to_html(md: str) -> str:
    """CommonMark with tables; raw HTML in the Markdown is escaped (model text is quoted in it)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(md)


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _figures(figs: Sequence[Any]) -> list[tuple[str, Any]]:
    return [f if isinstance(f, tuple) else ("", f) for f in figs]


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _img_html(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{cap}</figure>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return "–" if v is None else str(v)


def _metadata(outcome: CheckpointOutcome) -> list[tuple[str, str]]:
    ck = outcome.checkpoint
    rows = [("id", ck.id), ("run", ck.run), ("stage", ck.stage), ("global step", str(ck.global_step)),
            ("path", ck.path), ("parent", ck.parent or "–")]
    if ck.sampling:
        rows.append(("sampling", ", ".join(f"{k}={v}" for k, v in ck.sampling.items())))
    if ck.lr is not None:
        rows.append(("lr", f"{ck.lr:g}"))
    if ck.preset:
        rows.append(("preset", ck.preset))
    if ck.metrics:
        rows.append(("training metrics", ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(ck.metrics.items())
                                                   if not isinstance(v, (dict, list)))))
    if ck.eval:
        rows.append(("evaluation", ", ".join(f"{k}={_fmt(v)}" for k, v in ck.eval.items()
                                             if not isinstance(v, (dict, list)))))
    if outcome.computed:
        rows.append(("computed in this run", ", ".join(outcome.computed)))
    return rows


# --------------------------------------------------------------------------- per checkpoint

def checkpoint_report(outcome: CheckpointOutcome, analyses: Sequence[Analysis],
                      out_dir: str | Path) -> tuple[Path, Path]:
    """Write `<out>/<id>.html` (self-contained) and `<out>/<id>.md` (+ figures/<id>/*.png)."""
    out_dir = Path(out_dir)
    sid = safe_id(outcome.checkpoint.id)
    fig_dir = out_dir / "figures" / sid
    title = f"Checkpoint {outcome.checkpoint.id}"
    meta = _metadata(outcome)

    html_parts = [f"<h1>{html.escape(title)}</h1>", '<p><a href="index.html">← all checkpoints</a></p>',
                  '<table class="meta">' + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                                   for k, v in meta) + "</table>"]
    md_parts = [f"# {title}\n", "[all checkpoints](index.md)\n", "| field | value |\n|---|---|"]
    md_parts += [f"| {k} | {v.replace('|', '/')} |" for k, v in meta]
    md_parts.append("")
    if outcome.error:
        html_parts.append(f'<p class="error">{html.escape(outcome.error)}</p>')
        md_parts.append(f"**error:** {outcome.error}\n")

    for a in sorted(analyses, key=lambda a: (a.order, a.name)):
        result = outcome.results.get(a.name)
        if result is None:
            continue
        md, figs = a.report_section(result)
        heading = a.title or a.name
        html_parts += [f'<h2 id="{html.escape(a.name)}">{html.escape(heading)}</h2>', markdown_to_html(md)]
        md_parts += [f"## {heading}\n", md]
        for i, (caption, fig) in enumerate(_figures(figs)):
            png = figure_png(fig)
            html_parts.append(_img_html(png, caption))
            fig_dir.mkdir(parents=True, exist_ok=True)
            png_path = fig_dir / f"{a.name}-{i}.png"
            png_path.write_bytes(png)
            md_parts.append(f"![{caption}](figures/{sid}/{png_path.name})\n")

    html_path, md_path = out_dir / f"{sid}.html", out_dir / f"{sid}.md"
    atomic_write_text(html_path, _page(title, "\n".join(html_parts)))
    atomic_write_text(md_path, "\n".join(md_parts) + "\n")
    return html_path, md_path


# --------------------------------------------------------------------------- trends

EVAL_METRIC = "held-out accuracy (evaluation)"


def trend_frame(outcomes: Sequence[CheckpointOutcome], analyses: Sequence[Analysis]):
    """Long table of every trend metric: checkpoint, run, stage, global_step, analysis,
    metric, value, lo, hi (NaN where no interval)."""
    import pandas as pd

    rows = []
    for o in outcomes:
        ck = o.checkpoint
        base = {"checkpoint": ck.id, "run": ck.run, "stage": ck.stage, "global_step": ck.global_step}
        for a in analyses:
            if a.name not in o.results:
                continue
            metrics = a.trend_metrics(o.results[a.name])
            for label, value in metrics.items():
                if "@" in label or value is None:
                    continue
                rows.append({**base, "analysis": a.name, "metric": label, "value": float(value),
                             "lo": float(metrics.get(label + "@lo", math.nan)),
                             "hi": float(metrics.get(label + "@hi", math.nan))})
        acc = (ck.eval or {}).get("accuracy")
        if isinstance(acc, (int, float)):
            rows.append({**base, "analysis": "eval", "metric": EVAL_METRIC,
                         "value": float(acc), "lo": math.nan, "hi": math.nan})
    return pd.DataFrame(rows, columns=["checkpoint", "run", "stage", "global_step", "analysis", "metric",
                                       "value", "lo", "hi"])


def stage_boundaries(outcomes: Sequence[CheckpointOutcome]) -> list[tuple[str, int, str]]:
    """(run, global step, new stage) wherever the stage changes along a run's steps."""
    by_run: dict[str, list] = {}
    for o in outcomes:
        by_run.setdefault(o.checkpoint.run, []).append(o.checkpoint)
    out = []
    for run, cks in by_run.items():
        cks = sorted(cks, key=lambda c: c.global_step)
        for prev, cur in zip(cks, cks[1:]):
            if cur.stage != prev.stage:
                out.append((run, cur.global_step, cur.stage))
    return out


def trend_figure(frame, boundaries: Sequence[tuple[str, int, str]], ncols: int = 3, shifts=None, reference=None):
    """One panel per metric: value over global step, one line per run. `shifts` (a
    `change_point_table`) marks each metric's own level shifts (red dotted lines, triangles on
    the curve); `reference` (rows of the same table) shades the reference series' shifts in
    every panel, so the panels can be read against it."""
    import seaborn as sns
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(frame["metric"]))
    ncols = max(1, min(ncols, len(metrics)))
    nrows = max(1, math.ceil(len(metrics) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    runs = list(dict.fromkeys(frame["run"]))
    colors = dict(zip(runs, sns.color_palette("deep", max(len(runs), 1))))
    for ax, metric in zip(axes, metrics):
        sub = frame[frame["metric"] == metric].sort_values("global_step")
        for run, part in sub.groupby("run", sort=False):
            ax.plot(part["global_step"], part["value"], marker="o", ms=4, color=colors[run], label=run)
            band = part.dropna(subset=["lo", "hi"])
            if len(band):
                ax.fill_between(band["global_step"], band["lo"], band["hi"], color=colors[run], alpha=0.2)
        if reference is not None:
            for step in sorted(set(reference["step"])):
                ax.axvline(step, color="orange", lw=4, alpha=0.25)
        if shifts is not None:
            own = shifts[shifts["metric"] == metric]
            for _, s in own.iterrows():
                ax.axvline(s["step"], color="red", ls=":", lw=1.2)
                ax.plot([s["step"]], [s["after"]], marker="v", color="red", ms=6)
        for run, step, stage in boundaries:
            ax.axvline(step, color="grey", ls="--", lw=0.8)
            ax.text(step, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="grey", va="top", ha="left")
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("global step")
        ax.tick_params(labelsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if len(runs) > 1 and metrics:
        axes[0].legend(fontsize=7)
    return fig


def index_report(outcomes: Sequence[CheckpointOutcome], analyses: Sequence[Analysis], out_dir: str | Path,
                 pages: dict[str, tuple[Path, Path]], training=None) -> tuple[Path, Path, Path]:
    """Write `<out>/index.html`, `<out>/index.md` and `<out>/trends.csv`; with `training` (a
    `changepoints.training_frame`) also the training curves, and the level shifts of both."""
    from analysis.changepoints import REFERENCE_METRIC, change_point_markdown, change_point_table

    out_dir = Path(out_dir)
    frame = trend_frame(outcomes, analyses)
    shifts = change_point_table(frame, training)
    reference = shifts[(shifts["source"] == "training") & (shifts["metric"] == REFERENCE_METRIC)]
    csv_path = out_dir / "trends.csv"
    atomic_write_text(csv_path, frame.to_csv(index=False))

    wide = (frame.pivot_table(index="checkpoint", columns="metric", values=["value", "lo", "hi"], aggfunc="first")
            if len(frame) else None)
    metrics = list(dict.fromkeys(frame["metric"])) if len(frame) else []
    evaluated = [m for m in metrics if m == EVAL_METRIC]
    headline = (evaluated + [m for m in metrics if m != EVAL_METRIC])[:7]

    def cell(ck_id: str, metric: str) -> str:
        def get(kind: str) -> float:
            if wide is None or ck_id not in wide.index or (kind, metric) not in wide.columns:
                return math.nan
            return float(wide.loc[ck_id, (kind, metric)])

        value, lo, hi = get("value"), get("lo"), get("hi")
        if math.isnan(value):
            return "–"
        return _fmt(value) + (f" [{_fmt(lo)}, {_fmt(hi)}]" if not (math.isnan(lo) or math.isnan(hi)) else "")

    head = ["checkpoint", "run", "stage", "step"] + headline
    table_md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table_html = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for o in outcomes:
        ck = o.checkpoint
        vals = [cell(ck.id, m) for m in headline]
        if ck.id in pages:
            h, m = pages[ck.id]
            link_md, link_html = f"[{ck.id}]({m.name})", f'<a href="{html.escape(h.name)}">{html.escape(ck.id)}</a>'
        else:
            link_md, link_html = ck.id, html.escape(ck.id)
        cells = [ck.run, ck.stage, str(ck.global_step)] + vals
        table_md.append("| " + " | ".join([link_md] + cells) + " |")
        table_html.append(f"<tr><td>{link_html}</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    table_html.append("</table>")
    failed = [o for o in outcomes if o.error]

    title = "Checkpoint analysis"
    note = "Cells: value [95% interval] where the analysis gives one."
    md = [f"# {title}\n", f"{len(outcomes)} checkpoints, {len(failed)} failed. {note}\n", *table_md, ""]
    body = [f"<h1>{title}</h1>", f"<p>{len(outcomes)} checkpoints, {len(failed)} failed. {note}</p>",
            "".join(table_html)]
    if failed:
        md += ["## Failed\n"] + [f"- {o.error}" for o in failed] + [""]
        body += ["<h2>Failed</h2><ul>"] + [f'<li class="error">{html.escape(o.error)}</li>' for o in failed] + ["</ul>"]
    boundaries = stage_boundaries([o for o in outcomes if not o.error])
    panels = [(frame, shifts[shifts["source"] == "analysis"], "trends",
               "Trends over global step (dashed lines: stage boundaries; bands: 95% intervals; red dotted lines "
               f"and triangles: the metric's level shifts; orange: the {REFERENCE_METRIC} shifts of training)")]
    if training is not None and len(training):
        panels.append((training.assign(lo=math.nan, hi=math.nan), shifts[shifts["source"] == "training"], "training",
                       "Training metrics per step (red dotted lines and triangles: level shifts)"))
    for data, own, name, caption in panels:
        if not len(data):
            continue
        png = figure_png(trend_figure(data, boundaries, shifts=own, reference=reference))
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
        (out_dir / "figures" / f"{name}.png").write_bytes(png)
        heading = "Trends" if name == "trends" else "Training"
        md += [f"## {heading}\n", f"![{caption}](figures/{name}.png)\n"]
        body += [f"<h2>{heading}</h2>", _img_html(png, caption)]
        if name == "trends":
            md.append("Numbers: [trends.csv](trends.csv)\n")
            body.append('<p>Numbers: <a href="trends.csv">trends.csv</a></p>')
    if len(frame) or (training is not None and len(training)):
        table = change_point_markdown(shifts)
        md += ["## Change points\n", table]
        body += ["<h2>Change points</h2>", markdown_to_html(table)]
    html_path, md_path = out_dir / "index.html", out_dir / "index.md"
    atomic_write_text(html_path, _page(title, "\n".join(body)))
    atomic_write_text(md_path, "\n".join(md) + "\n")
    return html_path, md_path, csv_path


MANIFEST = "index.json"       # which checkpoints and analyses an index covers


def indexed_checkpoints(out_dir: str | Path) -> list[str]:
    """The checkpoint ids an existing index in `out_dir` covers ([] for none or an unreadable one)."""
    import json

    try:
        ids = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8")).get("checkpoints", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [i for i in ids if isinstance(i, str)]


def write_reports(outcomes: Sequence[CheckpointOutcome], analyses: Sequence[Analysis],
                  out_dir: str | Path, training=None) -> ReportFiles:
    """Per-checkpoint pages for every outcome with results, then the index (and its manifest);
    `training`: the runs' training metrics (`changepoints.training_frame`) for the index."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pages = {o.checkpoint.id: checkpoint_report(o, analyses, out_dir) for o in outcomes if o.results}
    index_html, index_md, csv_path = index_report(outcomes, analyses, out_dir, pages, training=training)
    atomic_write_text(out_dir / MANIFEST, json.dumps({"checkpoints": [o.checkpoint.id for o in outcomes],
                                                      "analyses": [a.name for a in analyses]}, indent=1) + "\n")
    return ReportFiles(index_html=index_html, index_md=index_md, trends_csv=csv_path, pages=pages)
