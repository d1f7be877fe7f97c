"""Training figures: the seed's four panels and the response-length curve, stage boundaries marked."""

from __future__ import annotations

from pathlib import Path

from train.registry import read_metrics

PANELS = (("reward", "mean reward"), ("correct", "fully correct"),
          ("format_error", "format error"), ("wrong", "wrong answer"))


def stage_boundaries(df) -> list[tuple[str, int]]:
    """(stage, first global step) for each stage after the first."""
    firsts = df.groupby("stage", sort=False)["global_step"].min().sort_values()
    return [(s, int(v) - 1) for s, v in firsts.items()][1:]


def training_figure(metrics_file: str | Path, out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = read_metrics(metrics_file)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for ax, (col, label) in zip(axes, PANELS):
        if col in df:
            sns.lineplot(data=df, x="global_step", y=col, hue="stage", ax=ax, legend=ax is axes[0])
        ax.set_title(label)
        ax.set_ylabel("")
    ax = axes[4]
    if "length_mean" in df:
        ax.plot(df["global_step"], df["length_mean"], label="mean")
        if {"length_min", "length_max"} <= set(df):
            ax.fill_between(df["global_step"], df["length_min"], df["length_max"], alpha=0.2, label="min-max")
        ax.legend(loc="upper left")
    ax.set_title("response length (tokens)")
    for ax in axes:
        for stage, x in stage_boundaries(df):
            ax.axvline(x + 0.5, color="grey", ls="--", lw=1)
        ax.set_xlabel("global step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
