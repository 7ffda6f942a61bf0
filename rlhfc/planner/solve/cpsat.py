"""The CP-SAT model of the planning problem.

- x[c,o]: call c runs with option o; exactly one per call.
- start/end/size per call, size = Σ duration(o)·x[c,o] + realloc(c) + moves(c), where
  moves(c) = Σ over data edges (p, c) of units(p, c)·differ(p, c): the call's devices
  receive its inputs from calls in other layouts first (senders do not wait).
- Resources are device *atoms*: maximal device sets that every option covers wholly or
  not at all (a whole node when no option slices it); one NoOverlap per atom over
  optional intervals (start, size, end) of the calls, present iff the call's chosen
  option covers the atom.
- Precedence: end(src) ≤ start(dst) for data edges and same-iteration parameter edges.
- Reallocation (exact, no pair literals): with y[m,L] = Σ x over the home call's
  options of layout L, for each layout L' of a non-home call c of model m,
  realloc(c) ≥ Σ_L R(L, L')·y[m,L], enforced only if c uses layout L'. Minimising the
  makespan never wants realloc(c) above its lower bound on the critical path.
- Memory (whole KiB) per atom and per call c: Σ resident bytes of the home options covering the atom
  (one variable per atom) + Σ transient bytes of c's options covering it ≤ capacity (calls on one device never
  overlap, so the peak is the largest single call on top of the resident state).
- Redundant energy cut: Σ duration·|mesh|·x ≤ devices·makespan.
- Objective: makespan ≥ end(c), integer time units (µs, durations rounded up).
- Tie-break: once the makespan is proven optimal, a second solve with makespan ≤ that
  optimum picks the plan whose option indices come first, call by call (`first_optimal`).
The result's bound is CP-SAT's BestObjectiveBound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from rlhfc.planner.solve.problem import Option, Problem, by_layout, kib
from rlhfc.planner.solve.schedule import Schedule


@dataclass(frozen=True)
class SolveResult:
    """What CP-SAT proved: the chosen option per call, makespan, bound, status, seconds."""

    choice: tuple[tuple[str, Option], ...] | None
    makespan: int | None
    bound: int
    status: str
    seconds: float


def device_atoms(problem: Problem) -> list[tuple[frozenset[int], list[tuple[str, int]]]]:
    """Group devices by the set of options covering them."""
    cover: dict[int, list[tuple[str, int]]] = {}
    for call, opts in problem.options:
        for i, o in enumerate(opts):
            for d in o.devices:
                cover.setdefault(d, []).append((call, i))
    groups: dict[tuple, set[int]] = {}
    for d, keys in cover.items():
        groups.setdefault(tuple(keys), set()).add(d)
    return sorted(((frozenset(ds), list(k)) for k, ds in groups.items()), key=lambda a: min(a[0]))


@dataclass(frozen=True)
class CallVars:
    """The per-call part shared by the synchronous and the modulo model: x[c,o], the
    reallocation and the size (realloc + moves + duration) of every call."""

    x: dict
    size: dict
    realloc: dict
    horizon: int  # a size no schedule of one iteration needs to exceed


def call_vars(m, problem: Problem) -> CallVars:
    """Choice, reallocation and size variables with their constraints."""
    opts = problem.by_call
    max_realloc = {}
    for call in problem.calls:
        home = problem.home_call(call)
        if home:
            max_realloc[call] = max(
                (problem.realloc(call, h, o) for h in by_layout(opts[home]).values() for o in by_layout(opts[call]).values()),
                default=0,
            )
    horizon = sum(max(o.duration for o in opts[c]) + max_realloc.get(c, 0) for c in problem.calls)
    horizon += sum(t for _, _, t in problem.moves) + 1
    x = {(c, i): m.NewBoolVar(f"x[{c},{i}]") for c in problem.calls for i in range(len(opts[c]))}
    realloc = {c: m.NewIntVar(0, r, f"realloc[{c}]") for c, r in max_realloc.items()}
    size = {c: m.NewIntVar(0, horizon, f"size[{c}]") for c in problem.calls}
    used = {c for a, b, _ in problem.moves for c in (a, b)} | set(realloc) | {problem.home_call(c) for c in realloc}
    layouts = {c: _layout_vars(m, x, c, opts[c]) for c in problem.calls if c in used}  # y[c][L]: c runs in layout L
    moves = _move_terms(m, problem, layouts)
    for c in problem.calls:
        m.AddExactlyOne(x[c, i] for i in range(len(opts[c])))
        m.Add(size[c] == realloc.get(c, 0) + sum(moves[c]) + sum(o.duration * x[c, i] for i, o in enumerate(opts[c])))
    _add_realloc(m, problem, layouts, realloc)
    return CallVars(x, size, realloc, horizon)


def atom_presence(m, x, keys: list[tuple[str, int]], n: int) -> dict:
    """Call -> the literal "its chosen option covers atom `n`" (`keys`: the atom's options)."""
    out = {}
    for call in sorted({c for c, _ in keys}):
        covering = [x[c, i] for c, i in keys if c == call]
        if len(covering) == 1:
            out[call] = covering[0]
        else:
            out[call] = m.NewBoolVar(f"on[{call},{n}]")
            m.Add(out[call] == sum(covering))
    return out


def solve_cpsat(
    problem: Problem, time_limit: float = 10.0, workers: int = 8, seed: int = 0,
    hint: tuple[dict[str, Option], Schedule] | None = None,
) -> SolveResult:
    """Build and solve the model within `time_limit` seconds, building included; `hint`
    (e.g. the symmetric plan and its schedule) seeds the search and caps the makespan."""
    t0 = time.perf_counter()
    m = cp_model.CpModel()
    opts = problem.by_call
    if not all(opts[c] for c in problem.calls):  # a call with no fitting option: nothing to search
        return SolveResult(None, None, 0, "INFEASIBLE", time.perf_counter() - t0)
    v = call_vars(m, problem)
    x, size, realloc, horizon = v.x, v.size, v.realloc, v.horizon
    start = {c: m.NewIntVar(0, horizon, f"start[{c}]") for c in problem.calls}
    end = {c: m.NewIntVar(0, horizon, f"end[{c}]") for c in problem.calls}
    for c in problem.calls:
        m.Add(end[c] == start[c] + size[c])
    for src, dst in problem.edges:
        m.Add(start[dst] >= end[src])
    memory = memory_terms(problem, x)
    for n, (_, keys) in enumerate(device_atoms(problem)):
        present = atom_presence(m, x, keys, n)
        m.AddNoOverlap([m.NewOptionalIntervalVar(start[c], size[c], end[c], p, f"iv[{c},{n}]")
                        for c, p in present.items()])
        add_memory(m, problem, memory, keys)
    makespan = m.NewIntVar(0, horizon, "makespan")
    m.AddMaxEquality(makespan, list(end.values()))
    # Redundant energy cut (tightens the bound): busy device-time fits in the cluster.
    m.Add(sum(o.duration * len(o.devices) * x[c, i] for c in problem.calls for i, o in enumerate(opts[c]))
          <= problem.dataflow.cluster.n_devices * makespan)
    m.Minimize(makespan)
    if hint:
        _add_hint(m, problem, hint, x, start, end, realloc, makespan)
    solver = cp_model.CpSolver()
    # Parallel workers race, so the optimal plan found first varies from run to run;
    # `first_optimal` makes it unique. A run cut by the wall-clock limit may still differ.
    solver.parameters.max_time_in_seconds = max(0.05, time_limit - (time.perf_counter() - t0))  # building counts
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.Solve(m)
    name = solver.StatusName(status)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return SolveResult(None, None, static_lower_bound(problem), name, time.perf_counter() - t0)
    picked = picked_options(solver, problem, x)
    best = int(solver.ObjectiveValue())
    bound = max(int(solver.BestObjectiveBound()), min(best, static_lower_bound(problem)))
    if status == cp_model.OPTIMAL:
        picked, _ = first_optimal(m, solver, problem, x, makespan, best, picked, time_limit - (time.perf_counter() - t0))
    choice = tuple((c, opts[c][picked[c]]) for c in problem.calls)
    return SolveResult(choice, best, bound, name, time.perf_counter() - t0)


def static_lower_bound(problem: Problem) -> int:
    """A bound no plan beats, known without search (it matters when the time limit stops
    CP-SAT early): the longest dependency chain of the calls' fastest options, and the
    least device-time of all calls spread over the whole cluster."""
    opts = problem.by_call
    fastest = {c: min((o.duration for o in opts[c]), default=0) for c in problem.calls}
    finish = dict(fastest)
    for _ in problem.calls:  # relax along the (acyclic) edges until every chain is counted
        finish = {c: fastest[c] + max((finish[src] for src, dst in problem.edges if dst == c), default=0)
                  for c in problem.calls}
    energy = sum(min((o.duration * max(1, len(o.devices)) for o in opts[c]), default=0) for c in problem.calls)
    return max(max(finish.values(), default=0), -(-energy // problem.dataflow.cluster.n_devices))


def first_optimal(m, solver, problem: Problem, x, makespan, best: int, picked: dict[str, int], time_left: float):
    """Among the plans of makespan `best`, the one whose option indices, read call by call,
    come first (a mixed-radix rank, so exactly one plan minimises it): the same plan
    whichever optimum the racing workers found. (picked, True), with the solver holding
    that plan; (`picked`, False) if it is not proven in time."""
    rank, weight = [], 1
    for c in reversed(problem.calls):
        n = len(problem.by_call[c])
        index = m.NewIntVar(0, n - 1, f"index[{c}]")  # keeps the rank's terms within int64
        m.Add(index == sum(i * x[c, i] for i in range(1, n)))
        rank.append(weight * index)
        weight *= n
    m.Add(makespan <= best)
    m.Minimize(sum(rank))
    m.ClearHints()
    for (c, i), var in x.items():
        m.AddHint(var, picked[c] == i)
    solver.parameters.max_time_in_seconds = max(time_left, 0.1)
    if solver.Solve(m) == cp_model.OPTIMAL:
        return picked_options(solver, problem, x), True
    return picked, False


def picked_options(solver, problem: Problem, x) -> dict[str, int]:
    """The option index each call takes in the solver's solution."""
    return {c: next(i for i in range(len(problem.by_call[c])) if solver.BooleanValue(x[c, i])) for c in problem.calls}


def _add_hint(m, problem: Problem, hint, x, start, end, realloc, makespan) -> None:
    """Hint a complete solution (choice and times) and bound the makespan by it."""
    choice, sched = hint
    for c in problem.calls:
        for i, o in enumerate(problem.by_call[c]):
            m.AddHint(x[c, i], o == choice[c])
    starts, ends, reallocs = dict(sched.starts), dict(sched.ends), dict(sched.reallocs)
    for c in problem.calls:
        m.AddHint(start[c], starts[c])
        m.AddHint(end[c], ends[c])
        if c in realloc:
            m.AddHint(realloc[c], reallocs[c])
    m.AddHint(makespan, sched.makespan)
    m.Add(makespan <= sched.makespan)


def _move_terms(m, problem: Problem, layouts: dict[str, dict]) -> dict[str, list]:
    """Per call, the units·differ terms of its incoming moves: differ ≥ y_src[L] − y_dst[L]
    for every layout L of the producer (exactly one y_src is 1, so differ is forced to 1
    unless the consumer uses the same layout; minimising never sets it needlessly)."""
    out: dict[str, list] = {c: [] for c in problem.calls}
    for src, dst, units in problem.moves:
        y_src, y_dst = layouts[src], layouts[dst]
        differ = m.NewBoolVar(f"moves[{src},{dst}]")
        for layout, y in y_src.items():
            m.Add(differ >= y - y_dst.get(layout, 0))
        out[dst].append(units * differ)
    return out


def _add_realloc(m, problem: Problem, layouts: dict[str, dict], realloc) -> None:
    opts = problem.by_call
    for c in realloc:
        home = problem.home_call(c)
        y_home, y_dst = layouts[home], layouts[c]
        homes = by_layout(opts[home])
        for layout, rep in by_layout(opts[c]).items():
            terms = [problem.realloc(c, h, rep) * y_home[hl] for hl, h in homes.items()]
            m.Add(realloc[c] >= sum(terms)).OnlyEnforceIf(y_dst[layout])


def _layout_vars(m, x, call: str, options: tuple[Option, ...]) -> dict[tuple, cp_model.IntVar]:
    """y[L] ⇔ the call uses one of its options of layout L."""
    members: dict[tuple, list] = {}
    for i, o in enumerate(options):
        members.setdefault(o.layout, []).append(x[call, i])
    out = {}
    for layout, xs in members.items():
        if len(xs) == 1:
            out[layout] = xs[0]
        else:
            y = m.NewBoolVar(f"y[{call},{len(out)}]")
            m.Add(y == sum(xs))
            out[layout] = y
    return out


def memory_terms(problem: Problem, x) -> dict[tuple[str, int], tuple]:
    """(x, resident KiB, transient KiB) of every option, computed once for all atoms."""
    return {(c, i): (x[c, i], kib(o.cost.static_bytes), kib(o.cost.transient_bytes))
            for c, opts in problem.options for i, o in enumerate(opts)}


def add_memory(m, problem: Problem, terms: dict, keys: list[tuple[str, int]]) -> None:
    """Resident state of homes on this atom (one variable, so each call's constraint holds
    only its own options) + transient of each call ≤ capacity."""
    held = [terms[k] for k in keys if terms[k][1]]
    resident = m.NewIntVar(0, problem.capacity_kib, f"resident[{keys[0]}]")
    m.Add(resident == cp_model.LinearExpr.WeightedSum([t[0] for t in held], [t[1] for t in held]))
    by_call: dict[str, list] = {}
    for k in keys:
        by_call.setdefault(k[0], []).append(terms[k])
    for call in sorted(by_call):
        own = by_call[call]
        m.Add(resident + cp_model.LinearExpr.WeightedSum([t[0] for t in own], [t[2] for t in own])
              <= problem.capacity_kib)
