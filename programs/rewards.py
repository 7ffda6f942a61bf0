"""Reward functions for programs/grpo_math.rlhf, in TRL's signature:
f(prompts, completions, **columns) -> list[float], one score per completion; `answer`
is the dataset column of the same name (one value per completion)."""

import re


def exact_match(prompts, completions, answer, **columns):
    """1 when the completion, stripped, is exactly the answer."""
    return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]


def format_ok(prompts, completions, **columns):
    """1 when the completion is a bare number (what the task asks for)."""
    return [1.0 if re.fullmatch(r"\s*-?\d+\s*", c) else 0.0 for c in completions]
