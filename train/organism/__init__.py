"""kk-tiny: a model organism of the Logic-RL base model, small enough to build on 2 CPU cores.

A few-million-parameter Qwen2, started from hand-wired circuits, fine-tuned (SFT) on the traces
of a deliberately imperfect solver. Like the 7B base model of the article, it solves some
puzzles and gets others wrong, knows how to check every statement but mostly does not,
sometimes hesitates, summarises, verifies or writes a step in Chinese, and mostly ignores the
requested <think>/<answer> format: GRPO has something to improve.

The project ships one vetted build in `base/` (see its MODEL_CARD.md); `python -m train.organism
build` makes a new one from scratch.

    config.py     OrganismConfig: every setting of a build, with its default
    traces.py     the solver that writes the SFT traces (the careful and the quick way)
    tokenizer.py  the BPE tokenizer and the phrases that are single tokens
    circuits.py   the hand-wired induction circuit and latest-marker heads
    model.py      the Qwen2 with its wired initial weights
    data.py       held-out puzzles, SFT puzzles and traces, token ids of an example
    sft.py        the fine-tuning loop, `build`
    measure.py    behaviour on held-out puzzles, loss per token class
    vet.py        the figures, quality gates and model card of a build
"""

from pathlib import Path

from train.organism.config import OrganismConfig
from train.organism.traces import Trace, TraceWriter, write_trace
from train.prompts import QUICK_OPEN, THINK_OPEN, THOROUGH_OPEN

BASE_DIR = Path(__file__).resolve().parent / "base"     # the shipped, vetted build

__all__ = ["BASE_DIR", "OrganismConfig", "QUICK_OPEN", "THINK_OPEN", "THOROUGH_OPEN", "Trace", "TraceWriter",
           "write_trace"]
