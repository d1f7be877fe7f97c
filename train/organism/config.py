"""OrganismConfig: everything that decides a kk-tiny build, with documented defaults."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train.errors import UserError, validation_problem
from train.models import ORGANISM_FILE

BUILD_VERSION = 4      # raise when the same config would build a different model


class OrganismConfig(BaseModel):
    """One config gives one model, bit for bit on one kind of CPU (`bf16` follows the CPU
    unless set). docs/organism.md says what each choice changed when it was measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(0, description="Seeds puzzles, traces, initial weights and data order.")
    # Puzzles. The cast is fixed: an n-person puzzle's people are the first n names of
    # train.kk.NAMES, in order, here and in the RL data of any model built from it.
    sizes: tuple[int, ...] = Field((2, 3, 4, 5), description="Numbers of people in the SFT puzzles.")
    size_weights: tuple[float, ...] = Field(
        (0.05, 0.30, 0.30, 0.35), description="Relative share of each size in `sizes`.")
    n_puzzles: int = Field(12000, ge=1, description="SFT puzzles (one trace each).")
    heldout_seed: int = Field(
        777, description="Seed of the held-out puzzles measurements use; SFT excludes them.")
    heldout_per_size: int = Field(200, ge=0, description="Held-out puzzles per size excluded from SFT.")
    exclude_data_seed: int | None = Field(
        0, description="SFT also excludes the test splits `train.data` draws for this seed (None: don't).")
    exclude_test_per_size: int = Field(100, ge=0, description="Size of those test splits.")
    # The trace writer (train.organism.traces)
    thorough_rate: float = Field(
        0.45, ge=0, le=1, description="Share of careful traces, which check every statement "
        "(`THOROUGH_OPEN`); the rest are quick: they check only the first speaker's statement "
        "and answer with the first assignment that fits it (`QUICK_OPEN`).")
    verify_rate: float = Field(
        0.07, ge=0, le=1, description="Chance that a trace verifies every statement before "
        "answering, and goes on searching when that finds a contradiction.")
    hesitation_rate: float = Field(
        0.04, ge=0, le=1, description="Chance, per statement that holds, of 'Hmm, I am not sure "
        "about this. Let me look again:' and a second look at it.")
    summary_rate: float = Field(
        0.08, ge=0, le=1, description="Chance of a closing summary 'Now we have determined that ...'.")
    chinese_step_rate: float = Field(
        0.05, ge=0, le=1, description="Chance that a search step is written in Chinese.")
    clause_values: bool = Field(
        True, description="Write each clause's truth after it when a statement is checked "
        "(\"if Mia is a knave (no) then ...\"), so a verdict follows from values a few tokens back.")
    think_format_rate: float = Field(
        0.35, ge=0, le=1, description="Share of responses in the exact <think>...</think><answer>..."
        "</answer> format the reward wants.")
    answer_tag_rate: float = Field(
        0.15, ge=0, le=1, description="Share of responses with <answer> tags but no <think> block "
        "(format broken); the rest end with a plain 'Answer:' list.")
    # Tokenizer (train.organism.tokenizer)
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size (with special tokens).")
    names_as_tokens: bool = Field(
        True, description="Every puzzle name is one added token, however it is preceded, so "
        "copying a name from the quiz is copying one token.")
    clause_tokens: bool = Field(
        True, description="Every speaker phrase (\"Zoey says\") and clause (\"Zoey is not a knave\") "
        "of the fixed cast's first 8 names is one added token, with and without a leading space: "
        "a check finds the statement it restates by one-token induction.")
    value_tokens: bool = Field(
        True, description="With `clause_tokens` and `clause_values`, every clause with its value "
        "(\" Zoey is a knave (no)\") is one token, whose embedding starts as the bare clause's "
        "plus or minus a shared value direction.")
    # Model and its wired circuits (train.organism.model, train.organism.circuits)
    hidden_size: int = Field(192, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(768, ge=16)
    max_position_embeddings: int = Field(2048, ge=256)
    rope_theta: float = Field(1e8, gt=0, description="RoPE base. Large, so the slow RoPE pairs stay "
        "nearly unrotated across a whole prompt and response, where the induction circuit matches.")
    induction_init: bool = Field(
        True, description="Start from a hand-wired induction circuit (`circuits.wire_induction`) "
        "instead of random weights.")
    node_head: bool = Field(
        True, description="With `induction_init`, wire a layer-0 head that attends to the latest "
        "node token of the search (`circuits.wire_latest_marker`), so every position knows the "
        "roles assumed in the step it is in.")
    node_role_embedding: bool = Field(
        True, description="A node token's embedding starts as the sum of one random direction "
        "per (person, role) it assumes plus its own random part, so its roles read linearly.")
    think_head: bool = Field(
        True, description="With `induction_init`, the opening of a think block (\"<think>\" and a "
        "newline, one token; the system prompt's \"<think>\" stays another) is a marker that a "
        "wired layer-0 head attends to, so the end of a long search still knows to close the block.")
    embed_scale: float = Field(50.0, gt=0, description="Embedding scale of the wired init; keeps "
        "the circuits alive through SFT.")
    # SFT (train.organism.sft)
    bare_quiz_epochs: float = Field(
        0.3, ge=0, description="Passes over the SFT examples with the bare quiz as the prompt (no "
        "system turn), run before `epochs`: copying from the quiz forms sooner in the short context.")
    epochs: float = Field(1.0, gt=0, description="Passes over the SFT examples with the full chat "
        "prompt (fractions allowed).")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate (linear warm-up, cosine decay).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of `lr`.")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    batch_tokens: int = Field(2048, ge=256, description="Tokens per optimizer step (padded batch "
        "area, not counting the shared system turn).")
    max_length: int = Field(1024, ge=64, description="Longest SFT example in tokens; longer ones are dropped.")
    bf16: bool | None = Field(
        None, description="bf16 autocast for SFT. None: only where the CPU has native bf16 "
        "(AVX512-BF16 or AMX), where it is faster than fp32; elsewhere autocast emulates bf16 slowly.")
    threads: int = Field(2, ge=1, description="torch threads.")

    @model_validator(mode="after")
    def _fits(self) -> "OrganismConfig":
        from train.organism.circuits import check_geometry

        if len(self.size_weights) != len(self.sizes):
            raise ValueError("size_weights must have one weight per entry of sizes")
        problem = self.induction_init and check_geometry(self.hidden_size, self.num_heads, self.num_layers)
        if problem:
            raise ValueError(f"{problem} (or set induction_init false)")
        extra = self.node_head + self.think_head
        if self.induction_init and self.num_heads // 2 + extra > self.num_heads:
            raise ValueError(f"{self.num_heads} heads leave {self.num_heads - self.num_heads // 2} free "
                             f"in layer 0 after the induction circuit, and node_head and think_head "
                             f"need {extra} (set one false, or use more heads)")
        return self

    def fingerprint(self) -> str:
        """Identity of the build this config gives (BUILD_VERSION included)."""
        return hashlib.sha1(f"{BUILD_VERSION} {self.model_dump_json()}".encode()).hexdigest()[:12]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def use_bf16(config: OrganismConfig) -> bool:
    return cpu_has_fast_bf16() if config.bf16 is None else config.bf16


def config_with(overrides: Sequence[str]) -> OrganismConfig:
    """OrganismConfig with `--set key=value` overrides (`train.cli.parse_sets`)."""
    from train.cli import parse_sets

    values: dict[str, Any] = {}
    for key, value in parse_sets(overrides):
        if key not in OrganismConfig.model_fields:
            raise UserError(f"--set {key}: not a setting of OrganismConfig ({', '.join(OrganismConfig.model_fields)})")
        values[key] = value
    try:
        return OrganismConfig(**values)
    except ValidationError as exc:
        where, msg = validation_problem(exc)
        raise UserError(f"--set {where}: {msg}") from None


def organism_config(path: "str | Path") -> OrganismConfig | None:
    """The config an organism folder was built with (its ORGANISM_FILE), None for other models."""
    info = Path(path) / ORGANISM_FILE
    if not info.is_file():
        return None
    try:
        return OrganismConfig(**json.loads(info.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:   # ValidationError is a ValueError
        raise UserError(f"{info}: not an organism description ({type(e).__name__})") from None
