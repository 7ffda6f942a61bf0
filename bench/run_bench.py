"""Seconds per iteration of generated programs, measured on this machine.

1. `solver`: the solver plan vs the symmetric plan for the same program (one run each,
   median over steps after warm-up), next to the planner's own estimates.
2. `overhead`: the 1-device plan of the program vs a hand-written single-process loop
   calling the same runtime functions directly.
3. `calibrated`: the program is first run under the default solver, symmetric and
   1-process plans (or `--calibration-runs` names run directories to reuse); the cost
   model is fitted to their call times exactly as `rlhfc calibrate` does
   (`rlhfc.planner.cost.fit.calibrate_runs`); then the solver plan priced with those
   coefficients runs beside the symmetric plan, the calibrated model's own best symmetric
   plan and, where the calibrated model predicts it faster than the 2-process plan (or
   the round ran it already), the 1-process plan. Predicted ratios price every plan with
   the calibrated coefficients, the default symmetric plan included.
   A plan identical to one run earlier in the round is not run twice.

Every round runs its plans side by side (interleaved), so a slow spell of the machine
hits them alike; each figure is the median over rounds of the per-round median, and
ratios are taken within a round.

Usage: python bench/run_bench.py [programs/ppo.rlhf] [--steps 30] [--repeats 3] [--out bench/results/run_bench]
       [--sections solver overhead calibrated] [--calibration-steps 20] [--calibration-runs DIR …]
Writes OUT/bench.json (the medians, the calibration, and every round), OUT/coefficients.json
(the fitted coefficients) and, for runs it made, OUT/calibration/NAME/{metrics.jsonl,cost_inputs.json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3
SECTIONS = ("solver", "overhead", "calibrated")
# The plans calibration runs, as `compile_program` arguments.
CALIBRATION_PLANS = {"solver": {}, "symmetric": {"symmetric": True}, "one_process": {"devices": 1, "symmetric": True}}


def median_iteration(run_dir: Path, warmup: int = WARMUP) -> float:
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time/iteration"] for r in records[min(warmup, len(records) - 1):])


def compile_plan(program: Path, out: Path, **compile_args):
    """The lowered program and its generated code, written into `out` with the cost inputs
    `rlhfc calibrate` reads (as `rlhfc run` writes them)."""
    from rlhfc.driver import compile_program
    from rlhfc.planner.cost.fit import COST_INPUTS_FILE, cost_inputs_json

    prog, text = compile_program(program, output=out / "program.py", **compile_args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.py").write_text(text)
    (out / COST_INPUTS_FILE).write_text(cost_inputs_json(prog))
    return prog


def execute(out: Path, steps: int) -> float:
    """Run the program compiled into `out` for `steps` steps: its median s/iteration."""
    done = subprocess.run([sys.executable, str(out / "program.py"), "--out", str(out), "--steps", str(steps),
                           "--save-every", str(10 * steps)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{out / 'program.py'} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return median_iteration(out)


def run_generated(program: Path, out: Path, steps: int, **compile_args) -> tuple[float, float]:
    """(measured median s/iteration, planner's estimate) of one compiled run."""
    prog = compile_plan(program, out, **compile_args)
    return execute(out, steps), prog.plan.iteration_time


def plan_key(prog) -> tuple:
    """What makes two plans the same run: world size and every call's strategy."""
    return prog.world_size, tuple((p.call, p.strategy) for p in prog.plan.calls)


def describe(prog) -> list[str]:
    """One line per call: its mesh, dp/tp/pp, token budget and the micro-batches it makes."""
    out = []
    for p in prog.plan.calls:
        s, call = p.strategy, prog.dataflow.call(p.call)
        mesh = f"node{s.mesh.first_node}[{s.mesh.first_device}:{s.mesh.first_device + s.mesh.n_devices}]"
        out.append(f"{p.call} {mesh} {s.dp}/{s.tp}/{s.pp} budget={call.token_budget(s)} n_mbs={call.n_mbs(s)}"
                   + (" recompute" if s.recompute else ""))
    return out


def hand_written(program: Path, steps: int) -> float:
    """The same PPO iteration as plain code in one process: no engine, no op list."""
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    from rlhfc.frontend.check import load_program
    from rlhfc.backend.emit import program_spec
    from rlhfc_runtime.contract.ops import Call as CallOp
    from rlhfc.backend.lower import lower
    from rlhfc.planner.solve import symmetric_plan
    from rlhfc_runtime import calls
    from rlhfc_runtime import dist as rdist
    from rlhfc_runtime.contract.resume import resolve_paths

    rdist.use_threads(1)  # as the 1-process generated program's worker
    rdist.init_from_env()
    from rlhfc import ir

    df = load_program(program, cluster_override=ir.Cluster(1, 1, "cpu"))
    prog = lower(df, symmetric_plan(df))
    spec = resolve_paths(program_spec(prog), Path.cwd())
    layout = prog.layout("L0")
    rdist.ensure_groups([layout])
    groups = rdist.rank_groups(layout, 0)
    models = {n: calls.build_model(m, layout) for n, m in spec.models.items() if m.neural}
    seed = spec.run.seed
    loader = calls.build_loader("prompts", spec.datasets["prompts"], seed)
    specials = calls.special_ids(loader)
    compiled = {op.name: dict(op.settings) for op in prog.ops if isinstance(op, CallOp)}  # what the engine gets
    times = []
    for step in range(steps):
        t0 = time.perf_counter()

        def s(name):  # as the engine builds a call's settings
            return {**compiled[name], **specials, "step": step, "seed": seed}

        prompts = loader.next_batch(spec.run.batch)
        d, _ = calls.run_call("generate", "generate", models["actor"], spec.models["actor"],
                              {"prompts": prompts}, ("seq", "logp"), s("gen"), groups)
        d.update(calls.run_call("inference", "rule", None, spec.models["reward"], {"seq": d["seq"]},
                                ("score",), s("score"), groups)[0])
        d.update(calls.run_call("inference", "logprobs", models["ref"], spec.models["ref"], {"seq": d["seq"]},
                                ("ref_logp",), s("refl"), groups)[0])
        d.update(calls.run_call("inference", "values", models["critic"], spec.models["critic"],
                                {"seq": d["seq"]}, ("values",), s("vals"), groups)[0])
        inputs = {k: d[k] for k in ("seq", "logp", "ref_logp", "score", "values")}
        calls.run_call("train", "ppo_actor", models["actor"], spec.models["actor"], inputs, (), s("a_tr"), groups)
        calls.run_call("train", "ppo_critic", models["critic"], spec.models["critic"], inputs, (), s("c_tr"), groups)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:])


def _port() -> int:
    from rlhfc_runtime.dist import free_port

    return free_port()


# ---- calibration -------------------------------------------------------------------


def calibration_runs(program: Path, steps: int, keep: Path) -> list[Path]:
    """Run the program under each of `CALIBRATION_PLANS` (default coefficients) and keep
    each run's metrics.jsonl and cost_inputs.json in `keep`/NAME (checkpoints are not kept)."""
    from rlhfc.planner.cost.fit import COST_INPUTS_FILE

    kept = []
    with tempfile.TemporaryDirectory() as runs:
        for name, args in CALIBRATION_PLANS.items():
            out = Path(runs) / name
            compile_plan(program, out, **args)
            execute(out, steps)
            dst = keep / name
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("metrics.jsonl", COST_INPUTS_FILE):
                shutil.copyfile(out / f, dst / f)
            kept.append(dst)
    return kept


def calibrate(run_dirs: list[Path], coefficients_out: Path) -> dict:
    """Fit the coefficients to the runs' call times (`rlhfc calibrate`'s own code), write
    them to `coefficients_out`, and say how well they fit."""
    from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
    from rlhfc.planner.cost.fit import FIT_FIELDS, calibrate_runs, coefficients_to_json, relative_error

    samples, fitted = calibrate_runs([d / "metrics.jsonl" for d in run_dirs], DEFAULT_COEFFICIENTS)
    coefficients_out.parent.mkdir(parents=True, exist_ok=True)
    coefficients_out.write_text(coefficients_to_json(fitted))

    def error(c):
        return statistics.median(relative_error(s.priced.seconds(c), s.measured) for s in samples)

    return {
        "runs": [_shown(d) for d in run_dirs], "coefficients_file": _shown(coefficients_out),
        "samples": len(samples), "median_call_error_before": error(DEFAULT_COEFFICIENTS),
        "median_call_error_after": error(fitted),
        "fitted": {n: getattr(fitted, n) for n in (*FIT_FIELDS, "move_latency")},
        "calls_ms": {s.name: {"measured": s.measured * 1e3, "fitted": s.priced.seconds(fitted) * 1e3}
                     for s in samples},
    }


def calibrated_plans(program: Path, coefficients: Path, work: Path) -> dict[str, object]:
    """The plans the calibrated model makes: its solver plan (2 processes), its best
    symmetric plan and its 1-process plan, compiled into `work`/NAME."""
    return {
        "calibrated_solver": compile_plan(program, work / "calibrated_solver", coefficients=coefficients),
        "calibrated_symmetric": compile_plan(program, work / "calibrated_symmetric", symmetric=True,
                                             coefficients=coefficients),
        "calibrated_one_process": compile_plan(program, work / "calibrated_one_process", devices=1,
                                               coefficients=coefficients),
    }


def prefers_one_process(plans: dict[str, object]) -> bool:
    return plans["calibrated_one_process"].plan.iteration_time < plans["calibrated_solver"].plan.iteration_time


# ---- rounds --------------------------------------------------------------------------


def measure(program: Path, steps: int, sections: tuple[str, ...], coefficients: Path | None) -> dict[str, float]:
    """One round: every section's runs side by side, identical plans run once; ratios
    within the round."""
    row: dict[str, float] = {"load_average": os.getloadavg()[0]}  # 1-minute, at the round's start
    seen: dict[tuple, float] = {}  # plan_key -> measured s/iteration in this round
    with tempfile.TemporaryDirectory() as runs:  # run dirs hold checkpoints: not kept
        work = Path(runs)

        def run(name: str, prog) -> float:
            key = plan_key(prog)
            if key not in seen:
                seen[key] = execute(work / name, steps)
            return seen[key]

        if "solver" in sections:
            solver = compile_plan(program, work / "solver")
            row["solver_plan_s_per_iter"], row["solver_plan_estimate_s"] = run("solver", solver), solver.plan.iteration_time
        if "solver" in sections or "calibrated" in sections:
            sym = compile_plan(program, work / "symmetric", symmetric=True)
            row["symmetric_plan_s_per_iter"], row["symmetric_plan_estimate_s"] = run("symmetric", sym), sym.plan.iteration_time
        if "solver" in sections:
            row["speedup_solver_vs_symmetric"] = row["symmetric_plan_s_per_iter"] / row["solver_plan_s_per_iter"]
        if "overhead" in sections:
            one = compile_plan(program, work / "one_device", devices=1, symmetric=True)
            row["one_device_generated_s_per_iter"] = run("one_device", one)
            with multiprocessing.get_context("spawn").Pool(1) as fresh:  # its own process and world
                row["hand_written_s_per_iter"] = fresh.apply(hand_written, (program, steps))
            row["generated_code_overhead"] = row["one_device_generated_s_per_iter"] / row["hand_written_s_per_iter"] - 1
        if "calibrated" in sections:
            row.update(calibrated_round(program, coefficients, work, run, sym, row["symmetric_plan_s_per_iter"], seen))
    return row


def priced_under(prog, coefficients: Path) -> float:
    """The estimate of an already compiled plan under other coefficients (its strategies
    pinned, priced and scheduled again)."""
    from rlhfc.planner.cost.fit import load_coefficients
    from rlhfc.planner.explain import replay
    from rlhfc.planner.solve.schedule import evaluate

    problem, choice = replay(prog.dataflow, prog.plan, load_coefficients(coefficients))
    return problem.seconds(evaluate(problem, choice).makespan)


def calibrated_round(program: Path, coefficients: Path, work: Path, run, symmetric, symmetric_measured: float,
                     seen: dict) -> dict[str, float]:
    """The calibrated solver plan vs the symmetric plan measured in the round (`symmetric`,
    default coefficients) and vs the calibrated model's own best symmetric plan, and vs
    the 1-process plan where the calibrated model prefers it or the round ran that plan
    already (`seen`): measured, predicted (every plan priced with the calibrated
    coefficients), and the per-round ratios."""
    plans = calibrated_plans(program, coefficients, work)
    solver = run("calibrated_solver", plans["calibrated_solver"])
    own_symmetric = run("calibrated_symmetric", plans["calibrated_symmetric"])
    est = {k: p.plan.iteration_time for k, p in plans.items()}
    row = {
        "calibrated_solver_s_per_iter": solver, "calibrated_solver_estimate_s": est["calibrated_solver"],
        "calibrated_symmetric_s_per_iter": own_symmetric,
        "calibrated_symmetric_estimate_s": est["calibrated_symmetric"],
        "calibrated_one_process_estimate_s": est["calibrated_one_process"],
        "symmetric_plan_calibrated_estimate_s": priced_under(symmetric, coefficients),
        "speedup_calibrated_solver_vs_symmetric": symmetric_measured / solver,
        "speedup_calibrated_solver_vs_calibrated_symmetric": own_symmetric / solver,
        "predicted_speedup_calibrated_solver_vs_calibrated_symmetric":
            est["calibrated_symmetric"] / est["calibrated_solver"],
        "predicted_speedup_one_process_vs_calibrated_solver": est["calibrated_solver"] / est["calibrated_one_process"],
    }
    row["predicted_speedup_calibrated_solver_vs_symmetric"] = (row["symmetric_plan_calibrated_estimate_s"]
                                                               / est["calibrated_solver"])
    if prefers_one_process(plans) or plan_key(plans["calibrated_one_process"]) in seen:
        one = run("calibrated_one_process", plans["calibrated_one_process"])
        row["calibrated_one_process_s_per_iter"] = one
        row["speedup_one_process_vs_calibrated_solver"] = solver / one
    return row


# ---- report --------------------------------------------------------------------------


def summarize(rounds: list[dict[str, float]]) -> dict[str, float | list[float]]:
    """Median over rounds of every figure, and the range of every per-round ratio."""
    keys = [k for k in rounds[0]]
    out: dict[str, float | list[float]] = {k: statistics.median(r[k] for r in rounds) for k in keys}
    for k in keys:
        if k.startswith("speedup_") or k == "generated_code_overhead":
            out[f"{k}_range"] = [min(r[k] for r in rounds), max(r[k] for r in rounds)]
    return out


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", nargs="?", default=str(ROOT / "programs" / "ppo.rlhf"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every section's runs; medians reported")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "run_bench"))
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--calibration-steps", type=int, default=20, help="steps of each calibration run")
    parser.add_argument("--calibration-runs", nargs="+", type=Path, default=None, metavar="DIR",
                        help="fit these runs (each with metrics.jsonl and cost_inputs.json) instead of running new ones")
    args = parser.parse_args(argv)
    program, out, sections = Path(args.program), Path(args.out), tuple(args.sections)
    if "overhead" in sections and program.stem != "ppo":
        parser.error("the overhead section's hand-written loop is PPO's; leave it out with --sections")
    result: dict = {"program": _shown(program), "steps": args.steps, "warmup": WARMUP, "repeats": args.repeats,
                    "sections": list(sections), "cores": os.cpu_count(), "load_average_start": os.getloadavg()[0]}
    coefficients = out / "coefficients.json"
    if "calibrated" in sections:
        dirs = args.calibration_runs or calibration_runs(program, args.calibration_steps, out / "calibration")
        result["calibration"] = {"steps": None if args.calibration_runs else args.calibration_steps,
                                 **calibrate(dirs, coefficients)}
        with tempfile.TemporaryDirectory() as work:
            plans = calibrated_plans(program, coefficients, Path(work))
        result["calibrated_plans"] = {k: describe(p) for k, p in plans.items()}
        result["model_prefers_one_process"] = prefers_one_process(plans)
    rounds = [measure(program, args.steps, sections, coefficients) for _ in range(args.repeats)]
    result.update(summarize(rounds))
    result["load_average_end"] = os.getloadavg()[0]  # 1-minute: other work sharing the cores
    result["rounds"] = rounds
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if k in ("rounds", "calibration", "calibrated_plans"):
            continue
        print(f"{k:48s} {v:.4f}" if isinstance(v, float) else f"{k:48s} {v}")
    if "calibration" in result:
        c = result["calibration"]
        print(f"calibration: {c['samples']} calls, median error {c['median_call_error_before']:.0%} → "
              f"{c['median_call_error_after']:.0%}")
        for k, lines in result["calibrated_plans"].items():
            print(f"{k}: " + "; ".join(lines))
    return result


if __name__ == "__main__":
    main()
