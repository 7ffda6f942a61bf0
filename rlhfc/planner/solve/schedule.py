"""Exact evaluation of one assignment of options: memory check and the best schedule.

With every call's devices and duration fixed, the best makespan is reached by a serial
schedule-generation pass (each call at its earliest start where its devices are free,
gaps allowed) over some precedence-feasible order of the calls (Kolisch 1996: the serial
scheme over all orders reaches every active schedule, and one of them is optimal). We
try every topological order, so the result is exact; CP-SAT, brute force and MCMC are
compared on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rlhfc.planner.solve.problem import Option, Problem, kib

MAX_ORDERS = 5000


@dataclass(frozen=True)
class Schedule:
    """Start and end (time units) of every call; the reallocation and the data moves its
    devices receive at its start, before it computes; the makespan."""

    starts: tuple[tuple[str, int], ...]
    ends: tuple[tuple[str, int], ...]
    reallocs: tuple[tuple[str, int], ...]
    moves: tuple[tuple[str, int], ...]
    makespan: int


def durations(problem: Problem, choice: dict[str, Option]) -> dict[str, tuple[int, int, int]]:
    """Call -> (reallocation units, incoming data-move units, total units) under `choice`."""
    out = {}
    moves = problem.moves_in(choice)
    for call, opt in choice.items():
        home = problem.home_call(call)
        r = problem.realloc(call, choice[home], opt) if home else 0
        out[call] = (r, moves[call], r + moves[call] + opt.duration)
    return out


def fits_memory(problem: Problem, choice: dict[str, Option]) -> bool:
    """Resident state of every home on a device plus the largest transient of a call there
    (in KiB, as the CP-SAT model counts)."""
    resident: dict[int, int] = {}
    for opt in choice.values():
        for d in opt.devices:
            resident[d] = resident.get(d, 0) + kib(opt.cost.static_bytes)
    return all(
        resident[d] + kib(opt.cost.transient_bytes) <= problem.capacity_kib
        for opt in choice.values() for d in opt.devices
    )


def _topological_orders(calls: list[str], preds: dict[str, set[str]], limit: int):
    """Yield up to `limit` orders respecting `preds`, in a fixed (program) order."""
    count = 0

    def rec(prefix: list[str], placed: set[str]):
        nonlocal count
        if count >= limit:
            return
        if len(prefix) == len(calls):
            count += 1
            yield list(prefix)
            return
        for c in calls:
            if c not in placed and preds[c] <= placed:
                prefix.append(c)
                placed.add(c)
                yield from rec(prefix, placed)
                prefix.pop()
                placed.discard(c)

    yield from rec([], set())


def serial_schedule(problem: Problem, choice: dict[str, Option], order: list[str],
                    dur: dict[str, tuple[int, int, int]]):
    """Place calls in `order`, each at its earliest gap-respecting start."""
    busy: dict[int, list[tuple[int, int]]] = {}
    start, end = {}, {}
    for c in order:
        t = max((end[s] for s, d in problem.edges if d == c), default=0)
        length = dur[c][2]
        devices = choice[c].devices
        moved = True
        while moved and length > 0:
            moved = False
            for d in devices:
                for a, b in busy.get(d, ()):
                    if a < t + length and t < b:
                        t, moved = b, True
        start[c], end[c] = t, t + length
        if length > 0:
            for d in devices:
                busy.setdefault(d, []).append((t, t + length))
    return start, end


def evaluate(
    problem: Problem, choice: dict[str, Option], max_orders: int = MAX_ORDERS, deadline: float | None = None,
) -> Schedule | None:
    """The optimal schedule of `choice` (over up to `max_orders` orders, and those tried
    before the `time.perf_counter()` `deadline`), or None if it does not fit in memory."""
    if not fits_memory(problem, choice):
        return None
    dur = durations(problem, choice)
    calls = list(problem.calls)
    preds = {c: {s for s, d in problem.edges if d == c} for c in calls}
    best = None
    for order in _topological_orders(calls, preds, max_orders):
        start, end = serial_schedule(problem, choice, order, dur)
        span = max(end.values(), default=0)
        if best is None or span < best[2]:
            best = (start, end, span)
        if deadline is not None and time.perf_counter() > deadline:
            break
    start, end, span = best
    return Schedule(
        tuple((c, start[c]) for c in calls), tuple((c, end[c]) for c in calls),
        tuple((c, dur[c][0]) for c in calls), tuple((c, dur[c][1]) for c in calls), span,
    )
