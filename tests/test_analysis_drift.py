"""Parameter drift: exact zeros, a planted rank-1 update, registry lineage, the plug-in; update
sparsity beyond the storage dtype's rounding and the overlap of changed sets between seeds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from analysis.cache import ResultCache
from analysis.drift import (DriftError, changed_mask, effective_rank, lineage, mask_overlap, seed_siblings,
                            split_name, tensor_drift, update_overlap, weight_drift)
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
    assert "mlp.up_proj" in md and len(figs) == 2   # relative update; sparsity vs base
    md0, _ = a.report_section(res["r/base"])
    assert "| base | r/base | 0 |" in md0


# --------------------------------------------------------------------------- sparsity and overlap

def edited_copy(src: Path, dst: Path, edit) -> dict[str, torch.Tensor]:
    """Copy an HF folder and rewrite its weights with `edit(state_dict)` (in place)."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return sd


def bf16_exact_base(tiny_ckpt: Path, dst: Path) -> dict[str, torch.Tensor]:
    """A copy whose fp32 weights all sit exactly on bfloat16 values, so that a relative change
    below half a bfloat16 step rounds back to the base and one above it does not."""
    def to_grid(sd):
        for k in sd:
            sd[k] = sd[k].bfloat16().float()
    return edited_copy(tiny_ckpt, dst, to_grid)


def test_sparsity_pins_the_changed_layer_and_tells_rounding_from_real_change(tiny_ckpt, tmp_path):
    base = bf16_exact_base(tiny_ckpt, tmp_path / "base")
    q0, up1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"

    def edit(sd):
        sd[q0] = sd[q0] * 1.05       # beyond bfloat16 rounding (a step is at most 2^-8 relative)
        sd[up1] = sd[up1] * 1.001    # below half a bfloat16 step: bfloat16 storage would lose it
    edit_sd = edited_copy(tmp_path / "base", tmp_path / "b", edit)
    d = weight_drift(tmp_path / "b", tmp_path / "base", rounding="bfloat16")
    nonzero = (base[q0] != 0).sum().item()
    rows = {(m["layer"], m["module"]): m for m in d["modules"]}
    q_numel = rows[(0, "self_attn.q_proj")]["numel"]       # weight and bias
    assert rows[(0, "self_attn.q_proj")]["frac_changed_rounded"] == pytest.approx(nonzero / q_numel)
    assert rows[(1, "mlp.up_proj")]["frac_changed"] > 0.99
    assert rows[(1, "mlp.up_proj")]["frac_changed_rounded"] == 0.0
    assert all(m["frac_changed"] == 0 for k, m in rows.items() if k not in {(0, "self_attn.q_proj"), (1, "mlp.up_proj")})
    # Per layer: exactly, both layers moved; beyond bfloat16 rounding only layer 0 did.
    layers = {r["layer"]: r for r in d["layers"]}
    assert layers[0]["frac_changed_rounded"] > 0 and layers[1]["frac_changed_rounded"] == 0.0
    assert layers[1]["frac_changed"] > 0
    # Per module type: q_proj of one layer out of two.
    by_type = d["by_module"]
    assert by_type["self_attn.q_proj"]["frac_changed_rounded"] == pytest.approx(nonzero / (2 * q_numel))
    assert by_type["mlp.up_proj"]["frac_changed_rounded"] == 0.0
    assert d["total"]["changed_rounded"] == nonzero
    # At float32 precision both edits count (the stored values differ).
    assert weight_drift(tmp_path / "b", tmp_path / "base", rounding="float32")["total"]["changed_rounded"] \
        == d["total"]["changed"] == sum(int((edit_sd[k] != base[k]).sum()) for k in base)
    with pytest.raises(DriftError, match="rounding 'int8'"):
        weight_drift(tmp_path / "b", tmp_path / "base", rounding="int8")
    with pytest.raises(DriftError, match="drift.rounding"):
        get_analysis("drift", rounding="fp8")


def test_mask_overlap_counts_equal_set_arithmetic():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(50, 7, generator=g) < 0.3, torch.rand(50, 7, generator=g) < 0.6
    sa = {i for i, x in enumerate(a.flatten().tolist()) if x}
    sb = {i for i, x in enumerate(b.flatten().tolist()) if x}
    assert mask_overlap(a, b) == {"numel": 350, "a": len(sa), "b": len(sb), "both": len(sa & sb),
                                  "union": len(sa | sb)}
    assert changed_mask(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])).tolist() == [False, True]


def test_overlap_of_two_planted_masks_against_chance(tiny_ckpt, tmp_path):
    t1, t2 = "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    sd0 = load_file(str(Path(tiny_ckpt) / "model.safetensors"))
    n1, n2 = sd0[t1].numel(), sd0[t2].numel()

    def plant(lo, hi, also_t2):
        def edit(sd):
            flat = sd[t1].flatten().clone()
            flat[lo:hi] += 0.5
            sd[t1] = flat.reshape(sd[t1].shape)
            if also_t2:
                sd[t2] = sd[t2] + 0.5
        return edit
    # Seed a changes entries [0, 60%) of t1 and all of t2; seed b entries [40%, 100%) of t1.
    lo, hi = int(0.4 * n1), int(0.6 * n1)
    edited_copy(tiny_ckpt, tmp_path / "a", plant(0, hi, True))
    edited_copy(tiny_ckpt, tmp_path / "b", plant(lo, n1, False))
    o = update_overlap(tmp_path / "a", tiny_ckpt, tmp_path / "b", tiny_ckpt)
    a_set = set(range(hi)) | {n1 + i for i in range(n2)}
    b_set = set(range(lo, n1))
    t = o["total"]
    assert t["jaccard"] == pytest.approx(len(a_set & b_set) / len(a_set | b_set))
    assert t["shared"] == pytest.approx(len(a_set & b_set) / len(a_set))
    # Chance: independent choices at each tensor's rates; t2's rate in b is 0, so only t1 counts.
    e_both = n1 * (hi / n1) * ((n1 - lo) / n1)
    assert t["jaccard_chance"] == pytest.approx(e_both / (len(a_set) + len(b_set) - e_both))
    assert t["shared_chance"] == pytest.approx(e_both / len(a_set))
    m = o["by_module"]["mlp.down_proj"]           # layer 1's matrix and layer 0's, untouched
    assert m["jaccard"] == pytest.approx((hi - lo) / n1)
    layers = {r["layer"]: r for r in o["layers"]}
    assert layers[0]["jaccard"] == 0.0 and layers[1]["jaccard"] == pytest.approx((hi - lo) / n1)
    # Identical updates overlap fully; chance is then their rate.
    same = update_overlap(tmp_path / "a", tiny_ckpt, tmp_path / "a", tiny_ckpt)["total"]
    assert same["jaccard"] == 1.0 and same["jaccard_over_chance"] > 1


def test_drift_plugin_reports_overlap_with_seed_runs(tmp_path, tiny_ckpt):
    base = tmp_path / "runs" / "base"
    shutil.copytree(tiny_ckpt, base)
    perturbed_copy(base, tmp_path / "runs" / "r5")
    perturbed_copy(base, tmp_path / "runs" / "s1_5", seed=4)
    perturbed_copy(base, tmp_path / "runs" / "s2_5", name="model.layers.0.mlp.gate_proj.weight")
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="r/base", path=str(base), run="r", stage="base", global_step=0))
    reg.add(Checkpoint(id="r/stage1/step-5", path=str(tmp_path / "runs" / "r5"), run="r", stage="stage1",
                       global_step=5, parent="r/base"))
    for seed, folder in ((1, "s1_5"), (2, "s2_5")):
        reg.add(Checkpoint(id=f"r-seed{seed}/base", path=str(base), run=f"r-seed{seed}", stage="base", global_step=0))
        reg.add(Checkpoint(id=f"r-seed{seed}/stage1/step-5", path=str(tmp_path / "runs" / folder),
                           run=f"r-seed{seed}", stage="stage1", global_step=5, parent=f"r-seed{seed}/base"))
    siblings = seed_siblings(reg, reg.get("r-seed1/stage1/step-5"), [0, 1, 2, 3])
    assert siblings[0].id == "r/stage1/step-5" and siblings[2].id == "r-seed2/stage1/step-5"
    assert 1 not in siblings and "no run r-seed3" in siblings[3]

    a = get_analysis("drift", seeds="1,2")
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=1))
    [out] = analyse_checkpoints(reg, [reg.get("r/stage1/step-5")], [a], cache=ResultCache(tmp_path / "c"), config=cfg)
    assert out.error is None
    rows = {r["seed"]: r for r in out.results["drift"]["seed_overlap"]}
    # Seed 1 updated the same matrix (all entries): full overlap; seed 2 another matrix: none.
    assert rows[1]["total"]["jaccard"] == 1.0 and rows[2]["total"]["jaccard"] == 0.0
    assert rows[1]["total"]["jaccard_chance"] > 0
    trends = a.trend_metrics(out.results["drift"])
    assert trends["seed overlap of changed parameters (Jaccard)"] == pytest.approx(0.5)
    md, _ = a.report_section(out.results["drift"])
    assert "r-seed2/stage1/step-5" in md and "Per layer" in md
