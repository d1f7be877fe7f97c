"""Steering vectors with dose-response at the opening decision: can the careful way be turned
on or off, and does RL repurpose a direction the base already had?

The decision is the one activation patching reads (`analysis.patching`): right after
`THINK_OPEN` a model opens its thinking the careful way (`THOROUGH_OPEN`) or the quick way
(`QUICK_OPEN`).

Direction (difference of means, after Venhoff et al. 2025): for each of `direction_prompts`
puzzles (held-out puzzles of another seed than the puzzle set's, none of them in it), the
prompt + `THINK_OPEN` is followed once by the careful opening and once by the quick one; the
residual stream after each layer is averaged over the opening's tokens. Per layer

    direction[l] = mean over puzzles (careful states) - mean over puzzles (quick states)   (d_model,)

so alpha = 1 moves a state by the whole careful-minus-quick difference of that layer.

Steering adds alpha * direction[layer] to the residual stream after `layer` at every position
(a forward hook on the block), and measures over the first `max_prompts` puzzles of the puzzle
set, for each alpha:

* the opening logit difference logit(careful's first token) - logit(quick's) at the decision
  position, and the share of prompts where it is positive (the greedy choice);
* with `generate`: the checkpoint's responses under the report's generation settings, the share
  that open the careful way and the accuracy.

Transfer, for a checkpoint of a run with a base: the base's direction steering this checkpoint,
and this checkpoint's direction steering the base, with the cosine of the two directions per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from analysis.behaviours import mean_ci, wilson
from analysis.drift import references
from analysis.harness import (Analysis, AnalysisContext, HarnessError, generation_records, load_model,
                              register_analysis, release_memory)
from analysis.patching import continuation_ids, decision_tokens
from train.evaluate import heldout_puzzles
from train.generate import generate, render_prompts
from train.layout import decoder_layers, decoder_layout
from train.prompts import QUICK_OPEN, THINK_OPEN, THOROUGH_OPEN

NAME = "steering"
CURVES = ("own", "base_on_this", "this_on_base")
CURVE_TITLES = {"own": "this checkpoint's direction", "base_on_this": "the base's direction on this checkpoint",
                "this_on_base": "this checkpoint's direction on the base"}
WHERE = {"decision": "at the positions that make the decision (the prompt's last and the think opening's)",
         "response": "at the prompt's last position and every response position",
         "all": "at every position, the prompt's too"}
DIRECTION_SEED = 20_251       # held-out puzzles for the directions, apart from the puzzle set's


class SteeringError(HarnessError):
    pass


def parse_alphas(text: str) -> list[float]:
    """'-2,-1,0,1,2' -> sorted distinct floats, 0 always included (the unsteered reference)."""
    try:
        values = {float(x) for x in str(text).split(",") if x.strip()}
    except ValueError:
        raise SteeringError(f"--set steering.alphas={text!r}: expected numbers separated by commas") from None
    if not values or not all(np.isfinite(v) for v in values):
        raise SteeringError(f"--set steering.alphas={text!r}: expected finite numbers separated by commas")
    return sorted(values | {0.0})


# --------------------------------------------------------------------------- directions

def _block_output(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def opening_states(model: Any, prompt_ids: Sequence[list[int]], option_ids: Sequence[list[int]]) -> np.ndarray:
    """The residual stream after each layer, averaged over the option's tokens that follow each
    prompt: (n_prompts, n_layers, d_model), float64."""
    import torch

    hf = getattr(model, "_module", model)
    layers = decoder_layers(hf)
    out = np.zeros((len(prompt_ids), len(layers), hf.config.hidden_size))
    for i, (ids, opt) in enumerate(zip(prompt_ids, option_ids)):
        states: dict[int, Any] = {}
        hooks = [layer.register_forward_hook(
            lambda _m, _i, o, l=l: states.__setitem__(l, _block_output(o)[0, len(ids):].float().mean(0)))
            for l, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                hf(torch.tensor([ids + opt], device=hf.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        out[i] = np.stack([states[l].cpu().numpy() for l in range(len(layers))])
    return out


def opening_directions(model: Any, tokenizer: Any, prompts: Sequence[str], prefix: str, option_a: str,
                       option_b: str) -> tuple[np.ndarray, np.ndarray]:
    """(directions (n_layers, d_model): mean state after option_a - after option_b,
    mean residual norm per layer over both)."""
    starts, with_a, with_b = [], [], []
    for text in prompts:
        ids, a = continuation_ids(tokenizer, text + prefix, option_a)
        starts.append(ids)
        with_a.append(a)
        with_b.append(continuation_ids(tokenizer, text + prefix, option_b)[1])
    a, b = opening_states(model, starts, with_a), opening_states(model, starts, with_b)
    norms = np.linalg.norm(np.concatenate([a, b]), axis=-1).mean(0)
    return a.mean(0) - b.mean(0), norms


POSITIONS = ("decision", "response", "all")


@dataclass(frozen=True)
class Steering:
    """alpha * direction added to the residual stream after `layer`, at `positions`: "decision"
    the prompt's last position and the response's first `decision_len` (the prefix's tokens): a
    model that writes the prefix decides at its last token, one that skips it at the prompt's
    end; "response" those and every later position; "all" the prompt's as well."""

    layer: int
    vector: np.ndarray          # (d_model,), alpha included
    positions: str = "decision"
    decision_len: int = 1


@contextlib.contextmanager
def steered(model: Any, steering: Steering | None, start: int | None = None) -> Iterator[None]:
    """Within the block every forward pass of `model` is steered. A pass over several tokens
    starts a sequence (the whole text, or a generation's prompt); single-token passes continue
    it. The response starts at `start`, or after the first pass when None (generation)."""
    import torch

    if steering is None:
        yield
        return
    hf = getattr(model, "_module", model)
    p = next(hf.parameters())
    v = torch.as_tensor(steering.vector, dtype=p.dtype, device=p.device)
    state = {"seen": 0, "start": 0}

    def add(_module: Any, _inputs: Any, output: Any) -> Any:
        h = _block_output(output)
        n = h.shape[1]
        if n > 1 or state["seen"] == 0:
            state["seen"], state["start"] = 0, (n if start is None else start)
        seen = state["seen"]
        state["seen"] += n
        # The last prompt position chooses the response's first token: it is part of the decision.
        lo = 0 if steering.positions == "all" else max(0, state["start"] - 1)
        hi = state["start"] + steering.decision_len if steering.positions == "decision" else seen + n
        a, b = max(lo, seen) - seen, min(hi, seen + n) - seen
        if a >= b:
            return output
        h = h.clone()
        h[:, a:b] += v
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = decoder_layers(hf)[steering.layer].register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- dose-response

def opening_logit_differences(model: Any, prompt_ids: Sequence[list[int]], starts: Sequence[int], token_a: int,
                              token_b: int, steering: Steering | None = None) -> list[float]:
    """logit(token_a) - logit(token_b) at the last position of each prompt (prompt + prefix,
    the response starting at `starts[i]`), steered."""
    import torch

    hf = getattr(model, "_module", model)
    out = []
    with torch.no_grad():
        for ids, start in zip(prompt_ids, starts):
            with steered(hf, steering, start):
                logits = hf(torch.tensor([ids], device=hf.device), use_cache=False).logits[0, -1].float()
            out.append(float(logits[token_a] - logits[token_b]))
    return out


def opens_with(text: str, prefix: str, option: str) -> bool:
    """Whether a response's thinking opens with `option` (after `prefix`, when the response has it)."""
    body = text[len(prefix.strip()):] if text.startswith(prefix.strip()) else text
    return body.lstrip().startswith(option.strip())


def _rate(flags: Sequence[bool]) -> dict:
    k, n = int(sum(flags)), len(flags)
    ci = wilson(k, n)
    return {"mean": k / n if n else None, "lo": ci[0] if ci else None, "hi": ci[1] if ci else None}


def _mean(values: Sequence[float]) -> dict:
    x = np.asarray(values, dtype=float)
    ci = mean_ci(x)
    return {"mean": float(x.mean()), "lo": ci[0] if ci else None, "hi": ci[1] if ci else None}


def shift_alpha(curve: dict, shift: float) -> dict | None:
    """The alpha of the smallest size whose rate moves from alpha 0's by `shift` or more in the
    shift's direction (positive alphas for +, negative for -), with its rate and accuracy."""
    alphas, rates = curve["alpha"], [r["mean"] for r in curve["opens_careful"]]
    zero = rates[alphas.index(0.0)]
    side = [i for i, a in enumerate(alphas) if (a > 0 if shift > 0 else a < 0)]
    for i in sorted(side, key=lambda i: abs(alphas[i])):
        if (rates[i] - zero) * np.sign(shift) >= abs(shift) - 1e-12:
            return {"alpha": alphas[i], "rate": rates[i], "rate_at_0": zero,
                    "accuracy": curve["accuracy"][i]["mean"], "accuracy_at_0": curve["accuracy"][alphas.index(0.0)]["mean"]}
    return None


# --------------------------------------------------------------------------- the analysis

@register_analysis
class SteeringAnalysis(Analysis):
    """Difference-of-means steering of the opening decision, with dose-response and transfer."""

    name = NAME
    title = "Steering the opening decision"
    order = 56
    by_default = False      # alphas x prompts generations, three curves per checkpoint: run it by name
    version = 1
    uses_generations = False
    uses_model = True

    def __init__(self, layer: int = -1, alphas: str = "-4,-2,-1,0,1,2,4", positions: str = "decision",
                 max_prompts: int = 16, direction_prompts: int = 32, generate: bool = True, transfer: bool = True,
                 option_a: str = THOROUGH_OPEN, option_b: str = QUICK_OPEN, prefix: str = THINK_OPEN,
                 registry: str | None = None):
        self.layer, self.alphas, self.positions = int(layer), parse_alphas(alphas), str(positions)
        if self.positions not in POSITIONS:
            raise SteeringError(f"--set steering.positions={positions!r}: use {', '.join(POSITIONS)}")
        self.max_prompts, self.direction_prompts = int(max_prompts), int(direction_prompts)
        self.generate, self.transfer = bool(generate), bool(transfer)
        self.option_a, self.option_b, self.prefix, self.registry = str(option_a), str(option_b), str(prefix), registry
        if self.max_prompts < 1 or self.direction_prompts < 1:
            raise SteeringError("steering options: max_prompts and direction_prompts must be at least 1")

    def params(self) -> dict:
        return {"layer": self.layer, "alphas": self.alphas, "positions": self.positions, "max_prompts": self.max_prompts,
                "direction_prompts": self.direction_prompts, "generate": self.generate, "transfer": self.transfer,
                "option_a": self.option_a, "option_b": self.option_b, "prefix": self.prefix}

    def _layer(self, n_layers: int) -> int:
        layer = n_layers // 2 if self.layer == -1 else self.layer
        if not 0 <= layer < n_layers:
            raise SteeringError(f"--set steering.layer={self.layer}: the model has layers 0-{n_layers - 1} "
                                "(-1 = the middle one)")
        return layer

    def run(self, ctx: AnalysisContext) -> dict:
        lm = ctx.require_model()
        n_layers = decoder_layout(lm).n_layers
        layer = self._layer(n_layers)
        style, g = ctx.config.generation.prompt_style, ctx.config.generation
        puzzles = ctx.puzzles[:self.max_prompts]
        sizes = sorted({p.people for p in ctx.puzzles})
        per_size = -(-self.direction_prompts // len(sizes))
        fitting = heldout_puzzles(sizes, per_size, DIRECTION_SEED, exclude={p.content_key for p in ctx.puzzles},
                                  fixed_cast=ctx.config.puzzles.fixed_cast)[:self.direction_prompts]
        direction_texts = render_prompts(ctx.tokenizer, fitting, style)
        prompts = render_prompts(ctx.tokenizer, puzzles, style)
        prompt_ids, starts, token_a, token_b = [], [], None, None
        for text in prompts:
            ids, token_a, token_b = decision_tokens(ctx.tokenizer, text + self.prefix, self.option_a, self.option_b)
            prompt_ids.append(ids)
            starts.append(len(ctx.tokenizer(text, add_special_tokens=False)["input_ids"]))
        decision_len = max(1, len(prompt_ids[0]) - starts[0])     # the prefix's tokens

        unsteered: dict[int, dict] = {}     # alpha 0 is the same point on every curve of a model

        def point(model: Any, steering: Steering | None) -> dict:
            if steering is None and id(model) in unsteered:
                return unsteered[id(model)]
            lds = opening_logit_differences(model, prompt_ids, starts, token_a, token_b, steering)
            out = {"logit_difference": _mean(lds), "prefers_careful": _rate([x > 0 for x in lds])}
            if self.generate:
                with steered(model, steering):
                    outs = generate(getattr(model, "_module", model), ctx.tokenizer, prompts,
                                    max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                    top_k=g.top_k, batch_size=g.batch_size, seed=g.seed,
                                    progress=ctx.progress if ctx.progress is not None else False)
                records = generation_records(puzzles, outs, style)
                out["opens_careful"] = _rate([opens_with(r["text"], self.prefix, self.option_a) for r in records])
                out["opens_quick"] = _rate([opens_with(r["text"], self.prefix, self.option_b) for r in records])
                out["accuracy"] = _rate([r["correct"] for r in records])
            if steering is None:
                unsteered[id(model)] = out
            return out

        def dose_response(model: Any, vector: np.ndarray) -> dict:
            curve: dict[str, Any] = {"alpha": self.alphas, "logit_difference": [], "prefers_careful": [],
                                     "opens_careful": [], "opens_quick": [], "accuracy": []}
            for alpha in self.alphas:
                for key, value in point(model, Steering(layer, alpha * vector, self.positions, decision_len)
                                        if alpha else None).items():
                    curve[key].append(value)
            return curve

        own, norms = opening_directions(lm, ctx.tokenizer, direction_texts, self.prefix, self.option_a, self.option_b)
        result: dict[str, Any] = {
            "layer": layer, "n_layers": n_layers, "positions": self.positions, "n_prompts": len(prompts), "n_direction_prompts": len(fitting),
            "tokens": [ctx.tokenizer.decode([token_a]), ctx.tokenizer.decode([token_b])],
            "direction_norm": np.linalg.norm(own, axis=-1).tolist(), "residual_norm": norms.tolist(),
            "curves": {"own": dose_response(lm, own[layer])},
        }
        base = references(ctx, self.registry)["base"] if self.transfer else None
        result["base"] = None if base is None or base[0] == ctx.checkpoint.id else base[0]
        if result["base"]:
            base_lm, _ = load_model(base[1], ckpt_id=base[0], device=ctx.config.device, dtype=ctx.config.dtype)
            try:
                if decoder_layout(base_lm).n_layers != n_layers:
                    raise SteeringError(f"{base[0]} and {ctx.checkpoint.id} have different numbers of layers")
                theirs, _ = opening_directions(base_lm, ctx.tokenizer, direction_texts, self.prefix, self.option_a,
                                               self.option_b)
                result["cosine_with_base"] = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
                                              for x, y in zip(own, theirs)]
                result["curves"]["this_on_base"] = dose_response(base_lm, own[layer])
            finally:
                del base_lm
                release_memory()
            result["curves"]["base_on_this"] = dose_response(lm, theirs[layer])
        if self.generate:
            result["shifts"] = {name: {"+0.2": shift_alpha(c, 0.2), "-0.2": shift_alpha(c, -0.2)}
                                for name, c in result["curves"].items()}
        return result

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        from matplotlib.figure import Figure

        a, b = result["tokens"]
        layer = result["layer"]
        lines = [f"Direction: mean residual after the careful opening minus after the quick one, over "
                 f"{result['n_direction_prompts']} held-out puzzles; added x alpha after layer {layer} of "
                 f"{result['n_layers']}, {WHERE[result['positions']]}. Measured on {result['n_prompts']} puzzle-set prompts "
                 "(95% intervals over prompts).", ""]
        if result.get("cosine_with_base"):
            lines += ["Cosine of this checkpoint's direction with the base's, per layer: "
                      + ", ".join(f"{c:.2f}" for c in result["cosine_with_base"]) + ".", ""]
        cell = lambda s: "–" if s["mean"] is None else f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"  # noqa: E731
        for name, curve in result["curves"].items():
            gen = bool(curve["opens_careful"])
            lines += [f"**{CURVE_TITLES[name]}**", "",
                      f"| alpha | logit diff {a!r} - {b!r} | prefers careful |"
                      + (" opens careful | opens quick | accuracy |" if gen else ""),
                      "|---|---|---|" + ("---|---|---|" if gen else "")]
            for i, alpha in enumerate(curve["alpha"]):
                row = [f"{alpha:g}", cell(curve["logit_difference"][i]), cell(curve["prefers_careful"][i])]
                if gen:
                    row += [cell(curve[k][i]) for k in ("opens_careful", "opens_quick", "accuracy")]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
            shifts = result.get("shifts", {}).get(name)
            if shifts:
                said = []
                for key, s in shifts.items():
                    if s is None:
                        said.append(f"no alpha tried moves the careful rate by {key}")
                    else:
                        said.append(f"alpha {s['alpha']:g} moves it by {key} ({s['rate_at_0']:.2f} -> {s['rate']:.2f}; "
                                    f"accuracy {s['accuracy_at_0']:.2f} -> {s['accuracy']:.2f})")
                lines += ["; ".join(said).capitalize() + ".", ""]
        curves = result["curves"]
        gen = bool(curves["own"]["opens_careful"])
        panels = [("logit_difference", f"logit({a!r}) - logit({b!r})")]
        if gen:
            panels += [("opens_careful", "share of responses opening carefully"), ("accuracy", "accuracy")]
        fig = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for name, curve in curves.items():
            for ax, (key, _) in zip(axes, panels):
                s = curve[key]
                ax.plot(curve["alpha"], [v["mean"] for v in s], marker="o", label=CURVE_TITLES[name])
                if all(v["lo"] is not None for v in s):
                    ax.fill_between(curve["alpha"], [v["lo"] for v in s], [v["hi"] for v in s], alpha=0.2)
        for ax, (key, label) in zip(axes, panels):
            ax.set_xlabel("alpha")
            ax.set_ylabel(label)
            if key == "logit_difference":
                ax.axhline(0, color="grey", lw=0.5)
            else:
                ax.set_ylim(-0.02, 1.02)
        axes[0].legend(fontsize=7)
        return "\n".join(lines), [(f"Steering dose-response after layer {layer}", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        curve = result["curves"]["own"]
        alphas = curve["alpha"]
        top = max(alphas)
        for label, series in (("opening logit difference", curve["logit_difference"]),
                              ("opens careful", curve["opens_careful"])):
            if not series:
                continue
            for alpha, tag in ((0.0, "unsteered"), (top, f"alpha {top:g}")):
                s = series[alphas.index(alpha)]
                if s["mean"] is None:
                    continue
                out[f"steering: {label}, {tag}"] = s["mean"]
                if s["lo"] is not None:
                    out[f"steering: {label}, {tag}@lo"] = s["lo"]
                    out[f"steering: {label}, {tag}@hi"] = s["hi"]
        if result.get("cosine_with_base"):
            out["steering: cosine with the base's direction at the steered layer"] = \
                result["cosine_with_base"][result["layer"]]
        return out
