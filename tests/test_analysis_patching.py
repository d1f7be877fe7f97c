"""Activation patching: a pair of models that differ in one known block, which patching pins."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cache import ResultCache
from analysis.harness import HarnessConfig, PuzzleSetConfig, analyse_checkpoints, get_analysis
from analysis.patching import PatchingError, decision_tokens
from train.registry import Checkpoint, Registry

CHANGED = "model.layers.1.mlp.down_proj.weight"     # the tiny model's last layer's MLP


def test_patching_pins_the_one_changed_block(tmp_path, tiny_ckpt):
    base, step = tmp_path / "runs" / "base", tmp_path / "runs" / "s2"
    shutil.copytree(tiny_ckpt, base)
    shutil.copytree(tiny_ckpt, step)
    sd = load_file(str(step / "model.safetensors"))
    sd[CHANGED] = sd[CHANGED] + torch.randn(sd[CHANGED].shape, generator=torch.Generator().manual_seed(1)) * 0.5
    save_file(sd, str(step / "model.safetensors"), metadata={"format": "pt"})
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="r/base", path=str(base), run="r", stage="base", global_step=0))
    reg.add(Checkpoint(id="r/stage1/step-2", path=str(step), run="r", stage="stage1", global_step=2, parent="r/base"))
    a = get_analysis("patching", max_prompts=2, n_boot=100)
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=3))
    outs = analyse_checkpoints(reg, reg.select(run="r"), [a], cache=ResultCache(tmp_path / "c"), config=cfg)
    assert [o.error for o in outs] == [None, None]
    res = outs[1].results["patching"]
    ld = res["logit_difference"]
    assert all(abs(x - y) > 1e-4 for x, y in zip(ld["checkpoint"], ld["base"]))
    assert outs[0].results["patching"]["logit_difference"]["checkpoint"] == pytest.approx(ld["base"], abs=1e-5)
    share = {c: [s["mean"] for s in rows] for c, rows in res["shares"].items()}
    # Layer 0 is the same in both models; layer 1's MLP is the only difference, and it is
    # position-wise, so patching it (or the last residual stream) restores all of it.
    assert share["mlp"] == pytest.approx([0.0, 1.0], abs=1e-4)
    assert share["attention"] == pytest.approx([0.0, 0.0], abs=1e-4)
    assert share["residual"] == pytest.approx([0.0, 1.0], abs=1e-4)
    assert res["top"]["component"] == "mlp" and res["top"]["layer"] == 1
    md, figs = a.report_section(res)
    assert "Largest single block: layer 1 mlp" in md and len(figs) == 1
    trends = a.trend_metrics(res)
    assert trends["patching: largest share restored by one block"] == pytest.approx(1.0, abs=1e-4)
    assert "opening logit difference (careful - quick)" in a.trend_metrics(outs[0].results["patching"])


def test_decision_tokens_need_two_distinct_first_tokens(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    ids, a, b = decision_tokens(tok, "Hello\n", "Check it.", "Take it.")
    assert tok(("Hello\nCheck it."), add_special_tokens=False)["input_ids"][len(ids)] == a and a != b
    with pytest.raises(PatchingError, match="same token"):
        decision_tokens(tok, "Hello\n", "Check it.", "Check that.")


def test_per_head_patching_pins_the_one_changed_head(tmp_path, tiny_ckpt):
    """Two models that differ only in one layer-1 head's query projection: patching that head's
    output (its slice of the o_proj input) restores the whole difference, every other head none."""
    from analysis.harness import load_model
    from analysis.patching import patch_pairs, restored_shares
    from train.layout import decoder_layout

    step = tmp_path / "s"
    shutil.copytree(tiny_ckpt, step)
    src, tok = load_model(tiny_ckpt)
    layout = decoder_layout(src)
    H, d, head = layout.n_heads, layout.d_head, 1
    name = "model.layers.1.self_attn.q_proj.weight"     # one row block per head (GQA shares k, v)
    sd = load_file(str(step / "model.safetensors"))
    sd[name][head * d:(head + 1) * d] += torch.randn(d, sd[name].shape[1], generator=torch.Generator().manual_seed(2))
    save_file(sd, str(step / "model.safetensors"), metadata={"format": "pt"})
    tgt, _ = load_model(step)
    ids = [tok("Zoey says Ethan is a knave. So Ethan", add_special_tokens=False)["input_ids"],
           tok("Assume Zoey is a knight. Then", add_special_tokens=False)["input_ids"]]
    lds = patch_pairs(src, tgt, [(x, x, 5, 7) for x in ids], heads=True)
    shares = [s["mean"] for s in restored_shares(lds, n_boot=50, seed=0)["heads"]]
    assert len(shares) == layout.n_layers * H
    assert shares[H + head] == pytest.approx(1.0, abs=1e-4)
    assert shares[:H + head] + shares[H + head + 1:] == pytest.approx([0.0] * (len(shares) - 1), abs=1e-4)
