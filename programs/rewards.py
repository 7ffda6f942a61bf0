"""Reward functions for programs/grpo_math.rlhf, in TRL's signature:
f(prompts, completions, **columns) -> list[float], one score per completion; `answer`
is the dataset column of the same name (one value per completion)."""

import re


def first_number(text):
    """The first integer in `text` (how GSM8K-style rewards extract an answer), or None."""
    match = re.search(r"-?\d+", text)
    return match.group() if match else None


def exact_match(prompts, completions, answer, **columns):
    """1 when the completion's first number is exactly the answer."""
    return [1.0 if first_number(c) == str(a) else 0.0 for c, a in zip(completions, answer)]


def format_ok(prompts, completions, **columns):
    """1 when the completion is one bare number (what the prompt asks for)."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*", c) else 0.0 for c in completions]
