"""The organism's tokenizer: a Qwen-style byte-level BPE trained on its SFT text, with the
pieces a trace is built from added as single tokens.

The pre-tokenizer must be Qwen's (NFC, the Qwen split regex, ByteLevel without its own regex):
otherwise `AutoTokenizer` reloads the folder as a Qwen2Tokenizer that splits text differently
and silently produces other ids.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from train.organism.traces import CLAUSE_EN, node_phrase, tree_nodes
from train.prompts import THINK_OPEN
from train.prompts import CHATML_TEMPLATE

QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Whole tokens, so format tags are single decision points for the policy and the analysis.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2,
                        whole_words: Sequence[str] = (), phrases: Sequence[str] = ()):
    """Train a Qwen-style byte-level BPE on `texts`; returns a PreTrainedTokenizerFast.

    `whole_words` become added tokens, one id each whatever precedes them (byte-level BPE
    otherwise spells `Ethan` after a space and after a quote as two unrelated tokens).
    `phrases` become added tokens matched anywhere, spaces included; where added tokens
    overlap, the one starting first (then the longest) wins.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAG_TOKENS])
    if whole_words:
        tok.add_tokens([AddedToken(w, normalized=False, special=False, single_word=True)
                        for w in whole_words])
    if phrases:
        tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in phrases])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def cast_phrases(n_names: int = 8) -> list[str]:
    """The fixed cast's speaker phrases ("Zoey says") and clauses ("Zoey is not a knave") for
    the first `n_names` names, each with and without a leading space (`clause_tokens`)."""
    from train.kk import NAMES

    cast = NAMES[:n_names]
    phrases = [f"{n} says" for n in cast] + [f"{n} is {neg}a {r}" for n in cast for neg in ("", "not ")
                                            for r in ("knight", "knave")]
    return [v for p in phrases for v in (p, " " + p)]


def valued_clauses() -> dict[str, str]:
    """Each clause of `cast_phrases()` followed by its value (" Zoey is a knave (no)"), mapped
    to the bare clause (`value_tokens`)."""
    return {c + CLAUSE_EN[v]: c for c in cast_phrases() if " says" not in c for v in (True, False)}


def node_phrases(max_people: int) -> list[str]:
    """The fixed cast's search nodes (`traces.node_phrase`), English and Chinese, for up to
    `max_people` people."""
    from train.kk import NAMES

    return [node_phrase(NAMES, roles, zh) for zh in (False, True) for roles in tree_nodes(max_people)]


def train_tokenizer(texts: Sequence[str], vocab_size: int, names_as_tokens: bool = True,
                    clause_tokens: bool = False, value_tokens: bool = False, think_token: bool = False,
                    node_people: int = 0):
    """The organism's tokenizer: the format tags, the puzzle names when `names_as_tokens`,
    `cast_phrases()` when `clause_tokens`, `valued_clauses()` when `value_tokens`, THINK_OPEN
    when `think_token` and `node_phrases(node_people)` are single tokens."""
    from train.kk import NAMES

    phrases = (cast_phrases() if clause_tokens else []) + (list(valued_clauses()) if value_tokens else []) \
        + ([THINK_OPEN] if think_token else []) + (node_phrases(node_people) if node_people else [])
    return train_bpe_tokenizer(texts, vocab_size=vocab_size, whole_words=NAMES if names_as_tokens else (),
                               phrases=phrases)
