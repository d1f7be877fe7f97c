"""Parameter drift: exact zeros, a planted rank-1 update, registry lineage, the plug-in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cache import ResultCache
from analysis.drift import (DriftError, effective_rank, lineage, split_name, tensor_drift,
                            weight_drift)
from analysis.harness import HarnessConfig, PuzzleSetConfig, analyse_checkpoints, get_analysis
from train.registry import Checkpoint, Registry

TARGET = "model.layers.1.mlp.up_proj.weight"


def perturbed_copy(src: Path, dst: Path, name: str = TARGET, scale: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Copy an HF folder and add a rank-1 update with no zero entry to one matrix."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    w = sd[name]
    u = torch.rand(w.shape[0], generator=g) + 0.5
    v = torch.rand(w.shape[1], generator=g) + 0.5
    sd[name] = w + scale * torch.outer(u, v)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return sd[name] - w


def test_drift_of_a_checkpoint_against_itself_is_exactly_zero(tiny_ckpt):
    d = weight_drift(tiny_ckpt, tiny_ckpt)
    assert d["total"]["changed"] == 0 and d["total"]["frac_changed"] == 0.0
    assert d["total"]["rel_update"] == 0.0 and d["total"]["delta_norm"] == 0.0
    assert all(m["frac_changed"] == 0.0 and m["rel_update"] == 0.0 for m in d["modules"])
    assert all(m["eff_rank"] in (None, 0.0) for m in d["modules"])
    assert not d["missing"] and not d["extra"]


def test_rank_one_update_is_found_in_its_module_only(tiny_ckpt, tmp_path):
    delta = perturbed_copy(tiny_ckpt, tmp_path / "b")
    d = weight_drift(tmp_path / "b", tiny_ckpt)
    rows = {(m["layer"], m["module"]): m for m in d["modules"]}
    hit = rows[(1, "mlp.up_proj")]
    assert hit["frac_changed"] == 1.0
    assert hit["eff_rank"] == pytest.approx(1.0, abs=0.01)
    ref = load_file(str(Path(tiny_ckpt) / "model.safetensors"))[TARGET]
    assert hit["rel_update"] == pytest.approx(float(delta.norm() / ref.norm()), rel=1e-4)
    others = [m for key, m in rows.items() if key != (1, "mlp.up_proj")]
    assert others and all(m["frac_changed"] == 0.0 and m["rel_update"] == 0.0 for m in others)
    layers = {r["layer"]: r for r in d["layers"]}
    assert layers[0]["frac_changed"] == 0.0 and layers[1]["frac_changed"] > 0
    assert d["total"]["changed"] == delta.numel()
    # A tolerance above the update hides it.
    assert weight_drift(tmp_path / "b", tiny_ckpt, atol=1.0)["total"]["changed"] == 0


def test_effective_rank_of_known_spectra():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    flat = q1[:, :5] @ torch.diag(torch.ones(5, dtype=torch.float64)) @ q2[:, :5].T
    assert effective_rank(flat) == pytest.approx(5.0, rel=1e-6)     # 5 equal singular values
    assert effective_rank(torch.zeros(4, 6)) == 0.0
    assert effective_rank(torch.randn(8, 3, generator=g).T) <= 3.0 + 1e-9


def test_dtype_rounding_and_names():
    w = torch.randn(6, 5)
    assert tensor_drift(w.bfloat16(), w)["changed"] == 0          # compared at bf16 precision
    assert split_name("model.layers.12.self_attn.q_proj.bias") == (12, "self_attn.q_proj", "bias")
    assert split_name("model.embed_tokens.weight") == (None, "embed_tokens", "weight")
    assert split_name("lm_head.weight") == (None, "lm_head", "weight")


def test_bad_inputs_are_user_errors(tiny_ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DriftError, match="no \\*.safetensors"):
        weight_drift(tmp_path / "empty", tiny_ckpt)
    with pytest.raises(DriftError, match="tolerances"):
        weight_drift(tiny_ckpt, tiny_ckpt, atol=-1)
    with pytest.raises(DriftError):
        get_analysis("drift", rtol=-0.5)


def _chain(tmp_path: Path, tiny_ckpt: Path) -> Registry:
    """base -> step 5 (rank-1 update of one matrix) -> step 10 (and another one)."""
    base, s5, s10 = tmp_path / "runs" / "base", tmp_path / "runs" / "s5", tmp_path / "runs" / "s10"
    shutil.copytree(tiny_ckpt, base)
    perturbed_copy(base, s5)
    perturbed_copy(s5, s10, name="model.layers.0.self_attn.q_proj.weight", seed=1)
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="r/base", path=str(base), run="r", stage="base", global_step=0))
    reg.add(Checkpoint(id="r/stage1/step-5", path=str(s5), run="r", stage="stage1", global_step=5, parent="r/base"))
    reg.add(Checkpoint(id="r/stage1/step-10", path=str(s10), run="r", stage="stage1", global_step=10,
                       parent="r/stage1/step-5"))
    return reg


def test_lineage_follows_parents_to_the_base(tmp_path, tiny_ckpt):
    reg = _chain(tmp_path, tiny_ckpt)
    base, parent = lineage(reg, reg.get("r/stage1/step-10"))
    assert (base.id, parent.id) == ("r/base", "r/stage1/step-5")
    assert lineage(reg, reg.get("r/base")) == (None, None)
    # Without a base-stage entry the run's first checkpoint is the base.
    reg.remove({"r/base"})
    base, parent = lineage(reg, reg.get("r/stage1/step-10"))
    assert base.id == "r/stage1/step-5" and parent.id == "r/stage1/step-5"


def test_drift_plugin_against_base_and_previous(tmp_path, tiny_ckpt):
    reg = _chain(tmp_path, tiny_ckpt)
    a = get_analysis("drift")
    assert a.uses_model is False and a.uses_generations is False
    cks = reg.select(run="r")
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=1))
    outcomes = analyse_checkpoints(reg, cks, [a], cache=ResultCache(tmp_path / "cache"), config=cfg)
    assert [o.error for o in outcomes] == [None] * 3
    res = {o.checkpoint.id: o.results["drift"] for o in outcomes}

    base = res["r/base"]["references"]
    assert base["parent"] is None and base["base"]["id"] == "r/base"
    assert base["base"]["total"]["rel_update"] == 0.0

    last = res["r/stage1/step-10"]["references"]
    assert last["base"]["id"] == "r/base" and last["parent"]["id"] == "r/stage1/step-5"
    vs_base = {(m["layer"], m["module"]): m["frac_changed"] for m in last["base"]["modules"]}
    vs_prev = {(m["layer"], m["module"]): m["frac_changed"] for m in last["parent"]["modules"]}
    assert {k for k, v in vs_base.items() if v > 0} == {(1, "mlp.up_proj"), (0, "self_attn.q_proj")}
    assert {k for k, v in vs_prev.items() if v > 0} == {(0, "self_attn.q_proj")}

    trends = a.trend_metrics(res["r/stage1/step-10"])
    assert trends["relative weight update vs base"] > trends["relative weight update vs previous"] > 0
    assert trends["update effective rank vs base"] > 0
    md, figs = a.report_section(res["r/stage1/step-10"])
    assert "mlp.up_proj" in md and len(figs) == 1
    md0, _ = a.report_section(res["r/base"])
    assert "| base | r/base | 0 |" in md0
