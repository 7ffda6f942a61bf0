"""Why no plan exists, said in the user's terms: which call, which limit, what would fix it."""

from __future__ import annotations

from dataclasses import replace

from rlhfc.diagnostics import CompileError, Severity, located
from rlhfc.hardware import LIMITS, cluster_problems
from rlhfc.ir import Dataflow, Span
from rlhfc.planner.solve.problem import Problem, call_options, enumerate_meshes, make_option

GIB = 1 << 30


class PlanError(CompileError):
    """No placement fits: one E027 diagnostic pointing at the call (or pin) at fault,
    rendered like every other compile error."""

    def __init__(self, message: str, hint: str | None = None, span: Span | None = None,
                 solver_status: str | None = None):
        super().__init__([located(Severity.ERROR, "E027", f"no plan fits: {message}", span, hint)])
        self.message, self.hint, self.span = message, hint, span
        self.solver_status = solver_status  # set when every call fits alone but the solver combined none


def _smallest_peak(problem: Problem, df: Dataflow, call_name: str) -> int | None:
    """The least per-device peak over every strategy of the call on `df`'s cluster."""
    call = df.call(call_name)
    model = df.model(call.model)
    is_home = problem.is_home(call_name)
    peaks = [o.cost.peak_bytes for o in call_options(
        df, call, model, enumerate_meshes(df.cluster, problem.space), problem.space, problem.device,
        problem.coeffs, is_home)]
    return min(peaks, default=None)


def _feasible(problem: Problem, df: Dataflow) -> bool:
    """Whether `df` has a plan in `problem`'s search space: every call has a fitting
    option and the symmetric baseline or a short CP-SAT solve finds a combination."""
    from rlhfc.planner.solve.baselines import symmetric_choice
    from rlhfc.planner.solve.cpsat import solve_cpsat
    from rlhfc.planner.solve.problem import build_problem

    if cluster_problems(df.cluster):
        return False
    candidate = build_problem(df, problem.coeffs, problem.space)
    if not all(opts for _, opts in candidate.options):
        return False
    if symmetric_choice(candidate) is not None:
        return True
    return solve_cpsat(candidate, time_limit=HINT_SOLVE_SECONDS, workers=2).status in ("OPTIMAL", "FEASIBLE")


HINT_SOLVE_SECONDS = 3.0


def _fix_hint(problem: Problem, call_name: str | None = None) -> str | None:
    """The smallest cluster growth, else the largest batch, with which the program was
    checked to plan (`_feasible`); `call_name` first filters candidates by that call's
    smallest peak alone (cheap). None when neither helps."""
    df = problem.dataflow
    cl = df.cluster

    def plans(candidate: Dataflow) -> bool:
        if call_name:
            peak = _smallest_peak(problem, candidate, call_name)
            if peak is None or peak > problem.capacity:
                return False
        return _feasible(problem, candidate)

    nodes = cl.nodes
    while nodes < LIMITS["nodes"][1]:
        nodes *= 2
        if plans(replace(df, cluster=replace(cl, nodes=nodes), pins=())):
            return f"needs {nodes} nodes of {cl.devices_per_node} x {cl.device} (--cluster {nodes}x{cl.devices_per_node}:{cl.device})"
    batch = min((c.batch for c in df.calls), default=1)
    while batch > 1:
        batch //= 2
        if plans(replace(df, calls=tuple(replace(c, batch=min(c.batch, batch)) for c in df.calls))):
            return f"lower batch to {batch}"
    return None


def run_span(df: Dataflow) -> Span | None:
    """Where a plan-wide E027 points: the program's `run` statement."""
    return df.run.span if df.run is not None else None


def check_cluster(df: Dataflow) -> None:
    """`PlanError` for a cluster no plan can be made for (a million nodes, 1e-300 FLOP/s):
    the frontend reports these at their source; this catches dataflows built otherwise."""
    problems = cluster_problems(df.cluster)
    if problems:
        raise PlanError(f"implausible cluster: {'; '.join(problems)}",
                        f"limits: {', '.join(f'{k} {lo:g}..{hi:g}' for k, (lo, hi) in LIMITS.items())}", run_span(df))


def diagnose_infeasible(problem: Problem, solver_status: str | None = None, hint: bool = True) -> None:
    """Raise `PlanError` for the first call with no fitting option; with `solver_status`
    (the solver found no plan although every call alone fits) blame the combination.
    `hint` False leaves out the fix (it is checked by planning again: seconds)."""
    df = problem.dataflow
    cap = problem.capacity / GIB
    pins = {p.call: p for p in df.pins}
    for call, options in problem.options:
        if options:
            continue
        c = df.call(call)
        if call in pins:
            peak = _smallest_peak_of_pin(problem, call)
            raise PlanError(
                f"pinned call `{call}` needs {peak / GIB:.1f} GiB per device under its pinned strategy; "
                f"a {df.cluster.device} has {cap:.1f} GiB",
                "raise the pin's tp/pp or n_mbs (a smaller token_budget), or remove the pin", pins[call].span,
            )
        peak = _smallest_peak(problem, df, call)
        need = f"needs at least {peak / GIB:.1f} GiB per device" if peak else "has no valid strategy"
        raise PlanError(
            f"call `{call}` ({c.kind.value} on model `{c.model}`) {need} on any mesh of "
            f"{df.cluster.nodes}x{df.cluster.devices_per_node} {df.cluster.device} ({cap:.1f} GiB each)",
            _fix_hint(problem, call), c.span,
        )
    if solver_status is not None:
        homes = ", ".join(sorted(problem.homes))
        cl = df.cluster
        fix = _fix_hint(problem) if hint and not df.pins else None
        raise PlanError(
            f"every call fits alone, but the resident parameters and optimizer state of {homes} do not fit "
            f"together with the calls on {cl.n_devices} x {cl.device} ({solver_status})",
            fix or "pins that spread the models, or a larger cluster", run_span(df), solver_status,
        )


def _smallest_peak_of_pin(problem: Problem, call_name: str) -> int:
    df = problem.dataflow
    pin = next(p for p in df.pins if p.call == call_name)
    c = df.call(call_name)
    return make_option(df, c, pin.strategy, problem.device, problem.coeffs, problem.is_home(call_name)).cost.peak_bytes
