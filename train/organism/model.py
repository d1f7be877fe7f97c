"""The organism's model: a small Qwen2 whose initial weights carry hand-wired circuits
(`circuits`), so that SFT on 2 cores starts from a model that can copy from its prompt and
knows which step of the search it is in."""

from __future__ import annotations

import math

from train.kk import FIXED_CAST_KEY, NAMES
from train.models import wired_heads
from train.organism.config import OrganismConfig
from train.organism.tokenizer import valued_clauses
from train.organism.traces import CLAUSE_EN, node_phrase, tree_nodes
from train.prompts import THINK_OPEN


def uses_value_tokens(config: OrganismConfig) -> bool:
    return config.value_tokens and config.clause_tokens and config.clause_values


def make_model(config: OrganismConfig, tokenizer):
    """A Qwen2ForCausalLM for `tokenizer`: random weights, then (with `induction_init`) the
    wired induction circuit, the valued-clause and node embeddings, and the think and node
    heads."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(config.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=True,
        rope_theta=config.rope_theta, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{FIXED_CAST_KEY: True},  # saved in config.json, inherited by checkpoints
    )
    model = Qwen2ForCausalLM(cfg)
    if config.induction_init:
        from train.organism.circuits import wire_induction, wire_latest_marker

        wire_induction(model, seed=config.seed, embed_scale=config.embed_scale)
        if uses_value_tokens(config):
            # A valued clause starts as its bare clause plus or minus one shared "value"
            # direction: the wired induction head then copies a statement from the quiz through
            # the values written into it, and a verdict can read every value the same way.
            emb = model.model.embed_tokens.weight
            g = torch.Generator().manual_seed(config.seed + 2)
            value_dir = torch.nn.functional.normalize(torch.randn(emb.shape[1], generator=g)
                                                      * token_dims(model), dim=0)
            with torch.no_grad():
                for valued, bare in valued_clauses().items():
                    i, j = tokenizer.convert_tokens_to_ids(valued), tokenizer.convert_tokens_to_ids(bare)
                    sign = 1.0 if valued.endswith(CLAUSE_EN[True]) else -1.0
                    emb[i] = emb[j] + sign * 0.3 * emb[j].norm() * value_dir
        taken, heads = None, wired_heads(config.model_dump())
        if config.think_head:
            taken = wire_latest_marker(model, {1: [tokenizer.convert_tokens_to_ids(THINK_OPEN)]},
                                       seed=config.seed + 10, head=heads["think"][1])
        ids = node_token_ids(config, tokenizer)
        if config.node_role_embedding:
            embed_node_roles(model, ids, seed=config.seed + 3)
        if config.node_head:
            wire_latest_marker(model, {rank: ids[roles] for rank, roles in enumerate(ids, 1)},
                               seed=config.seed, head=heads["node"][1], orthogonal_to=taken)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def node_token_ids(config: OrganismConfig, tokenizer) -> dict[tuple[bool, ...], list[int]]:
    """The token ids (English, Chinese) of each node of the search, in depth-first order."""
    return {roles: [tokenizer.convert_tokens_to_ids(node_phrase(NAMES, roles, zh)) for zh in (False, True)]
            for roles in tree_nodes(max(config.sizes))}


def token_dims(model):
    """1 on the residual dims that hold the token embedding in the wired init (the first half;
    `circuits.wire_induction` keeps the second for the previous token), 0 elsewhere."""
    import torch

    hidden = model.config.hidden_size
    return (torch.arange(hidden) < hidden // 2).float()


def embed_node_roles(model, ids: dict[tuple[bool, ...], list[int]], seed: int, own: float = 0.5) -> None:
    """`node_role_embedding`: each node token's embedding becomes the sum of one random
    direction per (person, role) it assumes plus `own` times its own random embedding, at the
    norm its embedding had, in the token dims."""
    import torch

    emb = model.model.embed_tokens.weight
    dims = token_dims(model)
    depth = max(len(roles) for roles in ids)
    g = torch.Generator().manual_seed(seed)
    role_dirs = torch.nn.functional.normalize(torch.randn(depth, 2, emb.shape[1], generator=g) * dims, dim=-1)
    with torch.no_grad():
        for roles, token_ids in ids.items():
            parts = sum(role_dirs[i, int(not r)] for i, r in enumerate(roles)) / math.sqrt(len(roles))
            for i in token_ids:
                v = parts + own * torch.nn.functional.normalize(emb[i] * dims, dim=0)
                emb[i] = v / v.norm() * emb[i].norm()
