"""Micro-batches by token budget: the plan's decision, as the cost model prices it and
the runtime obeys it (pure Python, no torch).

The planner chooses each call's budget, the tokens of one micro-batch on one replica,
as the largest that fits memory or a smaller one that pays (its memory is the
activations of that many tokens); the op carries it as `token_budget`, and the runtime
fills each micro-batch with whole sequences up to it (`fill`), so the number of
micro-batches follows from the lengths the call really sees."""

from __future__ import annotations

import math
from collections.abc import Sequence


def micro_batches(rows: int, length: float, budget: int) -> int:
    """How many micro-batches `fill` makes of `rows` sequences of `length` tokens each
    under `budget`: as many whole sequences as the budget holds per micro-batch. With the
    priced lengths this is the plan's n_mbs; with the shorter lengths a call really sees
    (packed, `response_len`) it is fewer."""
    per = max(1, int(budget // max(length, 1)))
    return max(1, math.ceil(rows / per))


def fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Row bounds [0, …, len(lengths)] of consecutive micro-batches, each filled with
    whole sequences while their tokens stay within `budget` (a longer sequence alone)."""
    bounds, used = [0], 0
    for row, n in enumerate(lengths):
        if row > bounds[-1] and used + n > budget:
            bounds.append(row)
            used = 0
        used += n
    return bounds + [len(lengths)] if lengths else [0]


def balanced(lengths: Sequence[int], parts: int, part: int) -> list[int]:
    """The rows (in order) of `part` of `parts` data-parallel ranks when rows are dealt
    longest first to the rank with the fewest tokens so far (ties: the lower rank), so
    every rank computes about the same tokens; each rank gets a row while rows last."""
    load = [0] * parts
    owner = [0] * len(lengths)
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        rank = min(range(parts), key=lambda k: (load[k], k))
        owner[row] = rank
        load[rank] += lengths[row]
    return [row for row in range(len(lengths)) if owner[row] == part]
