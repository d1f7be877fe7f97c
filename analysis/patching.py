"""Activation patching between the run's base and a checkpoint: which layer and component
carries the change in a decision?

The decision is how the think block opens: at the position right after `THINK_OPEN` a model
chooses between the careful opening (`THOROUGH_OPEN`) and the quick one (`QUICK_OPEN`); the
behaviour logit difference is logit(first token of the careful opening) - logit(first token of
the quick one) there. For each puzzle prompt of the puzzle set (up to `max_prompts`):

1. the checkpoint's forward pass (the "RL" run) is read at the decision position: the
   residual stream after each layer, each layer's attention output and its MLP output;
2. the base's forward pass on the same tokens gives the base's logit difference;
3. for each layer x component, the base runs again with that one activation at the decision
   position replaced by the checkpoint's (through nnsight), and its logit difference is read.

The share restored by a site is sum over prompts (LD_patched - LD_base) / sum (LD_rl -
LD_base), with a 95% bootstrap interval over prompts: 1 when the site alone carries the whole
difference, 0 when it carries none. A residual stream share reaching 1 at layer l means the
change is complete at that layer; attention and MLP shares say which block wrote it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.attention import ratio_bootstrap
from analysis.drift import references
from analysis.harness import (Analysis, AnalysisContext, HarnessError, load_model, register_analysis,
                              release_memory)
from train.generate import render_prompts
from train.layout import decoder_layers, decoder_layout
from train.prompts import QUICK_OPEN, THINK_OPEN, THOROUGH_OPEN

NAME = "patching"
COMPONENTS = ("residual", "attention", "mlp")


class PatchingError(HarnessError):
    pass


def _site(layer: Any, component: str) -> Any:
    """The nnsight proxy of one component's output in a decoder layer (batch, position, hidden);
    "heads": the attention heads' outputs before `o_proj` (batch, position, heads x head dim)."""
    if component == "residual":
        return layer.output
    if component == "attention":
        return layer.self_attn.output[0]
    if component == "heads":
        return layer.self_attn.o_proj.input
    return layer.mlp.output


def continuation_ids(tokenizer: Any, prefix: str, option: str) -> tuple[list[int], list[int]]:
    """(ids of `prefix`, ids of `option` written after it), when the tokenizer splits the two."""
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + option, add_special_tokens=False)["input_ids"]
    if full[:len(ids)] != ids or len(full) == len(ids):
        raise PatchingError(f"the tokenizer does not split {option[:30]!r} from the text before it: "
                            "no decision token")
    return ids, full[len(ids):]


def decision_tokens(tokenizer: Any, prefix: str, option_a: str, option_b: str) -> tuple[list[int], int, int]:
    """(ids of `prefix`, first token of `option_a` after it, first token of `option_b`)."""
    ids, a = continuation_ids(tokenizer, prefix, option_a)
    _, b = continuation_ids(tokenizer, prefix, option_b)
    if a[0] == b[0]:
        raise PatchingError(f"both openings start with the same token ({tokenizer.decode([a[0]])!r})")
    return ids, a[0], b[0]


def read_sites(lm: Any, ids: list[int], heads: bool = False) -> tuple[dict[tuple[int, str], Any], Any]:
    """Every layer's component outputs at the last position (with `heads`, its heads' outputs
    too), and the last position's logits."""
    import torch

    sites, device = {}, lm._module.device
    with torch.no_grad(), lm.trace(torch.tensor([ids], device=device), use_cache=False):
        for l, layer in enumerate(decoder_layers(lm)):   # forward order: heads, attention, MLP, layer output
            if heads:
                sites[(l, "heads")] = _site(layer, "heads")[0, -1].save()
            sites[(l, "attention")] = _site(layer, "attention")[0, -1].save()
            sites[(l, "mlp")] = _site(layer, "mlp")[0, -1].save()
            sites[(l, "residual")] = _site(layer, "residual")[0, -1].save()
        logits = lm.output.logits[0, -1].save()
    return sites, logits


def patched_logits(lm: Any, ids: list[int], layer_index: int, component: str, value: Any,
                   part: slice = slice(None)) -> Any:
    """The last position's logits with one component's output there (its columns `part`)
    replaced by `value`."""
    import torch

    with torch.no_grad(), lm.trace(torch.tensor([ids], device=lm._module.device), use_cache=False):
        _site(decoder_layers(lm)[layer_index], component)[0, -1, part] = value
        logits = lm.output.logits[0, -1].save()
    return logits


def patch_pairs(source: Any, target: Any, pairs: list[tuple[list[int], list[int], int, int]], *,
                heads: bool = False) -> dict:
    """For each (source ids, target ids, token_a, token_b): logit differences (token_a - token_b)
    at the last position of `source`, of `target`, and of `target` with each (layer, component)
    of `source` there patched in; with `heads`, also each attention head ("heads": one row of
    layers x heads per pair, layer-major)."""
    layout = decoder_layout(target)
    d = layout.d_head
    out = {"source": [], "target": [], "patched": {c: [] for c in COMPONENTS + (("heads",) if heads else ())}}
    for src_ids, tgt_ids, token_a, token_b in pairs:
        ld = lambda logits: float(logits[token_a] - logits[token_b])  # noqa: E731
        sites, logits = read_sites(source, src_ids, heads=heads)
        sites = {k: v.to(target._module.dtype) for k, v in sites.items()}
        out["source"].append(ld(logits))
        out["target"].append(ld(read_sites(target, tgt_ids)[1]))
        for c in COMPONENTS:
            out["patched"][c].append([ld(patched_logits(target, tgt_ids, l, c, sites[(l, c)]))
                                      for l in range(layout.n_layers)])
        if heads:
            out["patched"]["heads"].append([
                ld(patched_logits(target, tgt_ids, l, "heads", sites[(l, "heads")][h * d:(h + 1) * d],
                                  slice(h * d, (h + 1) * d)))
                for l in range(layout.n_layers) for h in range(layout.n_heads)])
    return out


def patch_prompts(source: Any, target: Any, prompts: list[list[int]], token_a: int, token_b: int) -> dict:
    """`patch_pairs` with the same prompt and decision tokens for both models."""
    return patch_pairs(source, target, [(ids, ids, token_a, token_b) for ids in prompts])


def restored_shares(lds: dict, *, n_boot: int, seed: int) -> dict:
    """Per component and layer, the share of the logit difference restored (ratio of sums over
    prompts, bootstrap interval over prompts)."""
    src, tgt = np.array(lds["source"]), np.array(lds["target"])
    den = src - tgt
    sign = -1.0 if den.sum() < 0 else 1.0          # the ratio, whichever way the checkpoint moved
    out = {}
    for c, rows in lds["patched"].items():
        num = np.array(rows) - tgt[:, None]
        out[c] = [ratio_bootstrap(sign * num[:, l], sign * den, n_boot, seed) for l in range(num.shape[1])]
    return out


@register_analysis
class PatchingAnalysis(Analysis):
    """Activation patching from a checkpoint into the run's base at the opening decision."""

    name = NAME
    title = "Activation patching against the base"
    order = 55
    by_default = False      # layers x 3 patched passes per prompt: run it by name
    version = 1
    uses_generations = False
    uses_model = True

    def __init__(self, max_prompts: int = 16, n_boot: int = 1000, seed: int = 0, option_a: str = THOROUGH_OPEN,
                 option_b: str = QUICK_OPEN, prefix: str = THINK_OPEN, registry: str | None = None):
        self.max_prompts, self.n_boot, self.seed = int(max_prompts), int(n_boot), int(seed)
        self.option_a, self.option_b, self.prefix, self.registry = str(option_a), str(option_b), str(prefix), registry
        if self.max_prompts < 1 or self.n_boot < 1:
            raise PatchingError("patching options: max_prompts and n_boot must be at least 1")

    def params(self) -> dict:
        return {"max_prompts": self.max_prompts, "n_boot": self.n_boot, "seed": self.seed,
                "option_a": self.option_a, "option_b": self.option_b, "prefix": self.prefix}

    def run(self, ctx: AnalysisContext) -> dict:
        lm = ctx.require_model()
        base = references(ctx, self.registry)["base"]
        style = ctx.config.generation.prompt_style
        prompts, token_a, token_b = [], None, None
        for text in render_prompts(ctx.tokenizer, ctx.puzzles[:self.max_prompts], style):
            ids, token_a, token_b = decision_tokens(ctx.tokenizer, text + self.prefix, self.option_a, self.option_b)
            prompts.append(ids)
        if base is None or base[0] == ctx.checkpoint.id:    # the base itself: its logit difference only
            lds = [float(logits[token_a] - logits[token_b]) for logits in (read_sites(lm, ids)[1] for ids in prompts)]
            return {"base": None, "logit_difference": {"checkpoint": lds}}
        base_lm, _ = load_model(base[1], ckpt_id=base[0], device=ctx.config.device, dtype=ctx.config.dtype)
        try:
            if decoder_layout(base_lm).n_layers != decoder_layout(lm).n_layers:
                raise PatchingError(f"{base[0]} and {ctx.checkpoint.id} have different numbers of layers")
            lds = patch_prompts(lm, base_lm, prompts, token_a, token_b)
        finally:
            del base_lm
            release_memory()
        shares = restored_shares(lds, n_boot=self.n_boot, seed=self.seed)
        best = max(((c, l, s) for c, rows in shares.items() if c != "residual" for l, s in enumerate(rows)
                    if s["mean"] is not None), key=lambda t: t[2]["mean"], default=None)
        return {"base": base[0], "n_prompts": len(prompts),
                "tokens": [ctx.tokenizer.decode([token_a]), ctx.tokenizer.decode([token_b])],
                "logit_difference": {"checkpoint": lds["source"], "base": lds["target"]},
                "patched": lds["patched"], "shares": shares,
                "top": None if best is None else {"component": best[0], "layer": best[1], **best[2]}}

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        if not result.get("base"):
            return "This is the run's base (or it has none): nothing to patch from.\n", []
        from matplotlib.figure import Figure

        ld = result["logit_difference"]
        shares = result["shares"]
        n_layers = len(shares["residual"])

        def cell(s: dict) -> str:
            return "–" if s["mean"] is None else f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"

        a, b = result["tokens"]
        lines = [f"Logit difference {a!r} - {b!r} after the think opening, {result['n_prompts']} prompts: this "
                 f"checkpoint {np.mean(ld['checkpoint']):.2f}, base ({result['base']}) {np.mean(ld['base']):.2f}. "
                 "Share of it restored when one activation of this checkpoint at the decision position replaces "
                 "the base's (ratio of sums over prompts [95% bootstrap interval over prompts]):", "",
                 "| layer | " + " | ".join(COMPONENTS) + " |", "|---|" + "---|" * len(COMPONENTS)]
        for l in range(n_layers):
            lines.append(f"| {l} | " + " | ".join(cell(shares[c][l]) for c in COMPONENTS) + " |")
        top = result.get("top")
        if top:
            lines += ["", f"Largest single block: layer {top['layer']} {top['component']} restores {top['mean']:.2f} "
                      f"[{top['lo']:.2f}, {top['hi']:.2f}]."]
        grid = np.array([[np.nan if s["mean"] is None else s["mean"] for s in shares[c]] for c in COMPONENTS]).T
        fig = Figure(figsize=(4.2, 0.35 * n_layers + 1.8), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(COMPONENTS)), COMPONENTS)
        ax.set_yticks(range(n_layers))
        ax.set_ylabel("layer")
        ax.set_title(f"share of the {a!r} vs {b!r} difference restored", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        return "\n".join(lines) + "\n", [("Activation patching: share restored per layer and component", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        if "logit_difference" not in result:
            return {}
        out = {"opening logit difference (careful - quick)": float(np.mean(result["logit_difference"]["checkpoint"]))}
        if not result.get("base"):
            return out
        top = result.get("top")
        if top:
            out["patching: largest share restored by one block"] = top["mean"]
            out["patching: largest share restored by one block@lo"] = top["lo"]
            out["patching: largest share restored by one block@hi"] = top["hi"]
        for c in ("attention", "mlp"):
            rows = [s for s in result["shares"][c] if s["mean"] is not None]
            if rows:
                out[f"patching: {c} share, summed over layers"] = float(sum(s["mean"] for s in rows))
        return out
