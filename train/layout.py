"""The one place that knows where a decoder's parts live: the analyses read a model through
these names, never through its module paths.

Supported: decoder-only HF models of the Llama / Qwen2 layout (kk-tiny, SmolLM2, Qwen2.5), and
the nnsight wrappers of them (an `nnsight` model exposes the same attribute paths). Names
follow TransformerLens, with the shape of what each part reads or writes (batch b, positions
p, vocabulary V):

    decoder_layers(m)   m.model.layers                n_layers blocks; a block's output is the
                                                      residual stream (b, p, d_model)
    embedding(m)        m.model.embed_tokens          (V, d_model); its output is layer 0 of the residual
    final_norm(m)       m.model.norm                  RMSNorm before the unembedding
    unembedding(m)      m.get_output_embeddings()     d_model -> V (the logit lens reads through both)
    rotary_embedding(m) m.model.rotary_emb           RoPE of the attention's queries and keys
    block.self_attn     q_proj, k_proj                (b, p, n_heads * d_head), (b, p, n_kv_heads * d_head)
    block.mlp           act_fn output, down_proj input (b, p, d_mlp): the neurons of a gated MLP

`decoder_layout(model, needs=...)` checks that the parts an analysis needs are there and
returns the sizes; a model of another layout gets one line saying what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from train.errors import UserError

PARTS = ("layers", "embedding", "final_norm", "unembedding", "attention", "mlp")


class LayoutError(UserError):
    """A model whose layout an analysis cannot read; one line naming what is missing."""


@dataclass(frozen=True)
class DecoderLayout:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int | None         # neurons per gated MLP (None without one)
    attn_scale: float         # the attention's 1/sqrt(d_head), as the model applies it


def _hf(model: Any) -> Any:
    """The HF module of a model or of its nnsight wrapper."""
    return getattr(model, "_module", model)


def decoder_layers(model: Any) -> Any:
    return model.model.layers


def embedding(model: Any) -> Any:
    return model.model.embed_tokens


def final_norm(model: Any) -> Any:
    return model.model.norm


def rotary_embedding(model: Any) -> Any:
    return model.model.rotary_emb


def unembedding(model: Any) -> Any:
    return _hf(model).get_output_embeddings()


def decoder_layout(model: Any, needs: Iterable[str] = ("layers",), what: str = "this analysis",
                   error: type[Exception] = LayoutError) -> DecoderLayout:
    """The sizes of `model` after checking the parts `needs` names (of PARTS); `error` (a
    UserError) says in one line what is missing."""
    hf = _hf(model)
    name = type(hf).__name__
    base = getattr(hf, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not len(layers):
        raise error(f"{name}: {what} needs model.layers (Qwen2/Llama layout)")
    needs = set(needs)
    unknown = needs - set(PARTS)
    if unknown:
        raise ValueError(f"unknown layout parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    if "embedding" in needs and getattr(base, "embed_tokens", None) is None:
        raise error(f"{name}: {what} needs model.embed_tokens (Qwen2/Llama layout)")
    if "final_norm" in needs and getattr(base, "norm", None) is None:
        raise error(f"{name}: {what} needs model.norm (Qwen2/Llama layout)")
    if "unembedding" in needs and hf.get_output_embeddings() is None:
        raise error(f"{name}: {what} needs an output embedding (Qwen2/Llama layout)")
    attn = layers[0].self_attn
    cfg = hf.config
    if "attention" in needs:
        if getattr(base, "rotary_emb", None) is None:
            raise error(f"{name}: {what} needs model.layers and model.rotary_emb (Qwen2/Llama layout)")
        if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
            raise error(f"{name}: attention has no q_proj/k_proj")
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise error(f"{name}: q/k normalisation (Qwen3 layout) is not supported")
        if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
            raise error(f"{name}: sliding-window attention is not supported")
        if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise error(f"{name}: partial rotary embeddings are not supported")
    mlp = layers[0].mlp
    gated = all(hasattr(mlp, part) for part in ("act_fn", "down_proj", "gate_proj", "up_proj"))
    if "mlp" in needs and not gated:
        missing = [p for p in ("act_fn", "down_proj", "gate_proj", "up_proj") if not hasattr(mlp, p)]
        raise error(f"{name}: MLP has no {missing[0]} (a gated MLP is needed)")
    n_heads = int(cfg.num_attention_heads)
    d_head = int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    return DecoderLayout(
        n_layers=len(layers), d_model=int(cfg.hidden_size), n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads), d_head=d_head,
        d_mlp=int(mlp.down_proj.in_features) if gated else None,
        attn_scale=float(getattr(attn, "scaling", d_head ** -0.5)))
