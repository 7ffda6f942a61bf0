"""The steady-state (modulo) schedule of an asynchronous plan (`max_staleness` K ≥ 1).

Iterations start II (the initiation interval) apart. Iteration i's call c runs in body
i − a_c, at offset r_c ∈ [0, II) of that body: a_c (`CallPlacement.ahead`, 0..K, 0 for
train calls) is how many iterations ahead of the step being trained it runs. In the
frame of one iteration (0 = the start of the body that trains it) the call starts at
T_c = r_c − a_c·II, which is what the plan reports.

- Choice, reallocation and sizes as in the synchronous model (`cpsat.call_vars`), and
  the same memory constraints: calls on one device still never overlap.
- Data and same-iteration parameter edges: T_dst ≥ T_src + size_src (so a producer
  runs at least as far ahead as its consumers).
- Per-device non-overlap modulo II: on every device atom, one NoOverlap over each
  present call's interval [r_c, r_c + size_c) and its copy one body earlier,
  [r_c − II, r_c − II + size_c). With offsets in [0, II) that is exact, and the two
  copies of one call force size_c ≤ II.
- Weights: a call's reallocation [r_c, r_c + realloc_c) occupies its home call's
  devices too (they send), so it never overlaps the train call modulo II: it reads the
  whole update of the previous body or of its own. A call a_c ahead then reads a policy
  at most a_c ≤ K updates old, and T_c + (1 + K)·II ≥ end of the train call holds.
- Symmetry: shifting every call by one time keeps a steady state valid, so the earliest
  offset is 0. Redundant cuts: Σ duration·|mesh| ≤ devices·II, and each atom's calls'
  durations ≤ II. Minimise II, at most the synchronous plan's makespan (the
  synchronous schedule is a steady state with every a_c = 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from rlhfc.ir import CallKind
from rlhfc.planner.solve.cpsat import (
    add_memory, atom_presence, call_vars, device_atoms, first_optimal, memory_terms, picked_options,
)
from rlhfc.planner.solve.problem import Option, Problem
from rlhfc.planner.solve.schedule import Schedule


@dataclass(frozen=True)
class ModuloResult:
    """What CP-SAT proved about the steady state: choice, II, each call's start in its
    iteration's frame (reallocation included) and how far ahead it runs, bound, status."""

    choice: tuple[tuple[str, Option], ...] | None
    interval: int | None
    starts: tuple[tuple[str, int], ...]
    ahead: tuple[tuple[str, int], ...]
    bound: int
    status: str
    seconds: float


def modulo_lower_bound(problem: Problem) -> int:
    """II no steady state beats, without search: every call fits in one interval, and
    the least device-time of all calls spread over the whole cluster."""
    opts = problem.by_call
    longest = max((min(o.duration for o in opts[c]) for c in problem.calls), default=0)
    energy = sum(min(o.duration * max(1, len(o.devices)) for o in opts[c]) for c in problem.calls)
    return max(1, longest, -(-energy // problem.dataflow.cluster.n_devices))


def max_ahead(problem: Problem, call: str, staleness: int) -> int:
    """Train calls run in the body that trains their iteration; others up to K ahead."""
    return 0 if problem.dataflow.call(call).kind is CallKind.TRAIN else staleness


def solve_modulo(
    problem: Problem, staleness: int, time_limit: float, workers: int, seed: int,
    sync: tuple[dict[str, Option], Schedule],
) -> ModuloResult:
    """Minimise II within `time_limit` seconds (building included), seeded with and
    capped by the synchronous plan `sync`."""
    t0 = time.perf_counter()
    m = cp_model.CpModel()
    calls = problem.calls
    v = call_vars(m, problem)
    x, size, realloc = v.x, v.size, v.realloc
    ub = sync[1].makespan
    lb = min(modulo_lower_bound(problem), ub)
    ii = m.NewIntVar(lb, ub, "ii")
    r = {c: m.NewIntVar(0, ub, f"r[{c}]") for c in calls}
    early = {c: m.NewIntVar(-ub, ub, f"early[{c}]") for c in calls}  # r − II: one body earlier
    frame = {c: m.NewIntVar(-staleness * ub, ub, f"frame[{c}]") for c in calls}
    ahead = {c: [m.NewBoolVar(f"ahead[{c},{a}]") for a in range(max_ahead(problem, c, staleness) + 1)]
             for c in calls}
    for c in calls:
        m.Add(r[c] < ii)
        m.Add(early[c] == r[c] - ii)
        m.AddExactlyOne(ahead[c])
        for a, lit in enumerate(ahead[c]):
            m.Add(frame[c] + a * ii == r[c]).OnlyEnforceIf(lit)
    for src, dst in problem.edges:
        m.Add(frame[dst] >= frame[src] + size[src])
    m.AddMinEquality(0, list(r.values()))

    def interval(start, length, present, name):
        end = m.NewIntVar(-ub, 2 * ub, f"end[{name}]")
        m.Add(end == start + length)
        return m.NewOptionalIntervalVar(start, length, end, present, name)

    opts = problem.by_call
    memory = memory_terms(problem, x)
    for n, (_, keys) in enumerate(device_atoms(problem)):
        present = atom_presence(m, x, keys, n)
        intervals = [interval(s[c], size[c], p, f"{tag}[{c},{n}]")
                     for c, p in present.items() for s, tag in ((r, "iv"), (early, "ev"))]
        for c in realloc:
            home = problem.home_call(c)
            if home not in present:
                continue
            sending = present[home]
            if c in present:  # the home's devices send only where the call does not run
                sending = m.NewBoolVar(f"send[{c},{n}]")
                m.Add(sending >= present[home] - present[c])
                m.Add(sending <= present[home])
                m.Add(sending + present[c] <= 1)
            intervals += [interval(s[c], realloc[c], sending, f"{tag}[{c},{n}]") for s, tag in ((r, "rs"), (early, "es"))]
        m.AddNoOverlap(intervals)
        m.Add(sum(opts[c][i].duration * x[c, i] for c, i in keys) <= ii)
        add_memory(m, problem, memory, keys)
    m.Add(sum(o.duration * len(o.devices) * x[c, i] for c in calls for i, o in enumerate(opts[c]))
          <= problem.dataflow.cluster.n_devices * ii)
    m.Minimize(ii)
    _add_hint(m, problem, sync, x, r, frame, ahead, realloc, ii)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit - (time.perf_counter() - t0))
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.Solve(m)
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ModuloResult(None, None, (), (), lb, name, time.perf_counter() - t0)
    best = int(solver.ObjectiveValue())
    bound = max(int(solver.BestObjectiveBound()), min(best, lb))

    def read() -> tuple:
        picked = picked_options(solver, problem, x)
        return (picked, tuple((c, solver.Value(frame[c])) for c in calls),
                tuple((c, next(a for a, lit in enumerate(ahead[c]) if solver.BooleanValue(lit))) for c in calls))

    picked, starts, aheads = read()
    if status == cp_model.OPTIMAL:  # the tie-break gets as long as the proof took, at most
        spent = time.perf_counter() - t0
        _, proven = first_optimal(m, solver, problem, x, ii, best, picked, min(spent, time_limit - spent))
        if proven:
            picked, starts, aheads = read()
    choice = tuple((c, opts[c][picked[c]]) for c in calls)
    return ModuloResult(choice, best, starts, aheads, bound, name, time.perf_counter() - t0)


def _add_hint(m, problem: Problem, sync: tuple[dict[str, Option], Schedule], x, r, frame, ahead, realloc, ii) -> None:
    """The synchronous plan as a steady state: every call 0 ahead, II its makespan."""
    choice, sched = sync
    starts, reallocs = dict(sched.starts), dict(sched.reallocs)
    for c in problem.calls:
        for i, o in enumerate(problem.by_call[c]):
            m.AddHint(x[c, i], o == choice[c])
        m.AddHint(r[c], starts[c])
        m.AddHint(frame[c], starts[c])
        for a, lit in enumerate(ahead[c]):
            m.AddHint(lit, a == 0)
        if c in realloc:
            m.AddHint(realloc[c], reallocs[c])
    m.AddHint(ii, sched.makespan)
