"""Seconds per iteration of generated programs, measured on this machine.

1. Solver plan vs symmetric plan for the same program (one run each, median over steps
   after warm-up), next to the planner's own estimates.
2. Generated-code overhead: the 1-device plan of the program vs a hand-written
   single-process loop calling the same runtime functions directly.

Usage: python bench/run_bench.py [programs/ppo.rlhf] [--steps 30] [--repeats 3] [--out bench/results/run_bench]
Writes OUT/bench.json: the median of each figure over the rounds, and every round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3


def median_iteration(run_dir: Path) -> float:
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time/iteration"] for r in records[WARMUP:])


def run_generated(program: Path, out: Path, steps: int, **compile_args) -> tuple[float, float]:
    """(measured median s/iteration, planner's estimate) of one compiled run."""
    from rlhfc.driver import compile_program

    prog, text = compile_program(program, output=out / "program.py", **compile_args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "program.py").write_text(text)
    subprocess.run([sys.executable, str(out / "program.py"), "--out", str(out), "--steps", str(steps),
                    "--save-every", str(10 * steps)], check=True, capture_output=True)
    return median_iteration(out), prog.plan.iteration_time


def hand_written(program: Path, steps: int) -> float:
    """The same PPO iteration as plain code in one process: no engine, no op list."""
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    import torch

    from rlhfc.frontend.check import load_program
    from rlhfc.backend.emit import program_spec
    from rlhfc.backend.lower import lower
    from rlhfc.planner.solve import symmetric_plan
    from rlhfc_runtime import calls
    from rlhfc_runtime import dist as rdist
    from rlhfc_runtime.engine import resolve_paths

    torch.set_num_threads(1)
    rdist.init_from_env()
    from rlhfc import ir

    df = load_program(program, cluster_override=ir.Cluster(1, 1, "cpu"))
    prog = lower(df, symmetric_plan(df))
    spec = resolve_paths(program_spec(prog), Path.cwd())
    layout = prog.layout("L0")
    rdist.ensure_groups([layout])
    groups = rdist.rank_groups(layout, 0)
    models = {n: calls.build_model(m, layout) for n, m in spec["models"].items() if m["kind"] != "rule"}
    loader = calls.build_loader("prompts", spec["datasets"]["prompts"], int(spec["run"]["seed"]))
    settings = {**spec["run"], **calls.special_ids(loader)}
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        s = {**settings, "step": step}
        prompts = loader.next_batch(int(s["batch"]))
        d, _ = calls.run_call("generate", "generate", models["actor"], spec["models"]["actor"],
                              {"prompts": prompts}, ("seq", "logp"), s, groups)
        d.update(calls.run_call("inference", "rule", None, spec["models"]["reward"], {"seq": d["seq"]},
                                ("score",), s, groups)[0])
        d.update(calls.run_call("inference", "logprobs", models["ref"], spec["models"]["ref"], {"seq": d["seq"]},
                                ("ref_logp",), s, groups)[0])
        d.update(calls.run_call("inference", "values", models["critic"], spec["models"]["critic"],
                                {"seq": d["seq"]}, ("values",), s, groups)[0])
        inputs = {k: d[k] for k in ("seq", "logp", "ref_logp", "score", "values")}
        calls.run_call("train", "ppo_actor", models["actor"], spec["models"]["actor"], inputs, (), s, groups)
        calls.run_call("train", "ppo_critic", models["critic"], spec["models"]["critic"], inputs, (), s, groups)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[WARMUP:])


def _port() -> int:
    from rlhfc_runtime.dist import free_port

    return free_port()


def measure(program: Path, steps: int) -> dict[str, float]:
    """One round, the four runs side by side: solver plan, symmetric plan, 1-device
    generated program, hand-written loop; ratios within the round."""
    with tempfile.TemporaryDirectory() as runs:  # run dirs hold checkpoints: not kept
        solver, solver_est = run_generated(program, Path(runs) / "solver", steps)
        sym, sym_est = run_generated(program, Path(runs) / "symmetric", steps, symmetric=True)
        one, _ = run_generated(program, Path(runs) / "one_device", steps, devices=1, symmetric=True)
    with multiprocessing.get_context("spawn").Pool(1) as fresh:  # its own process and world
        hand = fresh.apply(hand_written, (program, steps))
    return {
        "solver_plan_s_per_iter": solver, "solver_plan_estimate_s": solver_est,
        "symmetric_plan_s_per_iter": sym, "symmetric_plan_estimate_s": sym_est,
        "speedup_solver_vs_symmetric": sym / solver,
        "one_device_generated_s_per_iter": one, "hand_written_s_per_iter": hand,
        "generated_code_overhead": one / hand - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", nargs="?", default=str(ROOT / "programs" / "ppo.rlhf"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all four runs; medians reported")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "run_bench"))
    args = parser.parse_args()
    program, out = Path(args.program), Path(args.out)
    rounds = [measure(program, args.steps) for _ in range(args.repeats)]
    result = {
        "program": str(program.relative_to(ROOT) if program.is_relative_to(ROOT) else program),
        "steps": args.steps, "warmup": WARMUP, "repeats": args.repeats,
        **{k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
        "rounds": rounds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if k != "rounds":
            print(f"{k:36s} {v:.4f}" if isinstance(v, float) else f"{k:36s} {v}")


if __name__ == "__main__":
    main()
