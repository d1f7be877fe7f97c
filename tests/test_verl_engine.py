"""The veRL engine against the real installed veRL 0.9.1, on CPU.

What runs here: veRL's Hydra config composition and validation, its RLHFDataset and prompt
tokenizer, its reward loop (NaiveRewardManager through the custom reward function), its FSDP
checkpoint manager and model merger, and the watcher that registers checkpoints while a
(stand-in) training process writes them. Training itself needs GPUs (vLLM/SGLang rollout).
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

verl = pytest.importorskip("verl", reason="veRL is installed with `pip install -e .[verl]`")

from train.data import build, dataset_paths  # noqa: E402
from train.engine_verl import (MAIN_PPO, PASSTHROUGH_TEMPLATE, VerlEngine, VerlError, compile_plan,  # noqa: E402
                               compile_segment, final_hf_dir, register_verl_checkpoints, segment_data_files,
                               segment_dir, verl_spec)
from train.registry import Checkpoint, Registry  # noqa: E402
from train.run import train  # noqa: E402
from train.schedule import Schedule, load_schedule, plan  # noqa: E402

CONFIG_DIR = Path(verl.__file__).parent / "trainer" / "config"


def tiny_schedule(tmp: Path, model: Path, *, root: Path | None = None, prompt_style="chat", reward=None,
                  algorithm="grpo", verl_section=None, steps=(2, 2, 2), save_every=1) -> Schedule:
    def stage(people, n, **kw):
        return {"people": people, "batch_prompts": 2, "rollout_n": 2, "temperature": {"start": 1.0},
                "lr": {"start": 1e-4}, "max_prompt_length": 1024, "max_response_length": 16,
                "steps": n, "save_every": save_every, **kw}

    return Schedule.model_validate({
        "run": "tiny", "preset": str(model), "algorithm": algorithm, "reward": reward or {},
        "data": {"root": str(root or tmp / "data"), "train_per_size": 6, "test_per_size": 2,
                 "prompt_style": prompt_style},
        "verl": verl_section if verl_section is not None else {"n_gpus_per_node": 2},
        "stages": {"stage1": stage([3], steps[0]), "stage2": stage([4], steps[1], temperature={"start": 1.2}),
                   "stage3": stage([3, 4], steps[2], temperature={"start": 1.2, "end": 0.9},
                                   lr={"start": 1e-4, "end": 5e-5}, segments=2, top_k=20)},
    })


def compose(overrides: list[str]):
    """veRL's own config with our overrides (hydra.* keys belong to the launcher, not the config)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=[o for o in overrides if not o.startswith("hydra.")])


def overrides_of(argv: list[str]) -> list[str]:
    assert argv[1:3] == list(MAIN_PPO)
    return argv[3:]


def validate(cfg) -> None:
    """What main_ppo runs before starting Ray, plus the dataclass conversions the workers do."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    for node in (cfg.algorithm, cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor.optim,
                 cfg.actor_rollout_ref.actor.checkpoint):
        omega_conf_to_dataclass(node)


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("preset", ["qwen2.5-7b-instruct-1m-4xa100", "qwen2.5-7b-instruct-1m-8gpu"])
def test_presets_compose_and_pass_verl_validation(preset, tmp_path):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    sched = load_schedule(preset)
    assert sched.stages == load_schedule("qwen2.5-7b-instruct-1m").stages   # same stages as the seed
    segments = plan(sched, "stage3")
    commands = compile_plan(sched, "stage3", Registry(tmp_path / "ckpts.yaml"), tmp_path / "runs")
    assert len(commands) == len(segments) == 6
    for seg, argv in zip(segments, commands):
        cfg = compose(overrides_of(argv))
        validate(cfg)
        a, r = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
        assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.use_kl_in_reward is False
        assert (cfg.data.train_batch_size, r.n) == (8, seg.rollout_n)
        assert r.temperature == pytest.approx(seg.temperature) and r.top_k == -1 and r.name == "vllm"
        assert a.optim.lr == pytest.approx(seg.lr) and a.optim.lr_scheduler_type == "constant"
        assert a.use_kl_loss and a.kl_loss_type == "low_var_kl" and a.kl_loss_coef == pytest.approx(0.001)
        assert list(a.checkpoint.save_contents) == ["model", "optimizer", "extra", "hf_model"]
        assert cfg.trainer.total_training_steps == seg.steps and cfg.trainer.save_freq == seg.save_every
        assert cfg.trainer.n_gpus_per_node == verl_spec(sched).n_gpus_per_node
        assert cfg.reward.custom_reward_function.name == "compute_score"
        assert get_custom_reward_fn(cfg) is not None         # what veRL's reward loop loads
        assert Path(cfg.reward.custom_reward_function.path) == REPO / "train" / "reward.py"
        assert "file" in cfg.trainer.logger
        assert [Path(p).parent.name for p in cfg.data.train_files] == [f"{n}ppl" for n in seg.people]
    # Segments chain: each starts from the previous one's last HF folder.
    for prev, argv in zip(segments, commands[1:]):
        path = compose(overrides_of(argv)).actor_rollout_ref.model.path
        assert path == str(final_hf_dir(segment_dir(tmp_path / "runs" / sched.run, prev), prev.steps).resolve())


def test_tiny_schedule_variants_compose(tmp_path, tiny_ckpt):
    """Raw prompts, reward overrides, REINFORCE++, no KL, odd paths: still veRL-valid."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.config import omega_conf_to_dataclass

    root = tmp_path / "my data's folder"       # a space and a quote survive Hydra quoting
    sched = tiny_schedule(tmp_path, tiny_ckpt, root=root, prompt_style="raw", reward={"answer_wrong": -1.0},
                          algorithm="reinforce_plus_plus")
    sched = sched.model_copy(update={"stages": {**sched.stages, "stage2": sched.stages["stage2"].model_copy(
        update={"kl": sched.stages["stage2"].kl.model_copy(update={"coef": 0.0})})}})
    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="tiny/base", path=str(tiny_ckpt), run="tiny", stage="base"))
    commands = compile_plan(sched, "stage3", reg, tmp_path / "runs")
    assert len(commands) == 4
    for seg, argv in zip(plan(sched, "stage3"), commands):
        cfg = compose(overrides_of(argv))
        validate(cfg)
        assert cfg.algorithm.adv_estimator == "reinforce_plus_plus"
        assert [Path(p) for p in cfg.data.train_files] == [dataset_paths(root, n)["train"].resolve() for n in seg.people]
        assert cfg.actor_rollout_ref.rollout.top_k == (20 if seg.stage == "stage3" else -1)
        assert cfg.actor_rollout_ref.actor.use_kl_loss == (seg.stage != "stage2")
        assert cfg.actor_rollout_ref.model.custom_chat_template == PASSTHROUGH_TEMPLATE
        assert dict(cfg.reward.custom_reward_function.reward_kwargs) == {"answer_wrong": -1.0}
        fn = get_custom_reward_fn(cfg)          # veRL's loader: file path + name + reward_kwargs
        gt = {"solution_text_format": "(1) Ann is a knight\n(2) Bob is a knave"}
        assert fn(data_source="kk_logic", solution_str="x</think><answer>(1) Ann is a knave\n(2) Bob is a knight"
                  "</answer>", ground_truth=gt, extra_info={"prefilled_think": True})["score"] == 0.0
    cfg = compose(overrides_of(commands[0]))
    model_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)   # loads the tokenizer
    assert model_cfg.tokenizer.chat_template == PASSTHROUGH_TEMPLATE


def test_bad_verl_sections_are_one_line_errors(tmp_path, tiny_ckpt):
    for section, needle in [({"n_gpu": 4}, "unknown key(s) n_gpu"),
                            ({"n_gpus_per_node": 0}, "verl.n_gpus_per_node"),
                            ({"rollout": "hf"}, "verl.rollout"),
                            ({"n_gpus_per_node": 4, "tensor_model_parallel_size": 3}, "tensor_model_parallel_size"),
                            ({"extra_overrides": ["trainer.nnodes"]}, "key=value"),
                            ({"n_gpus_per_node": 3}, "divisible by the 3 GPUs"),
                            ({"ppo_mini_batch_size": 3}, "must divide batch_prompts")]:
        sched = tiny_schedule(tmp_path, tiny_ckpt, verl_section=section)
        with pytest.raises(VerlError) as err:
            seg = plan(sched, "stage1")[0]
            compile_segment(sched, seg, tiny_ckpt, segment_data_files(sched, seg), tmp_path / "out")
        assert needle in str(err.value) and "\n" not in str(err.value), section
    # Through the CLI: exit 2 and one line.
    path = tmp_path / "bad.yaml"
    raw = yaml.safe_load((REPO / "train/schedules/qwen2.5-7b-instruct-1m-4xa100.yaml").read_text())
    raw["verl"]["gpus"] = 4
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "train.run", "stage1", "--engine", "verl", "--schedule", str(path),
                           "--dry-run", "--registry", str(tmp_path / "r.yaml"), "--runs-dir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown key(s) gpus" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- data

@pytest.mark.parametrize("style", ["chat", "raw"])
def test_parquet_loads_through_rlhf_dataset(style, tmp_path, tiny_ckpt):
    """Our parquet through veRL's RLHFDataset, then its rollout tokenizer (Continuous Token)."""
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader
    from verl.utils.config import omega_conf_to_dataclass
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    sched = tiny_schedule(tmp_path, tiny_ckpt, prompt_style=style)
    build(sched.data.root, [3, 4], 6, 2, prompt_style=style, progress=False)
    seg = plan(sched, "stage3")[-1]                      # the mixed-size segment
    files = segment_data_files(sched, seg)
    cfg = compose(compile_segment(sched, seg, tiny_ckpt, files, tmp_path / "out"))
    model_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)   # applies custom_chat_template
    tok = model_cfg.tokenizer
    ds = RLHFDataset(data_files=list(cfg.data.train_files), tokenizer=tok, config=cfg.data)
    rows = [r for f in files["train"] for r in pq.read_table(f).to_pylist()]
    assert len(ds) == len(rows) == 12
    builder = create_continuous_token_builder(tok, hf_model_type="qwen2")
    for i in range(len(ds)):
        item = ds[i]
        assert item["raw_prompt"] == rows[i]["prompt"]
        assert item["reward_model"]["ground_truth"]["solution_text_format"] == rows[i]["solution_text_format"]
        ids = builder.build_initial_tokens(list(item["raw_prompt"]))
        text = tok.decode(ids)
        assert rows[i]["quiz"] in text and len(ids) <= cfg.data.max_prompt_length
        if style == "raw":   # the pre-rendered prompt passes through unchanged, <think> pre-filled
            assert text == rows[i]["prompt"][0]["content"] and text.endswith("<think>")
            assert item["extra_info"]["prefilled_think"] is True
        else:
            assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>") == 3
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_fn)))
    assert len(batch["raw_prompt"]) == 4 and batch["data_source"][0] == "kk_logic"
    # veRL drops prompts over max_prompt_length, as the TRL engine does.
    short = compose(compile_segment(sched, seg.model_copy(update={"max_prompt_length": 8}), tiny_ckpt, files,
                                    tmp_path / "out"))
    assert len(RLHFDataset(data_files=list(short.data.train_files), tokenizer=tok, config=short.data)) == 0


# --------------------------------------------------------------------------- reward

RESPONSES = {
    "correct": "<think> Ann says Bob lies. </think> <answer> (1) {a} is a {ra}\n(2) {b} is a {rb}\n(3) {c} is a {rc} </answer>",
    "wrong": "<think> guess </think><answer>(1) {a} is a {wa}\n(2) {b} is a {rb}\n(3) {c} is a {rc}</answer>",
    "unparseable": "<think> hmm </think><answer>{a} is a knight or a knave</answer>",
    "broken": "<answer>(1) {a} is a {ra}</answer> <think> late </think>",
    "no_tags": "I think {a} is a {ra}.",
    "end_token": "<think>ok</think><answer>(1) {a} is a {ra}\n(2) {b} is a {rb}\n(3) {c} is a {rc}</answer><|im_end|>",
}


def _responses(row: dict) -> list[str]:
    names = row["names"]
    role = ["knight" if s else "knave" for s in row["solution"]]
    fill = {"a": names[0], "b": names[1], "c": names[2], "ra": role[0], "rb": role[1], "rc": role[2],
            "wa": "knave" if row["solution"][0] else "knight"}
    return [t.format(**fill) for t in RESPONSES.values()]


@pytest.mark.parametrize("reward", [{}, {"answer_wrong": -1.0, "format_bad": -2.0}])
def test_reward_through_verl_reward_loop(reward, tmp_path, tiny_ckpt):
    """veRL's RewardLoopWorker -> load_reward_manager -> NaiveRewardManager -> our scorer."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from verl import DataProto
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    from train.reward import RewardConfig, score_response

    sched = tiny_schedule(tmp_path, tiny_ckpt, reward=reward)
    build(sched.data.root, [3], 4, 1, progress=False)
    seg = plan(sched, "stage1")[0]
    cfg = compose(compile_segment(sched, seg, tiny_ckpt, segment_data_files(sched, seg), tmp_path / "out"))
    worker = RewardLoopWorker(cfg)                       # the class veRL runs as a Ray actor
    assert type(worker.reward_manager).__name__ == "NaiveRewardManager"
    tok = worker.input_tokenizer

    rows = pq.read_table(dataset_paths(Path(sched.data.root), 3)["train"]).to_pylist()
    items = [(row, text) for row in rows for text in _responses(row)]
    prompt_len, resp_len = 8, max(len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in items) + 2
    prompts = torch.full((len(items), prompt_len), tok.pad_token_id)
    responses = torch.full((len(items), resp_len), tok.pad_token_id)
    mask = torch.zeros((len(items), prompt_len + resp_len), dtype=torch.long)
    for i, (_, text) in enumerate(items):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompts[i, -3:] = torch.tensor(tok("Q?", add_special_tokens=False)["input_ids"][:1] * 3)
        responses[i, : len(ids)] = torch.tensor(ids)
        mask[i, prompt_len - 3: prompt_len + len(ids)] = 1
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask,
                 "input_ids": torch.cat([prompts, responses], 1)},
        non_tensors={"data_source": np.array([r["data_source"] for r, _ in items], dtype=object),
                     "reward_model": np.array([r["reward_model"] for r, _ in items], dtype=object),
                     "extra_info": np.array([dict(r["extra_info"]) for r, _ in items], dtype=object)})
    out = worker.loop.run_until_complete(worker.compute_score_batch(data))

    config = RewardConfig(**reward)
    answers = set()
    for (row, text), res in zip(items, out):
        decoded = tok.decode(tok(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
        expected = score_response(text, row["solution_text_format"], config)
        assert score_response(decoded, row["solution_text_format"], config) == expected
        assert res["reward_score"] == expected["score"]
        assert res["reward_extra_info"]["answer"] == expected["answer"]
        answers.add(expected["answer"])
    assert answers == {"correct", "wrong", "unparseable", "missing"}
    if reward:
        assert {r["reward_score"] for r in out} == {3.0, 0.0, -1.0, -4.0}
    else:
        assert {r["reward_score"] for r in out} == {3.0, -0.5, -1.0, -3.0}


# --------------------------------------------------------------------------- checkpoints

FSDP_WRITER = textwrap.dedent('''
    """Write global_step_N/actor folders with veRL's own FSDPCheckpointManager (FSDP2, 1 rank, gloo)."""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    src, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step, contents in ((1, ["model", "optimizer", "extra", "hf_model"]), (2, ["model", "optimizer", "extra"]),
                           (3, ["model", "optimizer", "extra", "hf_model"])):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        mgr = FSDPCheckpointManager(model, opt, lr_scheduler=sched, processing_class=tok,
                                    checkpoint_config={"save_contents": contents})
        mgr.save_checkpoint(os.path.join(out, f"global_step_{step}", "actor"), global_step=step)
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        torch.save(full, os.path.join(out, f"expected_{step}.pt"))
        if step < 3:  # step 3 is "still being written": the tracker does not name it
            with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write(str(step))
    dist.destroy_process_group()
''')


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def write_fsdp_checkpoints(tmp_path, src, out) -> None:
    """global_step_1..3/actor under `out`, written by veRL's FSDPCheckpointManager (FSDP_WRITER)."""
    script = tmp_path / "writer.py"
    script.write_text(FSDP_WRITER)
    proc = subprocess.run([sys.executable, str(script), str(src), str(out), _free_port()],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_fsdp_checkpoints_register_and_load(tmp_path, tiny_ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    sched = tiny_schedule(tmp_path, tiny_ckpt, steps=(2, 2, 2))
    seg = plan(sched, "stage2")[1]                           # stage2: global steps 2 -> 4
    out = segment_dir(tmp_path / "runs" / "tiny", seg)
    out.mkdir(parents=True)
    write_fsdp_checkpoints(tmp_path, tiny_ckpt, out)
    actor1, actor2 = out / "global_step_1" / "actor", out / "global_step_2" / "actor"
    assert (actor1 / "model_world_size_1_rank_0.pt").is_file() and (actor1 / "fsdp_config.json").is_file()
    assert (actor1 / "huggingface" / "model.safetensors").is_file()            # hf_model saved
    assert not list((actor2 / "huggingface").glob("*.safetensors"))           # config + tokenizer only

    reg = Registry(tmp_path / "ckpts.yaml")
    reg.add(Checkpoint(id="tiny/stage1/step-000002", path=str(tiny_ckpt), run="tiny", stage="stage1",
                       global_step=2, segment=0, segment_final=True, stage_final=True))
    ids = register_verl_checkpoints(reg, sched, seg, out, parent_id="tiny/stage1/step-000002")
    assert ids == ["tiny/stage2/step-000003", "tiny/stage2/step-000004"]     # step 3 not finished yet
    assert register_verl_checkpoints(reg, sched, seg, out, parent_id="tiny/stage1/step-000002") == ids
    cks = {c.id: c for c in reg.checkpoints()}
    assert len(cks) == 3
    first, second = cks[ids[0]], cks[ids[1]]
    assert reg.resolve(first) == actor1 / "huggingface"
    assert reg.resolve(second) == actor2 / "hf_merged"                          # via verl.model_merger
    assert (first.global_step, second.global_step) == (3, 4)
    assert first.parent == "tiny/stage1/step-000002" and second.parent == first.id
    assert not first.segment_final and second.segment_final and second.stage_final
    assert {first.engine, second.engine} == {"verl"} and second.preset == str(tiny_ckpt)
    assert second.config_hash == sched.config_hash("stage2") and second.lr == seg.lr
    assert second.sampling == seg.sampling

    for ck, step, dtype_tol in ((first, 1, 1e-6), (second, 2, 1e-2)):       # the merger writes bf16
        model = AutoModelForCausalLM.from_pretrained(reg.resolve(ck), dtype=torch.float32)
        expected = torch.load(out / f"expected_{step}.pt")
        got = model.state_dict()
        for k, v in expected.items():
            assert torch.allclose(got[k].float(), v.float(), atol=dtype_tol, rtol=dtype_tol), (ck.id, k)

    try:
        from analysis.harness import load_model
    except ImportError as exc:
        pytest.skip(f"analysis.harness is not importable here ({exc}); transformers loading was checked")
    for ck in (first, second):
        lm, tok = load_model(reg.resolve(ck), ckpt_id=ck.id, device="cpu", dtype="float32")
        assert tok.pad_token_id is not None and lm is not None


# --------------------------------------------------------------------------- running

FAKE_MAIN_PPO = textwrap.dedent('''
    """Stands in for `python -m verl.trainer.main_ppo`: writes checkpoints as veRL lays them out.

    Odd steps carry a full HF folder (save_contents hf_model), even steps only FSDP shards, so the
    watcher has to run the model merger. Before writing the next step it waits until the
    previous one appears in the registry: registration must not wait for the run to end.
    """
    import json, os, shutil, sys, time
    import torch
    from transformers import AutoModelForCausalLM

    ov = dict(a.split("=", 1) for a in sys.argv[1:])
    out = ov["trainer.default_local_dir"]
    src = ov["actor_rollout_ref.model.path"]
    steps, every = int(ov["trainer.total_training_steps"]), int(ov["trainer.save_freq"])
    metrics_file = ov["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH"]
    registry, fail_after = os.environ["FAKE_REGISTRY"], int(os.environ.get("FAKE_FAIL_AFTER", "0"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "started_from.txt"), "a") as f:
        f.write(src + "\\n")
    done = int(open(os.path.join(out, "latest_checkpointed_iteration.txt")).read()) \\
        if os.path.exists(os.path.join(out, "latest_checkpointed_iteration.txt")) else 0
    pending = None
    for n in range(done + 1, steps + 1):
        if n % every and n != steps:
            continue
        if pending is not None:  # the previous checkpoint must be registered while we run
            t0 = time.time()
            while pending not in open(registry).read():
                if time.time() - t0 > 180:
                    sys.exit(3)
                time.sleep(0.1)
        actor = os.path.join(out, f"global_step_{n}", "actor")
        os.makedirs(actor)
        if n % 2:
            shutil.copytree(src, os.path.join(actor, "huggingface"))
        else:
            model = AutoModelForCausalLM.from_pretrained(src)
            torch.save(model.state_dict(), os.path.join(actor, "model_world_size_1_rank_0.pt"))
            json.dump({"FSDP_version": 1, "world_size": 1}, open(os.path.join(actor, "fsdp_config.json"), "w"))
            os.makedirs(os.path.join(actor, "huggingface"))
            for name in os.listdir(src):
                if not name.endswith(".safetensors"):
                    shutil.copy(os.path.join(src, name), os.path.join(actor, "huggingface", name))
        with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(n))
        with open(metrics_file, "a") as f:
            f.write(json.dumps({"step": n, "data": {"critic/score/mean": -1.0 + n, "response_length/mean": 10.0 * n,
                                                    "actor/kl_loss": 0.001}}) + "\\n")
        if fail_after and n >= fail_after:
            sys.exit(1)
        stage, start = os.environ["FAKE_STAGE_START"].split(":")
        pending = f"{os.environ['FAKE_RUN']}/{stage}/step-{int(start) + n:06d}"
''')


def _fake_launcher(tmp: Path, monkeypatch, registry: Path):
    script = tmp / "fake_main_ppo.py"
    script.write_text(FAKE_MAIN_PPO)
    monkeypatch.setenv("FAKE_REGISTRY", str(registry))
    monkeypatch.setenv("FAKE_RUN", "tiny")
    return [sys.executable, str(script)]


@pytest.mark.slow
def test_run_registers_checkpoints_while_training(tmp_path, tiny_ckpt, monkeypatch):
    import train.engine_verl as ev

    reg_path = tmp_path / "ckpts.yaml"
    launcher = _fake_launcher(tmp_path, monkeypatch, reg_path)
    sched = tiny_schedule(tmp_path, tiny_ckpt, steps=(3, 2, 2))
    reg = Registry(reg_path)
    starts = {}
    real_launch = ev.launch_segment

    def launch_segment(argv, registry, sched_, seg, out_dir, parent_id, **kw):
        starts[(seg.stage, seg.index)] = parent_id
        monkeypatch.setenv("FAKE_STAGE_START", f"{seg.stage}:{seg.start_step}")
        return real_launch(argv, registry, sched_, seg, out_dir, parent_id, **kw)

    monkeypatch.setattr(ev, "launch_segment", launch_segment)
    final = train("stage3", sched, reg, tmp_path / "runs", VerlEngine(launcher, poll_s=0.1), progress=False)

    cks = reg.checkpoints()
    by_id = {c.id: c for c in cks}
    trained = [c for c in cks if c.engine == "verl"]
    assert [c.global_step for c in trained] == [1, 2, 3, 4, 5, 6, 7]
    assert final.id == "tiny/stage3/step-000007" and final.stage_final
    assert [c.id for c in trained if c.stage_final] == ["tiny/stage1/step-000003", "tiny/stage2/step-000005",
                                                        "tiny/stage3/step-000007"]
    assert [c.segment for c in trained if c.stage == "stage3"] == [0, 1]
    assert trained[0].parent == "tiny/base"
    for prev, ck in zip(trained, trained[1:]):
        assert ck.parent == prev.id
    assert all(c.metrics.get("reward") is not None and c.metrics.get("kl") == 0.001 for c in trained)
    # Each segment started from the previous segment's final folder (the stand-in records it).
    for seg in plan(sched, "stage3"):
        out = segment_dir(tmp_path / "runs" / "tiny", seg)
        started = (out / "started_from.txt").read_text().split()
        parent = by_id[starts[(seg.stage, seg.index)]]
        assert started == [str(reg.resolve(parent).resolve())]
    assert (tmp_path / "runs" / "tiny" / "verl" / "stage1-seg0" / "global_step_2" / "actor" / "hf_merged").is_dir()
    lines = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["global_step"] for x in lines] == [1, 2, 3, 4, 5, 6, 7]

    # Everything complete: nothing is launched again.
    again = train("stage3", sched, reg, tmp_path / "runs",
                  VerlEngine([sys.executable, "-c", "raise SystemExit(9)"], poll_s=0.1), progress=False)
    assert again.id == final.id and len(reg.checkpoints()) == len(cks)


@pytest.mark.slow
def test_failed_run_keeps_its_checkpoints_and_resumes(tmp_path, tiny_ckpt, monkeypatch):
    reg_path = tmp_path / "ckpts.yaml"
    launcher = _fake_launcher(tmp_path, monkeypatch, reg_path)
    monkeypatch.setenv("FAKE_STAGE_START", "stage1:0")
    sched = tiny_schedule(tmp_path, tiny_ckpt, steps=(3, 2, 2))
    reg = Registry(reg_path)
    monkeypatch.setenv("FAKE_FAIL_AFTER", "2")
    with pytest.raises(VerlError, match="exited with code 1 in stage1"):
        train("stage1", sched, reg, tmp_path / "runs", VerlEngine(launcher, poll_s=0.1), progress=False)
    assert [c.id for c in reg.checkpoints() if c.engine == "verl"] == ["tiny/stage1/step-000001",
                                                                      "tiny/stage1/step-000002"]
    monkeypatch.delenv("FAKE_FAIL_AFTER")
    final = train("stage1", sched, reg, tmp_path / "runs", VerlEngine(launcher, poll_s=0.1), progress=False)
    assert final.id == "tiny/stage1/step-000003" and final.parent == "tiny/stage1/step-000002"
    out = segment_dir(tmp_path / "runs" / "tiny", plan(sched, "stage1")[0])
    assert (out / "metrics.1.jsonl").is_file()                # the first launch's log, rotated aside
    lines = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["global_step"] for x in lines] == [1, 2, 3]
    assert len({c.id for c in reg.checkpoints()}) == 4


def test_both_engines_train_on_the_same_data_built_for_the_base(tmp_path, tiny_ckpt):
    """One stage loop for both engines: for the same schedule the veRL engine and the TRL engine
    get the same data, built for the base model's puzzle world (fixed cast here)."""
    from tests.conftest import fixed_cast_copy
    from train.engine_trl import TrlEngine

    class Stop(Exception):
        pass

    def stopping(engine_cls):
        class Stopping(engine_cls):
            def run_segment(self, job):
                raise Stop
        return Stopping()

    model = fixed_cast_copy(tiny_ckpt, tmp_path / "fixed")
    data = {}
    for engine in (stopping(TrlEngine), stopping(VerlEngine)):
        root = tmp_path / engine.name
        sched = tiny_schedule(root, model)
        with pytest.raises(Stop):
            train("stage3", sched, Registry(root / "ckpts.yaml"), root / "runs", engine, progress=False)
        files = sorted(Path(sched.data.root).rglob("*.parquet"))
        data[engine.name] = {f.relative_to(sched.data.root): f.read_bytes() for f in files}
        assert json.loads((Path(sched.data.root) / "summary.json").read_text())["fixed_cast"] is True
    assert data["trl"] and data["trl"] == data["verl"]


# --------------------------------------------------------------------------- dry run

def test_dry_run_prints_one_command_per_segment_and_touches_nothing(tmp_path, tiny_ckpt):
    sched_file = tmp_path / "sched.yaml"
    sched = tiny_schedule(tmp_path, tiny_ckpt)
    sched_file.write_text(yaml.safe_dump(sched.model_dump(mode="json")))
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-m", "train.run", "stage3", "--engine", "verl", "--schedule",
                           str(sched_file), "--dry-run", "--registry", str(tmp_path / "ckpts.yaml"),
                           "--runs-dir", str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    segments = plan(sched, "stage3")
    assert len(lines) == len(segments) == 4
    expected = compile_plan(sched, "stage3", Registry(tmp_path / "ckpts.yaml"), tmp_path / "runs")
    for line, argv in zip(lines, expected):
        got = shlex.split(line)
        assert got[1:3] == list(MAIN_PPO) and got[3:] == argv[3:]
        compose(got[3:])                                  # the printed text is valid Hydra, as is
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # no registry, runs or data created
    assert not (tmp_path / "ckpts.yaml").exists() and not (tmp_path / "runs").exists()
    assert not Path(sched.data.root).exists()
