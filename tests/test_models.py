"""Model presets, the one model loader, SmolLM2 from its GGUF file."""

from __future__ import annotations

import pytest

from train.models import ModelNotFound, PRESETS, resolve_model


def test_presets_and_local_paths(tiny_ckpt, tmp_path, monkeypatch):
    assert {"kk-tiny", "smollm2-135m", "qwen2.5-7b-instruct-1m"} <= set(PRESETS)
    assert resolve_model(str(tiny_ckpt), build=False) == tiny_ckpt
    with pytest.raises(ModelNotFound, match="no-such-folder"):
        resolve_model(str(tmp_path / "no-such-folder"))
    monkeypatch.setenv("KKLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KKLAB_MODEL_QWEN2_5_7B_INSTRUCT_1M", raising=False)
    with pytest.raises(ModelNotFound, match="qwen2.5-7b-instruct-1m") as err:
        resolve_model("qwen2.5-7b-instruct-1m")
    assert "KKLAB_MODEL_QWEN2_5_7B_INSTRUCT_1M" in str(err.value) or str(tmp_path) in str(err.value)


def test_smollm2_converts_to_a_loadable_hf_folder(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("KKLAB_CACHE", str(tmp_path))
    path = resolve_model("smollm2-135m", progress=False)
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    text = tok.apply_chat_template([{"role": "user", "content": "Is a knight honest?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert resolve_model("smollm2-135m", progress=False) == path  # cached: no rebuild


def test_kk_tiny_is_the_shipped_base_and_the_loader_says_what_is_wrong_in_one_line(tiny_ckpt, tmp_path,
                                                                                    monkeypatch):
    import shutil

    from train.models import KK_TINY_BASE, ModelLoadError, load_model_and_tokenizer

    monkeypatch.delenv("KKLAB_MODEL_KK_TINY", raising=False)
    assert resolve_model("kk-tiny", build=False) == KK_TINY_BASE
    model, tok = load_model_and_tokenizer(tiny_ckpt, device="cpu")
    assert not model.training and len(tok) <= model.get_input_embeddings().weight.shape[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = shutil.copytree(tiny_ckpt, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    torn = shutil.copytree(tiny_ckpt, tmp_path / "torn")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 3])
    foreign = shutil.copytree(tiny_ckpt, tmp_path / "foreign")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(KK_TINY_BASE / f, foreign / f)
    for folder, what in ((tmp_path / "missing", "does not exist"), (empty, "no config.json"),
                         (no_weights, "no weights"), (torn, "cannot load the weights"),
                         (foreign, "do not belong together"), (tiny_ckpt / "config.json", "is a file")):
        with pytest.raises(ModelLoadError, match=what) as err:
            load_model_and_tokenizer(folder, name="ck-1")
        assert str(err.value).startswith("ck-1: ") and "\n" not in str(err.value)
