"""The prompt a model sees for a puzzle: chat messages, or the reference's pre-filled raw text.

One home for the system prompt, so training, evaluation, the model organism and the analysis
all ask the same question the same way.
"""

from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "You are a helpful assistant. The assistant first thinks about the reasoning process in "
    "the mind and then provides the user with the answer. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>. Now the user asks "
    "you to solve a logical reasoning problem. After thinking, when you finally reach a "
    "conclusion, clearly state the identity of each character within <answer> </answer> tags. "
    "i.e., <answer> (1) Zoey is a knight\n(2) ... </answer>."
)

# A Qwen-style ChatML template, used for the kk-tiny tokenizer (and matching Qwen2.5's layout).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# How a response's think block opens, the careful way or the quick way (the kk-tiny organism
# is trained on both; the analyses read the choice between them at THINK_OPEN).
THINK_OPEN = "<think>\n"
THOROUGH_OPEN = "Check each statement as soon as everyone it names is assigned."
QUICK_OPEN = "Take the first assignment that fits the first statement."


def chat_messages(quiz: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Messages for engines that apply the tokenizer's chat template themselves."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": quiz}]


def raw_prompt(quiz: str, tokenizer: Any | None = None, system_prompt: str = SYSTEM_PROMPT,
               prefill_think: bool = True) -> str:
    """The reference's raw prompt: the chat rendered to text with `<think>` pre-filled.

    With a tokenizer its own chat template renders the messages; without one, ChatML (the
    Qwen2.5 layout the reference data uses).
    """
    messages = chat_messages(quiz, system_prompt)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        text += "<|im_start|>assistant\n"
    return text + ("<think>" if prefill_think else "")
