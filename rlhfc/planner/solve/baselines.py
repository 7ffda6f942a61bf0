"""Plans to compare the CP-SAT plan with, all scored by the exact evaluator.

- symmetric: every call on all devices with one Megatron-style (dp, tp, pp, n_mbs),
  the best single strategy for all calls (no reallocation is then needed), n_mbs any
  power of two up to the rows (each call's token budget the one that cuts its rows
  into n_mbs micro-batches);
- brute force: every combination of options, for small cases (tests);
- MCMC: ReaL's search (Mei et al. 2024 §5): change one call's option at random, accept
  with the Metropolis rule on the makespan, within a time budget.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import replace

from rlhfc.ir import Call, Mesh, ModelKind, Strategy
from rlhfc.planner.solve.problem import (
    Option, Problem, powers_of_two, enumerate_strategies, make_option, mini_batch_rows,
)
from rlhfc.planner.solve.schedule import Schedule, durations, evaluate, fits_memory


def symmetric_choice(problem: Problem, deadline: float | None = None) -> tuple[dict[str, Option], Schedule] | None:
    """The best plan that runs every call on the whole cluster with one shared strategy.
    Every call holds every device, so the calls run one after another: a candidate's
    makespan is at least its durations' sum, so candidates are tried by that sum and the
    search stops when it reaches the best makespan (exact); with every call on every
    device the order hardly matters, so candidates are compared on a few orders and the
    best one scheduled over all orders (those tried, and candidates built, before `deadline`)."""
    df = problem.dataflow
    whole = Mesh(0, df.cluster.nodes, 0, df.cluster.devices_per_node)
    neural = [c for c in df.calls if df.model(c.model).kind != ModelKind.RULE]
    rules = {c.name: problem.by_call[c.name][0] for c in df.calls if df.model(c.model).kind == ModelKind.RULE}
    # n_mbs as a Megatron user picks it: any power of two up to the rows (micro-batches
    # of one row fit where nothing larger does)
    space = problem.space
    if space.n_mbs is None:
        space = replace(space, n_mbs=tuple(powers_of_two(max((mini_batch_rows(c) for c in neural), default=1))))
    per_call: dict[str, dict[tuple, list[Strategy]]] = {}
    for c in neural:  # degrees -> the call's strategies with them (train: with and without recompute)
        for s in enumerate_strategies(c, df.model(c.model), whole, space):
            per_call.setdefault(c.name, {}).setdefault(_degrees(c, s), []).append(s)
    shared = sorted(set.intersection(*(set(v) for v in per_call.values()))) if per_call else []
    candidates = []
    priced: dict[tuple[str, Strategy], Option] = {}  # variants share most calls' strategies

    def option(c, st: Strategy) -> Option:
        if (c.name, st) not in priced:
            priced[c.name, st] = make_option(df, c, st, problem.device, problem.coeffs, problem.is_home(c.name))
        return priced[c.name, st]

    for degrees in shared:
        if candidates and deadline is not None and time.perf_counter() > deadline:
            break  # past the deadline: compare the candidates built so far
        for variant in itertools.product(*(per_call[c.name][degrees] for c in neural)):
            choice = dict(rules)
            for c, st in zip(neural, variant):
                choice[c.name] = option(c, st)
            # every call holds every device, so the makespan is at least the sum of durations
            candidates.append((sum(o.duration for o in choice.values()), len(candidates), choice))
    best = None
    for total, _, choice in sorted(candidates, key=lambda t: t[:2]):
        if best is not None and total >= best[1].makespan:
            break  # no later candidate can be faster
        sched = evaluate(problem, choice, max_orders=SYMMETRIC_ORDERS, deadline=deadline)
        if sched and (best is None or sched.makespan < best[1].makespan):
            best = (choice, sched)
        if best is not None and deadline is not None and time.perf_counter() > deadline:
            break  # past the deadline: the best so far (once one fits)
    if best is None:
        return None
    return best[0], evaluate(problem, best[0], deadline=deadline)


SYMMETRIC_ORDERS = 20


def _degrees(c: Call, s: Strategy) -> tuple[int, int, int, int]:
    """What the calls of a symmetric plan share: the degrees and the micro-batch count."""
    return (s.dp, s.tp, s.pp, c.n_mbs(s))


def brute_force(problem: Problem) -> tuple[dict[str, Option], Schedule] | None:
    """The exact optimum by enumerating every combination (only for tiny problems)."""
    calls = problem.calls
    best = None
    for combo in itertools.product(*(problem.by_call[c] for c in calls)):
        choice = dict(zip(calls, combo))
        sched = evaluate(problem, choice)
        if sched and (best is None or sched.makespan < best[1].makespan):
            best = (choice, sched)
    return best


def mcmc(
    problem: Problem, budget_seconds: float, seed: int = 0, temperature: float = 0.05,
    start: dict[str, Option] | None = None,
) -> tuple[dict[str, Option], Schedule] | None:
    """Metropolis search over assignments; `temperature` is relative to the current makespan."""
    rng = random.Random(seed)
    calls = [c for c in problem.calls if len(problem.by_call[c]) > 1]
    current = dict(start) if start else None
    sched = evaluate(problem, current) if current else None
    deadline = time.perf_counter() + budget_seconds
    while sched is None and time.perf_counter() < deadline:  # random feasible start
        current = {c: rng.choice(problem.by_call[c]) for c in problem.calls}
        sched = evaluate(problem, current)
    if sched is None:
        return None
    best = (dict(current), sched)
    while calls and time.perf_counter() < deadline:
        c = rng.choice(calls)
        proposal = dict(current)
        proposal[c] = rng.choice(problem.by_call[c])
        new = evaluate(problem, proposal)
        if new is None:
            continue
        delta = (new.makespan - sched.makespan) / max(sched.makespan, 1)
        if delta <= 0 or rng.random() < math.exp(-delta / temperature):
            current, sched = proposal, new
            if sched.makespan < best[1].makespan:
                best = (dict(current), sched)
    return best


def brute_force_modulo(problem: Problem, staleness: int, cap: int) -> tuple[dict[str, Option], int] | None:
    """The least II ≤ `cap` of the modulo model (`modulo.py`), by enumerating every
    combination of options, every `ahead` and every order of the calls' offsets in a
    body (only for tiny problems). With the order fixed, the model is a system of
    difference constraints in the offsets that loosens as II grows: II is bisected, each
    candidate checked by Bellman-Ford."""
    from rlhfc.planner.solve.modulo import max_ahead

    calls = problem.calls
    best = None
    for combo in itertools.product(*(problem.by_call[c] for c in calls)):
        choice = dict(zip(calls, combo))
        if not fits_memory(problem, choice):
            continue
        size = {c: total for c, (_, _, total) in durations(problem, choice).items()}
        tasks = _modulo_tasks(problem, choice, size)
        limit = cap if best is None else best[1] - 1
        if _device_load(tasks) > limit or max(size.values()) > limit:
            continue
        for ahead in itertools.product(*(range(max_ahead(problem, c, staleness) + 1) for c in calls)):
            a = dict(zip(calls, ahead))
            for order in itertools.permutations(calls):
                limit = cap if best is None else best[1] - 1
                if not _modulo_feasible(problem, size, tasks, a, order, limit):
                    continue
                lo, hi = 1, limit  # hi feasible
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if _modulo_feasible(problem, size, tasks, a, order, mid) else (mid + 1, hi)
                best = (choice, hi)
    return best


def _modulo_tasks(problem: Problem, choice: dict[str, Option], size: dict[str, int]) -> list[tuple[str, int, frozenset]]:
    """(call, length, devices) of what occupies devices from a call's offset: the call on
    its mesh, and its reallocation on its home's devices where the call does not run."""
    tasks = [(c, size[c], choice[c].devices) for c in problem.calls]
    for c, (realloc, _, _) in durations(problem, choice).items():
        home = problem.home_call(c)
        senders = choice[home].devices - choice[c].devices if home else frozenset()
        if realloc and senders:
            tasks.append((c, realloc, senders))
    return [t for t in tasks if t[1] > 0 and t[2]]


def _device_load(tasks) -> int:
    load: dict[int, int] = {}
    for _, length, devices in tasks:
        for d in devices:
            load[d] = load.get(d, 0) + length
    return max(load.values(), default=0)


def _modulo_feasible(problem: Problem, size, tasks, ahead, order, ii: int) -> bool:
    """Offsets in [0, II) in `order` exist for this II (Bellman-Ford: no negative cycle)."""
    if any(s > ii for s in size.values()):
        return False
    pos = {c: i for i, c in enumerate(order)}
    edges = []  # (i, j, w): r_j − r_i ≥ w
    for c in order:
        edges += [("0", c, 0), (c, "0", 1 - ii)]
    edges += [(a, b, 0) for a, b in zip(order, order[1:])]
    for (a, la, da), (b, lb, db) in itertools.combinations(tasks, 2):
        if a != b and da & db:
            if pos[a] > pos[b]:
                a, la, b, lb = b, lb, a, la
            edges += [(a, b, la), (b, a, lb - ii)]
    for src, dst in problem.edges:
        edges.append((src, dst, size[src] + (ahead[dst] - ahead[src]) * ii))
    dist = dict.fromkeys(list(order) + ["0"], 0)
    for _ in range(len(dist)):
        changed = False
        for i, j, w in edges:  # r_i ≤ r_j − w: relax i from j
            if dist[j] - w < dist[i]:
                dist[i], changed = dist[j] - w, True
        if not changed:
            return True
    return False
