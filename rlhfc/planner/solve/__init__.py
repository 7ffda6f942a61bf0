"""Planners: the CP-SAT model and the baselines it is compared with.

`plan_dataflow` is the library entry point (the CLI and the lowering stage use it);
`symmetric_plan` is the Megatron-style baseline as a `Plan`.
"""

from __future__ import annotations

import time
from dataclasses import replace

from rlhfc.planner.cost.coefficients import Coefficients, default_coefficients
from rlhfc.planner.cost.engine import engine_decisions
from rlhfc.ir import Dataflow
from rlhfc.plan import CallPlacement, Plan, Reallocation
from rlhfc.planner.solve.baselines import symmetric_choice
from rlhfc.planner.solve.cpsat import solve_cpsat
from rlhfc.planner.solve.diagnose import PlanError, check_cluster, diagnose_infeasible, run_span
from rlhfc.planner.solve.modulo import solve_modulo
from rlhfc.planner.solve.problem import Option, Problem, SearchSpace, build_problem, offloadable, with_options
from rlhfc.planner.solve.schedule import Schedule, durations, evaluate

__all__ = ["PlanError", "SearchSpace", "build_problem", "plan_dataflow", "plan_from_choice", "symmetric_plan"]


def plan_from_choice(
    problem: Problem, choice: dict[str, Option], sched: Schedule, *, status: str, bound: int,
    solve_seconds: float, baseline: Schedule | None = None, ahead: dict[str, int] | None = None,
) -> Plan:
    """Turn an evaluated assignment into a `Plan` (times in seconds, calls by start);
    `ahead` places a steady state's calls (`modulo.py`: its makespan is II)."""
    df = problem.dataflow
    start, end, realloc, moves = dict(sched.starts), dict(sched.ends), dict(sched.reallocs), dict(sched.moves)
    placements = []
    for call in sorted(problem.calls, key=lambda c: (start[c], problem.calls.index(c))):
        o = choice[call]
        peak = o.cost.peak_bytes + _resident_elsewhere(problem, choice, call)
        placements.append(CallPlacement(
            call, df.call(call).model, o.strategy, problem.seconds(start[call] + realloc[call] + moves[call]),
            problem.seconds(end[call]), peak, o.cost.peak_bytes, (ahead or {}).get(call, 0),
            engine_decisions(df, call, o.strategy, peak, problem.device),
        ))
    reallocs = []
    for call in problem.calls:
        home = problem.home_call(call)
        if home:
            cost = problem.realloc_cost(call, choice[home], choice[call])
            if cost.bytes:
                reallocs.append(Reallocation(
                    df.call(call).model, call, choice[home].strategy, choice[call].strategy, cost.bytes,
                    problem.seconds(realloc[call]),
                ))
    homes = tuple(sorted((df.call(c).model, choice[c].strategy) for c in problem.homes.values()))
    return Plan(
        df.source, df.cluster, tuple(placements), homes, tuple(reallocs), problem.seconds(sched.makespan),
        problem.seconds(min(bound, sched.makespan)), status, round(solve_seconds, 3),
        problem.seconds(baseline.makespan) if baseline else None,
        offloaded=tuple(sorted(df.call(c).model for c, o in choice.items() if o.offloaded)),
    )


def _resident_elsewhere(problem: Problem, choice: dict[str, Option], call: str) -> int:
    """Resident bytes of other models' homes on the fullest device of `call`'s mesh."""
    devices = choice[call].devices
    return max(
        (sum(o.cost.static_bytes for c, o in choice.items() if c != call and d in o.devices) for d in devices),
        default=0,
    )


def plan_dataflow(
    df: Dataflow, time_limit: float = 10.0, workers: int = 8, seed: int = 0,
    coeffs: Coefficients | None = None, space: SearchSpace = SearchSpace(),
) -> Plan:
    """The CP-SAT plan of one iteration, with its proven bound and the symmetric baseline.
    When no plan fits in device memory, frozen models may wait in host memory between
    iterations (offloaded) and the search runs again.

    With the run's `max_staleness` K ≥ 1 the steady state across iterations is solved
    next (`modulo.py`, from the synchronous plan, within what is left of the time): its
    plan when its II beats the synchronous makespan, else the synchronous plan itself.

    `time_limit` bounds the whole call (building and pruning the options, the baseline,
    both solves): when it runs out, the best plan found so far comes back with status
    FEASIBLE and its gap. `coeffs` None prices with the cluster device's defaults
    (`default_coefficients`). Raises `PlanError` (with a hint) when no placement fits."""
    t0 = time.perf_counter()
    staleness = df.run.max_staleness if df.run is not None else 0
    deadline = t0 + time_limit * (SYNC_SHARE if staleness else 1.0)
    check_cluster(df)
    coeffs = coeffs or default_coefficients(df.cluster.device)
    problem = build_problem(df, coeffs, space, deadline=t0 + BUILD_SHARE * time_limit)
    diagnose_infeasible(problem)  # per-call reasons, before the solver (offloading cannot help)
    try:
        problem, choice, sched, result, baseline = _solve(problem, deadline, workers, seed)
    except PlanError as e:  # no combination fits: frozen models may wait in host memory
        if space.offload or not any(offloadable(df, m) for m in df.models):
            _with_hint(problem, e)
        now = time.perf_counter()
        problem = build_problem(df, coeffs, replace(space, offload=True), deadline=now + BUILD_SHARE * (deadline - now))
        try:
            problem, choice, sched, result, baseline = _solve(problem, deadline, workers, seed)
        except PlanError as e:
            _with_hint(problem, e)
    status = "OPTIMAL" if result.status == "OPTIMAL" else "FEASIBLE"
    base = baseline[1] if baseline else None
    plan = plan_from_choice(
        problem, choice, sched, status=status, bound=result.bound, solve_seconds=time.perf_counter() - t0,
        baseline=base,
    )
    if not staleness:
        return plan
    left = max(0.1, t0 + time_limit - time.perf_counter() - MARGIN)
    steady = solve_modulo(problem, staleness, left, workers, seed, (choice, sched))
    plan = replace(plan, max_staleness=staleness, sync_time=plan.iteration_time)
    status = "OPTIMAL" if steady.status == "OPTIMAL" else "FEASIBLE"
    if steady.choice is None or steady.interval >= sched.makespan:  # pipelining gains nothing
        return replace(plan, lower_bound=problem.seconds(min(steady.bound, sched.makespan)), status=status,
                       solve_seconds=round(time.perf_counter() - t0, 3))
    steady_choice = dict(steady.choice)
    dur, starts = durations(problem, steady_choice), dict(steady.starts)
    frame = Schedule(steady.starts, tuple((c, starts[c] + dur[c][2]) for c in problem.calls),
                     tuple((c, dur[c][0]) for c in problem.calls), tuple((c, dur[c][1]) for c in problem.calls),
                     steady.interval)
    return replace(plan_from_choice(
        problem, steady_choice, frame, status=status, bound=steady.bound, solve_seconds=time.perf_counter() - t0,
        baseline=base, ahead=dict(steady.ahead),
    ), max_staleness=staleness, sync_time=plan.iteration_time)


# Shares of the time limit: building and pruning the options stops pruning past the
# first, the symmetric baseline stops comparing candidates past the second (of what is left).
BUILD_SHARE = 0.4
BASELINE_SHARE = 0.3
# With K ≥ 1, the share of the time limit the synchronous plan gets (the steady state's
# search starts from it and takes the rest).
SYNC_SHARE = 0.5
# Seconds kept back for assembling the plan after the solver returns.
MARGIN = 0.3


def _with_hint(problem: Problem, error: PlanError):
    """Raise `error` again, with a fix that was checked to plan when the solver gave up."""
    if error.solver_status is not None:
        diagnose_infeasible(problem, solver_status=error.solver_status)
    raise error


def _solve(problem: Problem, deadline: float, workers: int, seed: int):
    """(problem with the hint's options, choice, schedule, CP-SAT result, symmetric
    baseline) of a problem whose every call has an option; `PlanError` if none combine
    (or none was found before `deadline`)."""
    now = time.perf_counter()
    baseline = symmetric_choice(problem, deadline=now + BASELINE_SHARE * max(0.0, deadline - now))
    hint = None
    if baseline and not problem.dataflow.pins:
        problem = with_options(problem, baseline[0])
        hint = baseline
    left = max(0.1, deadline - time.perf_counter() - MARGIN)
    result = solve_cpsat(problem, left, workers, seed, hint=hint)
    if result.choice is None and not (hint and result.status == "UNKNOWN"):
        if result.status == "UNKNOWN":
            raise PlanError("no plan found within the time limit", "raise --time-limit",
                                run_span(problem.dataflow))
        diagnose_infeasible(problem, solver_status=result.status, hint=False)
    if result.choice is None:  # time limit before CP-SAT accepted the hint: keep the hint
        choice, sched = hint
        result = replace(result, status="FEASIBLE")
    else:
        choice = dict(result.choice)
        sched = evaluate(problem, choice, deadline=deadline)
    return problem, choice, sched, result, baseline


def symmetric_plan(df: Dataflow, coeffs: Coefficients | None = None) -> Plan:
    """The best one-strategy-for-all-calls plan on the whole cluster (Megatron-style)."""
    t0 = time.perf_counter()
    check_cluster(df)
    problem = build_problem(df, coeffs or default_coefficients(df.cluster.device))
    best = symmetric_choice(problem)
    if best is None:
        diagnose_infeasible(problem, solver_status="no symmetric strategy fits in memory")
    choice, sched = best
    return plan_from_choice(
        problem, choice, sched, status="HEURISTIC", bound=0, solve_seconds=time.perf_counter() - t0, baseline=sched,
    )
