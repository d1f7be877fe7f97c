"""Batched generation: the one place where a checkpoint writes answers to puzzles.

Evaluation, the analysis harness and training validation all call `generate`, so a response
scored anywhere in the project was produced the same way.

    prompts = render_prompts(tokenizer, puzzles, "chat")
    outs = generate(model, tokenizer, prompts, max_new_tokens=512, temperature=1.0, num_samples=4)
    outs[i][j].text      # j-th sample for prompt i, decoded, cut at the end-of-turn token

Two backends:

* ``transformers`` (the default everywhere without a GPU): our own decoding loop over the HF
  model with a KV cache. Prompts are sorted by length and left-padded into batches; the
  prompt of a puzzle asked `num_samples` times is encoded once and its cache repeated; rows
  that reached an end token leave the batch. Every (prompt, sample) row draws from its own
  random generator, seeded from (seed, prompt text, sample index), so a sample does not
  depend on the batch size, the order of the prompts or which other prompts were asked.
* ``vllm``: used only when `vllm` is importable and CUDA is available (or when asked for).
  It is written against vLLM's documented ``LLM.generate`` / ``SamplingParams`` API and
  is not exercised by the CPU test suite.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from train.errors import UserError
from train.prompts import chat_messages, raw_prompt
from train.reward import DEFAULT as DEFAULT_REWARD
from train.reward import RewardConfig

__all__ = [
    "GenerationError",
    "GenerationOut",
    "generate",
    "prompt_reward_config",
    "render_prompts",
    "resolve_backend",
    "stop_token_ids",
]

Backend = Literal["auto", "transformers", "vllm"]
PROMPT_STYLES = ("chat", "raw")
# The ChatML end-of-turn token. Base Qwen checkpoints list only <|endoftext|> as eos, yet
# under the chat template a turn ends with <|im_end|>, so it always stops generation.
END_OF_TURN = "<|im_end|>"


class GenerationError(UserError, ValueError):
    """Bad generation input (unknown backend or prompt style, empty prompt, ...)."""


@dataclass(frozen=True)
class GenerationOut:
    """One sampled completion.

    text: the decoded completion without special tokens, cut before the end token.
    n_tokens: tokens generated, the end token included when there is one.
    finished: True when an end token was produced (False: cut by max_new_tokens).
    token_ids: the generated ids, the end token included (len == n_tokens).
    """

    text: str
    n_tokens: int
    finished: bool
    token_ids: tuple[int, ...] = ()


# --------------------------------------------------------------------------- prompts

def render_prompts(tokenizer: Any, puzzles: Sequence[Any], prompt_style: str = "chat") -> list[str]:
    """Prompt text per puzzle (anything with a `.quiz`).

    "chat": the system + user messages through the tokenizer's chat template, with the
    generation prompt appended. "raw": the reference's rendered prompt with `<think>`
    pre-filled; score such responses with `prompt_reward_config("raw")`.
    """
    if prompt_style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError("the tokenizer has no chat template; use prompt_style 'raw'")
        return [tokenizer.apply_chat_template(chat_messages(p.quiz), tokenize=False,
                                              add_generation_prompt=True) for p in puzzles]
    if prompt_style == "raw":
        return [raw_prompt(p.quiz, tokenizer) for p in puzzles]
    raise GenerationError(f"unknown prompt style {prompt_style!r}: use chat or raw")


def prompt_reward_config(prompt_style: str, base: RewardConfig = DEFAULT_REWARD) -> RewardConfig:
    """The reward config matching a prompt style: a pre-filled `<think>` for "raw"."""
    if prompt_style not in PROMPT_STYLES:
        raise GenerationError(f"unknown prompt style {prompt_style!r}: use chat or raw")
    return base.model_copy(update={"prefilled_think": prompt_style == "raw"})


# --------------------------------------------------------------------------- helpers

def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Token ids that end a completion: the tokenizer's eos, the generation config's eos
    (an int or a list) and `<|im_end|>` when the vocabulary has it as one token."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    try:
        im_end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    except (KeyError, ValueError, TypeError):
        im_end = None
    if isinstance(im_end, int) and im_end != getattr(tokenizer, "unk_token_id", None):
        ids.add(im_end)
    return ids


def _row_seed(seed: int, prompt: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{sample}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_backend(backend: str = "auto", model: Any = None) -> str:
    """"transformers" or "vllm". "auto" picks vLLM only when it is importable, CUDA is
    available and `model` is a path or a vLLM engine (an in-memory torch model, e.g. the
    policy during training, is always generated from with transformers: vLLM would load
    the weights on disk, not the ones in memory). Never imports vllm itself."""
    if backend not in ("auto", "transformers", "vllm"):
        raise GenerationError(f"unknown backend {backend!r}: use auto, transformers or vllm")
    if backend == "transformers":
        return backend
    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        if not has_vllm:
            raise GenerationError("backend 'vllm' asked for, but vllm is not installed")
        return backend
    import torch

    in_memory = isinstance(model, torch.nn.Module)
    return "vllm" if has_vllm and torch.cuda.is_available() and not in_memory else "transformers"


# --------------------------------------------------------------------------- entry point

def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
             batch_size: int = 16, seed: int = 0, progress: Any = True,
             backend: Backend = "auto") -> list[list[GenerationOut]]:
    """Complete every prompt `num_samples` times; returns one list of outputs per prompt.

    prompts: already-rendered prompt text (see `render_prompts`); it is tokenized without
    adding special tokens, since a chat template already holds them.
    temperature 0 means greedy (then the samples of a prompt are identical and computed once);
    top_k 0 and top_p 1 disable those filters. batch_size counts (prompt, sample) rows.
    progress: True for a transient rich progress bar, False for none, or a
    `rich.progress.Progress` already running, to which a task is added (rich allows one live
    display at a time, so callers with their own bar pass it here).
    model: an HF causal LM; with the vllm backend also a folder path or a `vllm.LLM`.
    """
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1 or batch_size < 1:
        raise GenerationError("num_samples and batch_size must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise GenerationError(f"bad sampling settings: temperature={temperature} top_p={top_p} top_k={top_k}")
    prompts = list(prompts)
    if not prompts:
        return []
    if any(not isinstance(p, str) or not p for p in prompts):
        raise GenerationError("every prompt must be a non-empty string")
    greedy = temperature == 0
    n_draw = 1 if greedy else num_samples
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, num_samples=n_draw, batch_size=batch_size, seed=seed,
                  progress=progress)
    if resolve_backend(backend, model) == "vllm":
        outs = _generate_vllm(model, tokenizer, prompts, **kwargs)
    else:
        outs = _generate_transformers(model, tokenizer, prompts, **kwargs)
    if greedy and num_samples > 1:
        outs = [o * num_samples for o in outs]
    return outs


# --------------------------------------------------------------------------- transformers

def _progress_task(progress: Any, total: int):
    """(advance callback, close callback) for a bool or a running rich Progress."""
    if progress is False or progress is None:
        return (lambda n: None), (lambda: None)
    from rich.progress import Progress

    own = not isinstance(progress, Progress)
    bar = Progress(transient=True) if own else progress
    if own:
        bar.start()
    task = bar.add_task("generating", total=total)

    def close() -> None:
        if own:
            bar.stop()
        else:
            bar.remove_task(task)

    return (lambda n: bar.advance(task, n)), close


def _generate_transformers(model, tokenizer, prompts, *, max_new_tokens, temperature, top_p,
                           top_k, num_samples, batch_size, seed, progress):
    import torch

    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    if not stops:
        raise GenerationError("neither the tokenizer nor the generation config names an eos token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = min(stops)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # Rows are (prompt, sample); longest prompts first, a prompt's samples side by side, so
    # a batch pads little and shares its prompt encodings.
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    rows = [(i, s) for i in order for s in range(num_samples)]
    results: list[list[GenerationOut | None]] = [[None] * num_samples for _ in prompts]
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    advance, close = _progress_task(progress, len(rows))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                gens = []
                for i, s in batch:
                    g = torch.Generator(device="cpu")
                    g.manual_seed(_row_seed(seed, prompts[i], s))
                    gens.append(g)
                tokens, finished = _decode_batch(
                    model, [encoded[i] for i, _ in batch], gens, device=device, pad_id=pad_id,
                    stops=stops, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, keep_logits=keep_logits)
                for (i, s), toks, done in zip(batch, tokens, finished):
                    body = toks[:-1] if done else toks
                    text = tokenizer.decode(body, skip_special_tokens=True)
                    results[i][s] = GenerationOut(text=text, n_tokens=len(toks), finished=done,
                                                  token_ids=tuple(toks))
                advance(len(batch))
    finally:
        model.train(was_training)
        close()
    return results


def _decode_batch(model, prompt_ids: list[list[int]], gens, *, device, pad_id, stops,
                  max_new_tokens, temperature, top_p, top_k, keep_logits):
    """Decode one batch of rows; returns (generated ids per row, finished per row)."""
    import torch

    # Encode each distinct prompt once, then repeat its cache for its samples.
    unique: dict[tuple[int, ...], int] = {}
    row_src = [unique.setdefault(tuple(ids), len(unique)) for ids in prompt_ids]
    distinct = list(unique)
    width = max(len(ids) for ids in distinct)
    input_ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(distinct), width), dtype=torch.long)
    for r, ids in enumerate(distinct):
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[r, width - len(ids):] = 1
    # Left padding: positions count real tokens only, as in an unpadded forward.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    if row_src != list(range(len(distinct))):
        src = torch.tensor(row_src, device=device)
        cache.batch_select_indices(src)
        logits, mask, positions = logits[src], mask[src], positions[src]
    next_pos = positions[:, -1:] + 1

    n = len(prompt_ids)
    generated: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    active = list(range(n))  # batch slot -> row
    for step in range(max_new_tokens):
        picked = _pick_tokens(logits, [gens[r] for r in active], temperature, top_p, top_k)
        keep = []
        for slot, (row, tok) in enumerate(zip(active, picked.tolist())):
            generated[row].append(tok)
            if tok in stops:
                finished[row] = True
            else:
                keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            # Finished rows leave the batch: later steps only pay for live rows.
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, next_pos = mask[idx], next_pos[idx]
            picked = picked[torch.tensor(keep)]
            active = [active[s] for s in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = model(input_ids=picked[:, None].to(device), attention_mask=mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return generated, finished


def _pick_tokens(logits, gens, temperature: float, top_p: float, top_k: int):
    """Next token per row: argmax when greedy, else an inverse-CDF draw with each row's own
    generator (one uniform per row and step, so a row's draws do not depend on its batch)."""
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1).cpu()
    logits = logits.float().cpu() / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    # u in (0, 1]: the target mass is positive, so the draw never lands on a zero-probability token.
    u = torch.stack([1.0 - torch.rand((), generator=g) for g in gens])
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=vocab - 1)
    if order is not None:
        idx = order.gather(-1, idx)
    return idx.squeeze(-1)


# --------------------------------------------------------------------------- vllm

_VLLM_ENGINES: dict[str, Any] = {}


def _generate_vllm(model, tokenizer, prompts, *, max_new_tokens, temperature, top_p, top_k,
                   num_samples, batch_size, seed, progress):
    """vLLM backend, written against its documented offline API:
    ``LLM(model=path).generate(prompts, SamplingParams(n=..., temperature=..., top_p=...,
    top_k=..., max_tokens=..., seed=...))``. Not testable without a GPU.

    Engines are created once per model folder. Prompts go in as token ids (tokenized like the
    transformers backend) with one SamplingParams per prompt, seeded from (seed, prompt), so a
    prompt's samples do not depend on the other prompts. batch_size is vLLM's own business.
    """
    from vllm import LLM, SamplingParams

    if isinstance(model, LLM):
        llm = model
    else:
        path = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", None)
        if not path or not Path(path).exists():
            raise GenerationError("the vllm backend needs a model folder on disk")
        if path not in _VLLM_ENGINES:
            _VLLM_ENGINES[path] = LLM(model=path, tokenizer=path, seed=seed)
        llm = _VLLM_ENGINES[path]
    stops = sorted(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    params = [
        SamplingParams(n=num_samples, temperature=temperature, top_p=top_p,
                       top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
                       seed=_row_seed(seed, p, 0), stop_token_ids=stops, skip_special_tokens=True)
        for p in prompts
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params,
                           use_tqdm=progress is not False)
    return [[GenerationOut(text=o.text, n_tokens=len(o.token_ids), finished=o.finish_reason == "stop",
                           token_ids=tuple(o.token_ids)) for o in req.outputs] for req in outputs]
