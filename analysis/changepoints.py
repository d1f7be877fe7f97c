"""Change points on the step axis: where a metric's level shifts, for the training metrics of
a run (`runs/<run>/metrics.jsonl`) and the analyses' trend metrics alike, so the report can
show whether an analysis metric moves before, with or after the reward jumps.

    shifts = level_shifts(steps, values)                 # [{"step", "before", "after"}, ...]
    table = change_point_table(trends, training)         # every series of both frames

The detector is `ruptures`' PELT with the l2 (mean-shift) cost on the series divided by its
noise level (the median absolute first difference, scaled to a standard deviation), with
penalty `penalty * log(n)`: a shift is kept when it explains more than that many noise
variances. A shift's step is the first step of the new level.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from train.errors import UserError

TRAINING_METRICS = ("reward", "correct", "format_error", "wrong", "length_mean", "kl", "entropy")
REFERENCE_METRIC = "reward"          # the training series other shifts are aligned with
DEFAULT_PENALTY = 5.0
DEFAULT_MIN_SIZE = 2


class ChangePointError(UserError, ValueError):
    pass


def noise_level(values: np.ndarray) -> float:
    """Standard deviation of the noise around a piecewise-constant level, from the median
    absolute first difference (robust to the shifts themselves), at least 0.1% of the largest
    magnitude; 0 for a constant series."""
    diffs = np.abs(np.diff(values))
    sigma = 1.4826 * float(np.median(diffs)) / math.sqrt(2) if len(diffs) else 0.0
    if not len(diffs) or diffs.max() == 0:
        return 0.0
    # A floor of 0.1% of the series' scale: rounding-level wiggles of a flat series are no shift,
    # and a noiseless step series keeps every shift of 1% or more.
    return max(sigma, 1e-3 * float(np.abs(values).max()))


def level_shifts(steps: Sequence[float], values: Sequence[float], *, penalty: float = DEFAULT_PENALTY,
                 min_size: int = DEFAULT_MIN_SIZE) -> list[dict[str, float]]:
    """The steps where the level of `values` (ordered by `steps`) shifts; each with the mean
    level before and after. NaNs are dropped; too short or constant series have none."""
    import ruptures as rpt

    if penalty <= 0 or min_size < 1:
        raise ChangePointError(f"change points: penalty must be > 0 and min_size >= 1 (got {penalty}, {min_size})")
    pairs = sorted((float(s), float(v)) for s, v in zip(steps, values) if v is not None and np.isfinite(v))
    if len(pairs) < 2 * min_size:
        return []
    x = np.array([s for s, _ in pairs])
    y = np.array([v for _, v in pairs])
    sigma = noise_level(y)
    if sigma == 0:
        return []
    ends = rpt.Pelt(model="l2", min_size=min_size, jump=1).fit(y / sigma).predict(pen=penalty * math.log(len(y)))
    bounds = [0] + list(ends)
    return [{"step": float(x[b]), "before": float(y[a:b].mean()), "after": float(y[b:c].mean())}
            for a, b, c in zip(bounds, bounds[1:], bounds[2:])]


def training_frame(registry: Any, runs: Iterable[str], metrics: Sequence[str] = TRAINING_METRICS):
    """Long table (run, global_step, metric, value) of the runs' training metrics, for the runs
    trained here (a run without `metrics.jsonl` is left out)."""
    import pandas as pd

    from train.registry import metrics_file, read_metrics

    parts = []
    for run in sorted(set(runs)):
        try:
            df = read_metrics(metrics_file(registry, run))
        except (UserError, OSError, ValueError):
            continue
        keep = [m for m in metrics if m in df.columns]
        if df.empty or not keep:
            continue
        long = df.melt(id_vars=["global_step"], value_vars=keep, var_name="metric", value_name="value")
        parts.append(long.assign(run=run))
    if not parts:
        return pd.DataFrame(columns=["run", "global_step", "metric", "value"])
    return pd.concat(parts, ignore_index=True)[["run", "global_step", "metric", "value"]]


def change_point_table(trends, training=None, *, penalty: float = DEFAULT_PENALTY, min_size: int = DEFAULT_MIN_SIZE,
                       reference: str = REFERENCE_METRIC):
    """One row per level shift of every (run, metric) series of the trend frame (source
    "analysis") and the training frame (source "training"), with the signed step offset to the
    nearest shift of the run's `reference` training metric (negative: before it)."""
    import pandas as pd

    rows = []
    for source, frame in (("training", training), ("analysis", trends)):
        if frame is None or not len(frame):
            continue
        for (run, metric), part in frame.groupby(["run", "metric"], sort=False):
            for s in level_shifts(part["global_step"], part["value"], penalty=penalty, min_size=min_size):
                rows.append({"source": source, "run": run, "metric": metric, **s})
    table = pd.DataFrame(rows, columns=["source", "run", "metric", "step", "before", "after"])
    ref = table[(table["source"] == "training") & (table["metric"] == reference)]

    def offset(row) -> float:
        steps = ref.loc[ref["run"] == row["run"], "step"].to_numpy()
        if not len(steps):
            return math.nan
        return float(row["step"] - steps[np.argmin(np.abs(steps - row["step"]))])

    table[f"vs {reference} shift"] = [offset(r) for _, r in table.iterrows()] if len(table) else []
    return table


def change_point_markdown(table, reference: str = REFERENCE_METRIC) -> str:
    """The change-point table of the index report."""
    if not len(table):
        return "No level shift found in any series.\n"
    col = f"vs {reference} shift"
    lines = [f"Level shifts (ruptures PELT, mean-shift cost on the series over its noise level, penalty "
             f"{DEFAULT_PENALTY:g}·log n). Offset: steps from the nearest {reference} shift of the run (negative: "
             "before it).", "",
             "| source | run | metric | step | level before → after | " + col + " |", "|---|---|---|---|---|---|"]
    for _, r in table.sort_values(["run", "step", "source"]).iterrows():
        off = "–" if math.isnan(r[col]) else f"{r[col]:+g}"
        lines.append(f"| {r['source']} | {r['run']} | {r['metric']} | {r['step']:g} | "
                     f"{r['before']:.4g} → {r['after']:.4g} | {off} |")
    return "\n".join(lines) + "\n"
