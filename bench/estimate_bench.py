"""How honest are the planner's estimates? Predicted vs measured seconds, per call and per
iteration, before and after `rlhfc calibrate`, on this machine.

Every tiny example program runs on 1, 2 and 4 local CPU processes under two plans (the
solver's and the symmetric baseline; identical plans run once), a few steps each; call
and iteration times are medians over the steps after the first. The fit is honest:
each program's runs are predicted by coefficients fitted on the OTHER programs' runs
(leave one program out); the in-sample fit on all runs is shown for reference.
Rank: per (program, devices), whether the plan predicted fastest measured fastest, and
Spearman's rho between predicted and measured iteration times over all runs.

The cluster is declared as a program would (`cluster { devices_per_node = N
device = "cpu"  cores = C }`), with C the cores this process may use (`--cores`), so the
model knows when 4 processes share 2 cores. The iteration estimate is the schedule's
makespan plus `driver_op_overhead` per driver op of the lowered program, that
coefficient fitted (held out too) on the other programs' iteration times. Ablations
show each of the two terms left out.

Usage: python bench/estimate_bench.py [--steps 6] [--devices 1 2 4] [--cores C] [--programs ppo dpo …]
Writes bench/results/estimate_bench.{json,md} and estimate_bench.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROGRAMS = ("ppo", "grpo", "rloo", "remax", "dpo", "sft", "reward_model")
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Run:
    """One measured run: its plan, its call samples and its median iteration seconds."""

    program: str
    devices: int
    plan_kind: str
    dataflow: object
    plan: object
    samples: tuple
    iteration: float
    driver_ops: int


def compile_with_cores(path: Path, devices: int, cores: int, symmetric: bool, output: Path):
    """`rlhfc compile --devices N` with the cluster block `cores = C` added: the core count is
    an explicit input of the plan, as in a program, never read at plan time."""
    from rlhfc.frontend.check import load_program
    from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
    from rlhfc.backend.emit import emit
    from rlhfc.ir import Cluster
    from rlhfc.backend.lower import lower
    from rlhfc.planner.solve import plan_dataflow, symmetric_plan

    cluster = Cluster(nodes=1, devices_per_node=devices, device="cpu", overrides=(("cores", float(cores)),))
    dataflow = load_program(str(path), cluster_override=cluster)
    plan = (symmetric_plan(dataflow, DEFAULT_COEFFICIENTS) if symmetric
            else plan_dataflow(dataflow, time_limit=5.0, coeffs=DEFAULT_COEFFICIENTS))
    prog = lower(dataflow, plan)
    return prog, emit(prog, str(output))


def run_one(program: str, devices: int, symmetric: bool, steps: int, work: Path, seen: list[Run],
            cores: int) -> Run | None:
    """Compile, run `steps` steps, and read the medians back (None when the plan is one of `seen`'s)."""
    from rlhfc.planner.cost.fit import COST_INPUTS_FILE, cost_inputs_json, driver_ops, samples_from_run

    out = work / f"{program}-{devices}-{'sym' if symmetric else 'solver'}"
    out.mkdir(parents=True)
    prog, text = compile_with_cores(ROOT / "programs" / f"{program}.rlhf", devices, cores, symmetric,
                                    out / "program.py")
    if any(r.program == program and r.devices == devices and same_plan(r.plan, prog.plan) for r in seen):
        return None
    (out / "program.py").write_text(text)
    (out / COST_INPUTS_FILE).write_text(cost_inputs_json(prog))
    subprocess.run([sys.executable, str(out / "program.py"), "--out", str(out), "--steps", str(steps),
                    "--save-every", str(10 * steps)], check=True, capture_output=True)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    iteration = statistics.median(r["time/iteration"] for r in records[1:])
    return Run(program, devices, "symmetric" if symmetric else "solver", prog.dataflow, prog.plan,
               tuple(samples_from_run(out / "metrics.jsonl")), iteration, driver_ops(prog))


def same_plan(a, b) -> bool:
    return [(p.call, p.strategy) for p in a.calls] == [(p.call, p.strategy) for p in b.calls]


def scheduled_iteration(run: Run, coeffs, cores: bool = True) -> float:
    """The makespan of the run's plan priced with `coeffs` (same placements, same schedule
    rules); `cores=False` prices it as if each process had a core (the ablation)."""
    from dataclasses import replace

    from rlhfc.planner.explain import replay
    from rlhfc.planner.solve.schedule import evaluate

    df = run.dataflow if cores else replace(run.dataflow, cluster=without_cores(run.dataflow.cluster))
    problem, choice = replay(df, run.plan, coeffs)
    return problem.seconds(evaluate(problem, choice).makespan)


def without_cores(cluster):
    from dataclasses import replace

    return replace(cluster, overrides=tuple((k, v) for k, v in cluster.overrides if k != "cores"))


def fit_all(runs: list[Run], cores: bool = True):
    """Call coefficients fitted on the runs' calls, then `driver_op_overhead` on their iterations."""
    from dataclasses import replace

    from rlhfc.planner.cost.fit import fit_coefficients, fit_driver_overhead

    samples = [s if cores else ablate(s) for r in runs for s in r.samples]
    c = fit_coefficients(samples)
    k = fit_driver_overhead([(scheduled_iteration(r, c, cores), r.driver_ops, r.iteration) for r in runs])
    return replace(c, driver_op_overhead=k)


def ablate(sample):
    from dataclasses import replace

    return replace(sample, priced=replace(sample.priced, cluster=without_cores(sample.priced.cluster)))


def predicted_iteration(run: Run, coeffs, cores: bool = True) -> float:
    """The iteration estimate: the schedule's makespan plus the driver's ops."""
    from rlhfc.planner.cost.model import iteration_seconds

    return iteration_seconds(scheduled_iteration(run, coeffs, cores), run.driver_ops, coeffs)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among float timings)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for i, k in enumerate(order):
            r[k] = i
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1)) if n > 1 else float("nan")


def evaluate_runs(runs: list[Run]) -> dict:
    """Errors before calibration, after a leave-one-program-out fit, and after an in-sample fit."""
    from dataclasses import replace

    from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
    from rlhfc.planner.cost.fit import relative_error

    programs = sorted({r.program for r in runs})
    in_sample = fit_all(runs)
    held_out = {p: fit_all([r for r in runs if r.program != p]) for p in programs}
    # Ablations, held out: without the shared-cores term (calls priced as if each process
    # had a core, refitted) and without the driver term (driver_op_overhead = 0).
    no_cores = {p: fit_all([r for r in runs if r.program != p], cores=False) for p in programs}
    ablation_calls, ablation_rows = [], []
    for r in runs:
        for s in r.samples:
            ablation_calls.append({"measured": s.measured, "no_cores": ablate(s).priced.seconds(no_cores[r.program])})
        ablation_rows.append({
            "measured": r.iteration, "no_cores": predicted_iteration(r, no_cores[r.program], cores=False),
            "no_driver": predicted_iteration(r, replace(held_out[r.program], driver_op_overhead=0.0)),
        })
    rows, calls = [], []
    for r in runs:
        fits = {"before": DEFAULT_COEFFICIENTS, "held_out": held_out[r.program], "in_sample": in_sample}
        iteration = {k: predicted_iteration(r, c) for k, c in fits.items()}
        for s in r.samples:
            calls.append({"program": r.program, "devices": r.devices, "plan": r.plan_kind, "call": s.priced.call.name,
                          "measured": s.measured, **{k: s.priced.seconds(c) for k, c in fits.items()}})
        rows.append({"program": r.program, "devices": r.devices, "plan": r.plan_kind, "measured": r.iteration,
                     "driver_ops": r.driver_ops, **iteration})
    kinds = ("before", "held_out", "in_sample")

    def med(items, k):
        return statistics.median(relative_error(i[k], i["measured"]) for i in items)

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["program"], row["devices"]), []).append(row)
    ranked = [g for g in groups.values() if len(g) > 1]
    best = {k: sum(min(g, key=lambda x: x[k]) is min(g, key=lambda x: x["measured"]) for g in ranked) for k in kinds}
    return {
        "calls": calls, "iterations": rows,
        "median_abs_error": {"call": {k: med(calls, k) for k in kinds}, "iteration": {k: med(rows, k) for k in kinds}},
        "spearman_iteration": {k: spearman([r[k] for r in rows], [r["measured"] for r in rows]) for k in kinds},
        "best_plan_found": {k: f"{best[k]}/{len(ranked)}" for k in kinds},
        "ablation_held_out": {
            "call": {"no_cores": med(ablation_calls, "no_cores")},
            "iteration": {k: med(ablation_rows, k) for k in ("no_cores", "no_driver")},
            "spearman_iteration": {k: spearman([r[k] for r in ablation_rows], [r["measured"] for r in ablation_rows])
                                   for k in ("no_cores", "no_driver")},
        },
        "coefficients": {"in_sample": vars(in_sample), "held_out": {p: vars(c) for p, c in held_out.items()}},
    }


def markdown(result: dict, args) -> str:
    m, s, b = result["median_abs_error"], result["spearman_iteration"], result["best_plan_found"]
    a = result["ablation_held_out"]
    lines = [
        f"Median absolute error of the planner's estimates ({len(result['iterations'])} runs: "
        f"{', '.join(args.programs)} on {'/'.join(map(str, args.devices))} CPU processes sharing "
        f"{result['cores']} cores (`cores = {result['cores']}`), solver and symmetric "
        f"plans, {args.steps} steps each, medians after the first step; {len(result['calls'])} calls).",
        "",
        "| | before calibration | after, held out (leave one program out) | after, in sample | target |",
        "|---|---|---|---|---|",
        f"| per call | {m['call']['before']:.0%} | {m['call']['held_out']:.0%} | {m['call']['in_sample']:.0%} | ≤ 15% |",
        f"| per iteration | {m['iteration']['before']:.0%} | {m['iteration']['held_out']:.0%} | "
        f"{m['iteration']['in_sample']:.0%} | ≤ 10% |",
        f"| Spearman ρ, iteration times | {s['before']:.2f} | {s['held_out']:.2f} | {s['in_sample']:.2f} | |",
        f"| predicted-best plan measured best | {b['before']} | {b['held_out']} | {b['in_sample']} | all |",
        "",
        f"Ablations, held out: without the shared-cores term {a['call']['no_cores']:.0%} per call, "
        f"{a['iteration']['no_cores']:.0%} per iteration (ρ {a['spearman_iteration']['no_cores']:.2f}); "
        f"without the driver term {a['iteration']['no_driver']:.0%} per iteration "
        f"(ρ {a['spearman_iteration']['no_driver']:.2f}). Fitted `driver_op_overhead` (in sample): "
        f"{result['coefficients']['in_sample']['driver_op_overhead'] * 1e3:.2f} ms per op.",
        "",
        "| program | devices | plan | driver ops | measured s/it | before | held out | in sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["iterations"]:
        lines.append(f"| {r['program']} | {r['devices']} | {r['plan']} | {r['driver_ops']} | {r['measured']:.3f} | "
                     f"{r['before']:.3f} | "
                     f"{r['held_out']:.3f} | {r['in_sample']:.3f} |")
    lines += ["", f"Regenerate: `python bench/estimate_bench.py --steps {args.steps}` "
              f"({result['wall_seconds']:.0f} s here). Scatter plot: `bench/results/estimate_bench.png`."]
    return "\n".join(lines) + "\n"


def scatter(result: dict, path: Path) -> None:
    """Predicted vs measured seconds per call, before and after (held out), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (items, title) in zip(axes, ((result["calls"], "per call"), (result["iterations"], "per iteration"))):
        measured = [i["measured"] for i in items]
        for key, color, label in (("before", "tab:gray", "before calibration"), ("held_out", "tab:blue", "after (held out)")):
            ax.scatter(measured, [i[key] for i in items], s=14, c=color, label=label, alpha=0.8)
        lo, hi = min(measured) / 3, max(measured) * 3
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured seconds")
        ax.set_ylabel("predicted seconds")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS))
    parser.add_argument("--cores", type=int, default=None,
                        help="cores the processes share (default: this process's CPU affinity)")
    parser.add_argument("--out", type=Path, default=RESULTS / "estimate_bench")
    args = parser.parse_args()
    from rlhfc_runtime.contract.cores import physical_cores

    cores = args.cores or physical_cores()
    t0 = time.perf_counter()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        for program in args.programs:
            for devices in args.devices:
                for symmetric in (False, True):
                    run = run_one(program, devices, symmetric, args.steps, Path(tmp), runs, cores)
                    if run is None:
                        continue
                    runs.append(run)
                    print(f"{program} on {devices} ({run.plan_kind}): {run.iteration:.3f} s/it, "
                          f"plan {run.plan.iteration_time:.3f}", flush=True)
    result = evaluate_runs(runs)
    result["wall_seconds"] = time.perf_counter() - t0
    result["cores"] = cores
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result, args))
    scatter(result, args.out.with_suffix(".png"))
    print(markdown(result, args))


if __name__ == "__main__":
    main()
