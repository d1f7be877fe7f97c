"""The update sparsity, pass@k, patching, steering and resampling analyses on SmolLM2-135M (its real
tokenizer and shape, tiny settings): a copy whose last layer's MLP is changed is pinned there by
patching and by drift, pass@k runs through evaluation's generator, and steering finds a direction
that acts on the opening logit difference, with transfer to and from the base, and resampling
scores the steps of its own response."""

from __future__ import annotations

import shutil

import pytest

from analysis.cache import ResultCache
from analysis.drift import update_overlap, weight_drift
from analysis.harness import GenerationConfig, HarnessConfig, PuzzleSetConfig, analyse_checkpoints, get_analysis
from train.registry import Checkpoint, Registry


@pytest.mark.slow
def test_smollm2_sparsity_passk_patching_steering(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from train.models import resolve_model

    base = resolve_model("smollm2-135m", progress=False)
    step = tmp_path / "step"
    shutil.copytree(base, step)
    sd = load_file(str(step / "model.safetensors"))
    last = max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    name = f"model.layers.{last}.mlp.down_proj.weight"
    sd[name] = sd[name] + 0.05 * torch.randn(sd[name].shape, generator=torch.Generator().manual_seed(0)).to(sd[name].dtype)
    save_file(sd, str(step / "model.safetensors"), metadata={"format": "pt"})
    del sd

    d = weight_drift(step, base, rank=False, rounding="bfloat16")
    changed = {(m["layer"], m["module"]) for m in d["modules"] if m["frac_changed_rounded"]}
    assert changed == {(last, "mlp.down_proj")}
    assert update_overlap(step, base, step, base, rounding="bfloat16")["total"]["jaccard"] == 1.0

    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="smol/base", path=str(base), run="smol", stage="base", global_step=0))
    reg.add(Checkpoint(id="smol/step-1", path=str(step), run="smol", stage="stage1", global_step=1, parent="smol/base"))
    analyses = [get_analysis("patching", max_prompts=1, n_boot=20),
                get_analysis("passk", k=2, max_new_tokens=6, n_boot=20, batch_size=4),
                get_analysis("steering", alphas="-4,0,4", max_prompts=1, direction_prompts=2),
                get_analysis("resampling", n_samples=2, max_traces=1, max_steps=3, n_boot=20)]
    cfg = HarnessConfig(puzzles=PuzzleSetConfig(sizes=(3,), per_size=1), generation=GenerationConfig(max_new_tokens=6))
    [out] = analyse_checkpoints(reg, [reg.get("smol/step-1")], analyses, cache=ResultCache(tmp_path / "c"), config=cfg)
    assert out.error is None
    shares = out.results["patching"]["shares"]
    assert len(shares["mlp"]) == last + 1
    assert shares["mlp"][last]["mean"] == pytest.approx(1.0, abs=1e-3)
    assert all(abs(s["mean"]) < 1e-3 for s in shares["mlp"][:last] + shares["attention"])
    passk = out.results["passk"]
    assert passk["base"] == "smol/base" and [v["n"] for v in passk["counts"].values()] == [2]
    assert len(passk["vs_base"]["by_size"]["3"]["difference"]["mean"]) == 2
    steering = out.results["steering"]
    assert steering["base"] == "smol/base" and steering["layer"] == (last + 1) // 2
    assert set(steering["curves"]) == {"own", "base_on_this", "this_on_base"}
    lds = [s["mean"] for s in steering["curves"]["own"]["logit_difference"]]
    assert abs(lds[0] - lds[1]) > 0.05 and abs(lds[2] - lds[1]) > 0.05    # alpha -4, 0, 4: steering acts
    assert min(steering["cosine_with_base"]) > 0.9  # the copy differs in one late MLP only
    assert len(steering["curves"]["own"]["accuracy"]) == 3
    resampling = out.results["resampling"]
    assert resampling["n_samples"] == 2 and resampling["n_traces"] == 1
    trace = resampling["traces"][0]
    assert len(trace["p"]) == len(trace["kinds"]) + 1 and set(trace["p"]) <= {0.0, 0.5, 1.0}
