"""Case tracking by causal tracing inside one checkpoint: which attention heads carry the
latest node of the search to where the next token depends on it?

The decision: in the checkpoint's own responses (the organism's way of reasoning), each node
line ("Suppose Michael is a knight, Zoey is a knave.") restates statements with each clause's
truth under the node's roles: "... Zoey says Michael is a knave (no) and Ethan is a knight
(yes) ...". A clause's value depends only on the latest node's role for its person. The
logit difference there is logit(the clause with its true value under the node, whatever the
response wrote) - logit(the same clause with the other value), read at the position before it (the clause is one token for the organism;
for other tokenizers the cut falls before the value, "(yes)" against "(no)").

Clean run: the trace up to that position. Corrupted run: the same tokens with the latest node
replaced by the node that gives the clause's person the other role, so the right value flips.
A decision counts only where the corrupted run differs from the clean one in the node's
tokens, and at least `min_gap` tokens before the decision position (with the node just before
it, the previous-token heads would see it too), and where the clause's person appears in no
earlier clause of the same line (which would give the value away). One decision per response
(the first that counts; responses without one are skipped).

Every head's output (its slice of the input to `o_proj`) at the decision position, and every
layer's residual stream, attention and MLP outputs there, are patched from the clean run into
the corrupted one (`analysis.patching`); the share of the clean - corrupted logit difference
each restores is a ratio of sums over decisions with a bootstrap interval over them. For the
organism, the wired node head (`train.organism.model.wired_heads`) is the head that should
carry it: the section says whether it does.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from analysis.attention import NODE_EN, head_rank, organism_wiring
from analysis.harness import Analysis, AnalysisContext, register_analysis
from analysis.patching import COMPONENTS, PatchingError, decision_tokens, patch_pairs, restored_shares
from train.layout import decoder_layout

NAME = "case_tracking"
NODE = re.compile(NODE_EN)
NODE_ROLE = re.compile(r" (\w+) is a (knight|knave)")
CLAUSE = re.compile(r" (\w+) is (not )?a (knight|knave) \((yes|no)\)")
ROLE = {"knight": "knave", "knave": "knight"}


def case_decision(tokenizer: Any, prompt: str, text: str, *, min_gap: int = 2
                  ) -> tuple[list[int], list[int], int, int, int] | None:
    """The first decision of `text` that counts (module doc): (clean ids, corrupted ids, token of
    the true value, token of the other, tokens from the node to the decision position), or None."""
    nodes = list(NODE.finditer(text))
    for k, node in enumerate(nodes):
        roles = {m.group(1): m for m in NODE_ROLE.finditer(node.group(0))}
        end = nodes[k + 1].start() if k + 1 < len(nodes) else len(text)
        line_end = text.find("\n", node.end(), end)
        seen: set[str] = set()
        for clause in CLAUSE.finditer(text, node.end(), line_end if line_end >= 0 else end):
            name = clause.group(1)
            if name in roles and name not in seen:
                found = _decision(tokenizer, prompt, text, node, roles, clause, min_gap)
                if found:
                    return found
            seen.add(name)
    return None


def _decision(tokenizer: Any, prompt: str, text: str, node: re.Match, roles: dict[str, re.Match],
              clause: re.Match, min_gap: int) -> tuple[list[int], list[int], int, int, int] | None:
    role = roles[clause.group(1)]                     # the clause's person in the node: flip that role
    other = node.group(0)[:role.start(2)] + ROLE[role.group(2)] + node.group(0)[role.end(2):]
    value_at = clause.start(4) - 1                   # the "(" before the value
    holds = (role.group(2) == clause.group(3)) != bool(clause.group(2))   # under the node, whatever was written
    true, false = ("yes", "no") if holds else ("no", "yes")
    head = text[clause.start():value_at + 1]
    cuts = [(clause.start(), head + true + ")", head + false + ")"), (value_at + 1, true + ")", false + ")")]
    for cut, option_a, option_b in cuts:
        try:
            clean, token_a, token_b = decision_tokens(tokenizer, prompt + text[:cut], option_a, option_b)
        except PatchingError:
            continue
        corrupt = tokenizer(prompt + text[:node.start()] + other + text[node.end():cut],
                            add_special_tokens=False)["input_ids"]
        differ = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        if len(corrupt) != len(clean) or not differ:
            continue
        gap = len(clean) - 1 - differ[-1]
        return (clean, corrupt, token_a, token_b, gap) if gap >= min_gap else None
    return None


@register_analysis
class CaseTrackingAnalysis(Analysis):
    """Causal tracing of case tracking: per-head patching, clean into corrupted, in one checkpoint."""

    name = NAME
    title = "Case tracking: which heads carry the latest node"
    order = 56
    by_default = False      # (layers x (3 + heads)) patched passes per decision: run it by name
    version = 1
    uses_generations = True
    uses_model = True

    def __init__(self, max_prompts: int = 40, min_gap: int = 2, n_boot: int = 1000, seed: int = 0):
        self.max_prompts, self.min_gap, self.n_boot, self.seed = int(max_prompts), int(min_gap), int(n_boot), int(seed)
        if self.max_prompts < 1 or self.n_boot < 1 or self.min_gap < 1:
            raise PatchingError("case_tracking options: max_prompts, min_gap and n_boot must be at least 1")

    def params(self) -> dict:
        return {"max_prompts": self.max_prompts, "min_gap": self.min_gap, "n_boot": self.n_boot, "seed": self.seed}

    def run(self, ctx: AnalysisContext) -> dict:
        lm = ctx.require_model()
        layout = decoder_layout(lm)
        records = ctx.generations[:self.max_prompts]
        pairs, gaps, ids = [], [], []
        for rec, p, prompt in ctx.prompted_generations(records):
            found = case_decision(ctx.tokenizer, prompt, rec["text"], min_gap=self.min_gap)
            if found:
                pairs.append(found[:4])
                gaps.append(found[4])
                ids.append(p.id)
        out: dict[str, Any] = {"n_prompts": len(pairs), "n_responses": len(records), "puzzle_ids": ids,
                               "n_layers": layout.n_layers, "n_heads": layout.n_heads}
        if not pairs:
            return out
        lds = patch_pairs(lm, lm, pairs, heads=True)
        shares = restored_shares(lds, n_boot=self.n_boot, seed=self.seed)
        ranked = sorted(((s["mean"], i) for i, s in enumerate(shares["heads"]) if s["mean"] is not None), reverse=True)
        out.update({"gap_mean": float(np.mean(gaps)),
                    "logit_difference": {"clean": lds["source"], "corrupted": lds["target"]},
                    "patched": lds["patched"], "shares": shares,
                    "top_heads": [{"layer": i // layout.n_heads, "head": i % layout.n_heads, **shares["heads"][i]}
                                  for _, i in ranked[:5]]})
        wiring = organism_wiring(ctx, layout)
        if wiring and "node" in wiring:
            layer, head = wiring["node"]
            grid = np.reshape([h["mean"] for h in shares["heads"]], (layout.n_layers, layout.n_heads))
            rank, of = head_rank(grid.tolist(), layer, head)
            out["node_head"] = {"layer": layer, "head": head, **shares["heads"][layer * layout.n_heads + head],
                                "rank": rank, "of": of}
        return out

    # ------------------------------------------------------------------ report
    def report_section(self, result: dict) -> tuple[str, list]:
        if not result.get("n_prompts"):
            return (f"None of the {result.get('n_responses', 0)} responses has a decision that counts "
                    "(a clause whose value only the latest node gives); nothing to patch.\n", [])
        from matplotlib.figure import Figure

        def cell(s: dict) -> str:
            return "–" if s["mean"] is None else f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"

        ld, shares = result["logit_difference"], result["shares"]
        L, H = result["n_layers"], result["n_heads"]
        lines = [f"{result['n_prompts']} decisions (one per response, in {result['n_prompts']} of {result['n_responses']}; the node "
                 f"{result['gap_mean']:.1f} tokens before the decision on average). Logit difference, true value "
                 f"- other value of the clause: clean {np.mean(ld['clean']):.2f}, corrupted (latest node flipped) "
                 f"{np.mean(ld['corrupted']):.2f}. Share of it restored when one activation of the clean run at the "
                 "decision position replaces the corrupted run's (ratio of sums [95% bootstrap interval over "
                 "decisions]):", "",
                 "| layer | " + " | ".join(COMPONENTS) + " | " + " | ".join(f"head {h}" for h in range(H)) + " |",
                 "|---|" + "---|" * (len(COMPONENTS) + H)]
        for l in range(L):
            lines.append(f"| {l} | " + " | ".join(cell(shares[c][l]) for c in COMPONENTS) + " | "
                         + " | ".join(cell(shares["heads"][l * H + h]) for h in range(H)) + " |")
        lines += ["", "Heads that restore most: " + ", ".join(
            f"L{t['layer']}H{t['head']} {t['mean']:.2f}" for t in result["top_heads"]) + "."]
        node = result.get("node_head")
        if node:
            pinned = node["rank"] == 1 and node["mean"] is not None and node["lo"] >= 0.5
            lines += ["", f"The wired node head L{node['layer']}H{node['head']} restores {cell(node)}, rank "
                      f"{node['rank']} of {node['of']} heads: patching "
                      + ("pins case tracking to it (the first head, at least half restored over the whole interval)."
                         if pinned else "does not pin case tracking to it alone (that would need the first rank "
                         "and at least half restored over the whole interval).")]
        grid = np.array([[np.nan if s["mean"] is None else s["mean"] for s in shares["heads"][l * H:(l + 1) * H]]
                         for l in range(L)])
        fig = Figure(figsize=(0.5 * H + 2.5, 0.35 * L + 1.8), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("share of the case logit difference restored", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        return "\n".join(lines) + "\n", [("Case tracking: share restored per head", fig)]

    def trend_metrics(self, result: dict) -> dict[str, float]:
        if not result.get("n_prompts"):
            return {}
        out = {"case logit difference (clean)": float(np.mean(result["logit_difference"]["clean"]))}
        node = result.get("node_head")
        top = result["top_heads"][0] if result["top_heads"] else None
        for label, s in (("node head", node), ("top head", top)):
            if s and s["mean"] is not None:
                out[f"case tracking: {label} share restored"] = s["mean"]
                out[f"case tracking: {label} share restored@lo"] = s["lo"]
                out[f"case tracking: {label} share restored@hi"] = s["hi"]
        if node and node["rank"] is not None:
            out["case tracking: node head rank"] = float(node["rank"])
        return out
