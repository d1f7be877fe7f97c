"""A small byte-level BPE tokenizer for tests, trained on generated K&K text (no downloads)."""

from __future__ import annotations

import functools
import random


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 600):
    from train.organism.tokenizer import train_bpe_tokenizer
    from train.kk import PuzzleGenerator
    from train.prompts import SYSTEM_PROMPT

    gen = PuzzleGenerator(1234)
    texts = [SYSTEM_PROMPT]
    for _ in range(60):
        p = gen.generate(random.Random(len(texts)).choice([3, 4, 5]))
        texts += [p.quiz, p.solution_text_format,
                  "<think> Assume A is a knight. Let me verify. 假设 验证 </think><answer>" + p.solution_text_format + "</answer>"]
    return train_bpe_tokenizer(texts, vocab_size=vocab_size)
