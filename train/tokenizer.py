"""Byte-level BPE tokenizers trained with `tokenizers`, laid out like Qwen2's.

The pre-tokenizer must be Qwen's (NFC, the Qwen split regex, ByteLevel without its own regex):
otherwise `AutoTokenizer` reloads the folder as a Qwen2Tokenizer that splits text differently
and silently produces other ids.
"""

from __future__ import annotations

from typing import Iterable, Sequence

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
