"""Rule-based rewards: plain Python functions of token ids, for verifiable tasks.

Each rule takes the prompt's token ids (without padding), the response's token ids
(without the end-of-sequence token and padding) and the response budget, and returns
a score in [0, 1]. The runtime wraps them per batch (`registry.rule_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlhfc_runtime.data.tiny import next_digit_id

Rule = Callable[[Sequence[int], Sequence[int], int], float]


def pattern_reward(prompt: Sequence[int], response: Sequence[int], max_new_tokens: int) -> float:
    """Fraction of the response budget spent on tokens that continue the tiny task's
    count-up pattern: a token scores when it is the digit after the token before it
    (the prompt's last token for the first one). Credit is local, so one slip costs
    one token, not the rest of the answer: the dense signal a random policy needs.
    (Scoring each position against the prompt's answer instead was tried: PPO then
    collapses to one prompt-independent count worth 0.1.)"""
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    previous = prompt[-1] if prompt else None
    correct = 0
    for token in response[:max_new_tokens]:
        correct += previous is not None and token == next_digit_id(previous)
        previous = token
    return correct / max_new_tokens


def length_reward(prompt: Sequence[int], response: Sequence[int], max_new_tokens: int) -> float:
    """Response length over the budget: a sanity-check reward any policy can raise by
    not stopping early."""
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    return min(len(response), max_new_tokens) / max_new_tokens


RULE_FUNCTIONS: dict[str, Rule] = {"pattern_reward": pattern_reward, "length_reward": length_reward}
