"""`rlhfc plan --explain`: why each call costs what the planner thinks it costs.

The plan is priced again term by term with the very functions the solver used (each call
pinned to its planned strategy), so the terms of a call add up to its estimate: compute,
decode (memory- or compute-bound), the optimizer step, tensor- and data-parallel
all-reduces, the pipeline bubble, fixed per-step overheads, the reload of an offloaded
model's weights, plus the reallocation of its
model before it and the data moves its devices receive before it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.console import Console

from rlhfc.planner.cost.coefficients import Coefficients, default_coefficients
from rlhfc.ir import Dataflow, Pin, Span, Strategy
from rlhfc.plan import Plan
from rlhfc.planner.report import compact_table
from rlhfc.hardware import device_for
from rlhfc.planner.solve.problem import Option, Problem, SearchSpace, build_problem
from rlhfc.planner.solve.schedule import evaluate

# Display order and headings of the cost model's terms (`CallCost.terms`).
TERMS: tuple[tuple[str, str], ...] = (
    ("compute", "compute"), ("decode_memory", "dec.mem"), ("decode_compute", "dec.flop"),
    ("optimizer", "optim"), ("tp", "tp"), ("dp", "dp"), ("bubble", "bubble"),
    ("overhead", "ovh"), ("decode_overhead", "dec.ovh"), ("recompute", "rc"), ("reload", "reload"),
    ("old_logp", "old.lp"),
    ("engine_sync", "eng.sync"), ("engine_recompute", "eng.rc"),  # a generate call on vLLM (`cost.engine`)
)
_SPAN = Span("<plan>", 0, 0, 0, 0)


@dataclass(frozen=True)
class CallExplanation:
    """One call's estimate in parts (seconds); `terms` sum to `estimate` up to the solver's
    rounding to whole time units."""

    call: str
    model: str
    strategy: Strategy
    terms: tuple[tuple[str, float], ...]
    realloc: float  # reallocating the model from its home layout, before the call
    transfer: float  # the data moves into the call from other layouts, received before it
    estimate: float  # the call's duration in the plan (end − start)
    roofline: float = 0.0  # the same call at peak FLOP/s and bandwidth, no latencies or overheads


def replay(df: Dataflow, plan: Plan, coeffs: Coefficients | None) -> tuple[Problem, dict[str, Option]]:
    """The planning problem with every call pinned to its planned strategy (offloaded where
    the plan offloads), and that choice; `coeffs` None: the device's defaults."""
    coeffs = coeffs or default_coefficients(df.cluster.device)
    pins = tuple(Pin(p.call, p.strategy, _SPAN) for p in plan.calls)
    problem = build_problem(replace(df, pins=pins), coeffs, SearchSpace(offload=bool(plan.offloaded)))
    return problem, {
        c: next(o for o in opts if o.offloaded == (problem.model_of[c].name in plan.offloaded))
        for c, opts in problem.options
    }


def roofline_coefficients(df: Dataflow, coeffs: Coefficients) -> Coefficients:
    """The physical floor: peak FLOP/s in every phase, full link and HBM bandwidth, no
    collective latency, per-step, per-layer, per-bucket or driver overheads."""
    achievable = device_for(df.cluster).achievable
    return replace(coeffs, compute_efficiency=1 / achievable, inference_efficiency=1.0, link_efficiency=1.0,
                   mem_bandwidth_efficiency=1.0, collective_latency=0.0, micro_batch_overhead=0.0,
                   decode_step_overhead=0.0, decode_layer_overhead=0.0, realloc_bucket_latency=0.0,
                   driver_op_overhead=0.0, move_latency=0.0)


def roofline_seconds(df: Dataflow, plan: Plan, coeffs: Coefficients | None) -> tuple[float, dict[str, float]]:
    """(iteration, per call) seconds of `plan`'s strategies under `roofline_coefficients`."""
    floor = roofline_coefficients(df, coeffs or default_coefficients(df.cluster.device))
    problem, choice = replay(df, plan, floor)
    return problem.seconds(evaluate(problem, choice).makespan), {c: o.cost.seconds for c, o in choice.items()}


def explain_plan(df: Dataflow, plan: Plan, coeffs: Coefficients | None) -> tuple[CallExplanation, ...]:
    """Every call of `plan` (in plan order) with its estimate's terms and its roofline."""
    problem, choice = replay(df, plan, coeffs)
    _, floor = roofline_seconds(df, plan, coeffs)
    moves = problem.moves_in(choice)
    out = []
    for p in plan.calls:
        home = problem.home_call(p.call)
        realloc = problem.realloc(p.call, choice[home], choice[p.call]) if home else 0
        transfer = moves[p.call]
        out.append(CallExplanation(
            p.call, p.model, p.strategy, choice[p.call].cost.terms, problem.seconds(realloc),
            problem.seconds(transfer), round(p.end - p.start, 9), floor[p.call],
        ))
    return tuple(out)


def print_explanation(rows: tuple[CallExplanation, ...], console: Console) -> None:
    """A table in milliseconds: one column per term that some call has."""
    used = [(k, head) for k, head in TERMS if any(dict(r.terms).get(k) for r in rows)]
    table = compact_table("estimate terms per call (ms)")
    for col in ("call", "realloc", "xfer", *(h for _, h in used), "=total", "roofline"):
        table.add_column(col, justify="left" if col == "call" else "right", no_wrap=True,
                         min_width=max(len(r.call) for r in rows) if col == "call" else None)
    for r in rows:
        terms = dict(r.terms)
        table.add_row(r.call, _ms(r.realloc), _ms(r.transfer),
                      *(_ms(terms.get(k, 0.0)) for k, _ in used), _ms(r.estimate), _ms(r.roofline))
    console.print(table)
    console.print("realloc and xfer come before the call; the other terms "
                  "add up to its estimate (=total, up to 1 µs rounding). dec.mem: memory-bound decode; "
                  "ovh: per-micro-batch overhead; dec.ovh: per-decode-step and per-layer overhead; "
                  "rc: recompute's extra forward; old.lp: an off_policy correction's no-grad forward; "
                  "roofline: the call at peak FLOP/s and bandwidth "
                  "without latencies or overheads (the physical floor beside the fitted estimate)"
                  + ("; reload: an offloaded model's weights back from host memory." if any(
                      dict(r.terms).get("reload") for r in rows) else "."))


def _ms(seconds: float) -> str:
    """Milliseconds to four significant digits at most (a 70B plan still fits 80 columns)."""
    if not seconds:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.{max(0, 3 - len(str(int(abs(ms)))))}f}" if abs(ms) >= 1 else f"{ms:.3f}"
