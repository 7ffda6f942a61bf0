"""Fit the H100 cost-model coefficients to ReaL's measured PPO iterations (run by hand):
`python bench/fit_real.py` writes bench/results/real_fit.{json,md};
`python bench/fit_real.py --evaluate` plans again with the coefficients stored there and
rewrites only the errors (after a planner change that should not need a refit).

Targets, per setting of `bench/data/real_measured.json`: rlhfc's estimate of its own
plan against ReaL's measured seconds per iteration, and its symmetric plan's estimate
against ReaL-Heuristic's (ReaL's Megatron-style symmetric plan). The plans depend on
the coefficients, so the fit alternates: plan every setting, fit the coefficients with
those plans fixed (`fit_coefficients` re-prices each plan's calls, reallocations and
schedule), plan again. Leave-one-out: fit on the other eleven settings' plans, plan the
held-out setting with those coefficients, compare. The result is what
`rlhfc.planner.cost.coefficients.GPU_COEFFICIENTS["H100-80GB"]` holds.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_settings import Setting, settings  # noqa: E402

from rlhfc.plan import Plan  # noqa: E402
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS, Coefficients  # noqa: E402
from rlhfc.planner.cost.fit import fit_coefficients  # noqa: E402
from rlhfc.planner.explain import replay  # noqa: E402
from rlhfc.planner.solve import SearchSpace, plan_dataflow, symmetric_plan  # noqa: E402
from rlhfc.planner.solve.schedule import evaluate  # noqa: E402

# Physically meaningful ranges (what a well-built runtime on H100s can plausibly show).
BOUNDS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.33, 1.33),  # × achievable 0.45: 15% .. 60% of peak in training
    "inference_efficiency": (0.5, 1.5),  # forward-only passes relative to training
    "mem_bandwidth_efficiency": (0.3, 0.9),  # share of HBM bandwidth in decode
    "decode_step_overhead": (1e-5, 5e-2),  # per decode step of a micro-batch on a stage (sampling, sync)
    "decode_layer_overhead": (1e-6, 2e-3),  # per layer of such a step (kernel launches)
    "collective_latency": (5e-6, 1e-3),  # one all-reduce's launch and sync
    "realloc_bucket_latency": (1e-4, 0.5),  # per 256 MiB bucket a device receives
    "micro_batch_overhead": (1e-4, 2e-2),  # per micro-batch step of a stage
}
NAMES = tuple(BOUNDS)
START = replace(DEFAULT_COEFFICIENTS, compute_efficiency=0.8, decode_step_overhead=1e-3, decode_layer_overhead=1e-4,
                collective_latency=3e-5, realloc_bucket_latency=1e-2)
# The fit plans in a smaller space (the first node's sub-node meshes, no recompute): in
# these settings it gives the same iteration times as the full space, in a fraction of
# the solve time. `bench/plan_bench.py` plans in the full space.
FIT_SPACE = SearchSpace(sub_node_nodes=1, recompute=False)
TIME_LIMIT = 10.0


@dataclass(frozen=True)
class FixedPlan:
    """A plan whose strategies stay fixed while the coefficients change."""

    setting: Setting
    plan: Plan

    def seconds(self, c: Coefficients) -> float:
        problem, choice = replay(self.setting.dataflow(), self.plan, c)
        return problem.seconds(evaluate(problem, choice).makespan)


@dataclass(frozen=True)
class Target:
    """A fixed plan and the measured seconds it should be priced at (`fit_coefficients`)."""

    priced: FixedPlan
    measured: float


def plans(s: Setting, c: Coefficients) -> tuple[Plan, Plan]:
    """(solver plan, symmetric plan) of a setting under `c`."""
    df = s.dataflow()
    return plan_dataflow(df, time_limit=TIME_LIMIT, coeffs=c, space=FIT_SPACE), symmetric_plan(df, c)


def targets(pairs: dict[str, tuple[Plan, Plan]], rows: list[Setting]) -> list[Target]:
    out = []
    for s in rows:
        solver, sym = pairs[s.name]
        out += [Target(FixedPlan(s, solver), s.real), Target(FixedPlan(s, sym), s.real_heuristic)]
    return out


def fit(pairs, rows, start: Coefficients) -> Coefficients:
    return fit_coefficients(targets(pairs, rows), start, NAMES, huber=0.2, prior=1e-2, iterations=25, bounds=BOUNDS)


def errors(s: Setting, solver: Plan, sym: Plan) -> dict:
    est, est_sym = solver.iteration_time, sym.iteration_time
    return {
        "setting": s.name, "estimate_s": round(est, 2), "real_s": s.real, "symmetric_s": round(est_sym, 2),
        "real_heuristic_s": s.real_heuristic, "speedup_predicted": round(est_sym / est, 3),
        "speedup_measured": round(s.real_heuristic / s.real, 3),
        "time_error": round(abs(est - s.real) / s.real, 4),
        "symmetric_error": round(abs(est_sym - s.real_heuristic) / s.real_heuristic, 4),
        "speedup_error": round(abs(est_sym / est - s.real_heuristic / s.real) / (s.real_heuristic / s.real), 4),
    }


def summary(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in ("time_error", "symmetric_error", "speedup_error")}


RESULTS = Path(__file__).parent / "results"


def main(rounds: int = 2) -> None:
    rows = settings()
    t0 = time.perf_counter()
    c = START
    pairs = {s.name: plans(s, c) for s in rows}
    for r in range(rounds):
        c = fit(pairs, rows, c)
        pairs = {s.name: plans(s, c) for s in rows}
        print(f"round {r + 1}: {summary([errors(s, *pairs[s.name]) for s in rows])}", flush=True)
    in_sample = [errors(s, *pairs[s.name]) for s in rows]
    held_out, loo_coeffs = [], {}
    for s in rows:
        others = [o for o in rows if o is not s]
        loo = fit(pairs, others, c)
        loo_coeffs[s.name] = {n: getattr(loo, n) for n in NAMES}
        held_out.append(errors(s, *plans(s, loo)))
        print(json.dumps(held_out[-1]), flush=True)
    write_report(c, in_sample, held_out, loo_coeffs, {"fit_seconds": round(time.perf_counter() - t0, 1)})


def evaluate_stored() -> None:
    """`--evaluate`: plan every setting again with the coefficients real_fit.json holds (the
    fit, and each setting's leave-one-out fit) and rewrite the errors, without refitting:
    the current planner judged by the stored fit, in a fraction of the fit's time."""
    doc = json.loads((RESULTS / "real_fit.json").read_text())
    t0 = time.perf_counter()
    c = replace(DEFAULT_COEFFICIENTS, **doc["coefficients"])
    rows = settings()
    in_sample = [errors(s, *plans(s, c)) for s in rows]
    loo = doc["leave_one_out"]["coefficients"]
    held_out = [errors(s, *plans(s, replace(DEFAULT_COEFFICIENTS, **loo[s.name]))) for s in rows]
    write_report(c, in_sample, held_out, loo, {"fit_seconds": doc["fit_seconds"],
                                               "evaluate_seconds": round(time.perf_counter() - t0, 1)})


def write_report(c: Coefficients, in_sample: list[dict], held_out: list[dict], loo_coeffs: dict, timing: dict) -> None:
    doc = {
        "source": json.loads((Path(__file__).parent / "data" / "real_measured.json").read_text())["source"],
        "coefficients": {n: getattr(c, n) for n in NAMES}, "bounds": BOUNDS,
        "in_sample": {"median": summary(in_sample), "rows": in_sample},
        "leave_one_out": {"median": summary(held_out), "rows": held_out, "coefficients": loo_coeffs},
        **timing,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "real_fit.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    cols = ["setting", "estimate_s", "real_s", "symmetric_s", "real_heuristic_s", "speedup_predicted",
            "speedup_measured", "time_error", "speedup_error"]
    lines = []
    for title, table in (("in sample", in_sample), ("leave one out", held_out)):
        lines += [f"### {title}: median {summary(table)}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[k]) for k in cols) + " |" for r in table] + [""]
    lines += ["coefficients: " + json.dumps(doc["coefficients"])]
    (RESULTS / "real_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(asdict(c)))


if __name__ == "__main__":
    evaluate_stored() if "--evaluate" in sys.argv[1:] else main()
