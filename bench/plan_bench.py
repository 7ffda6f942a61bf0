"""Planner benchmark on the ReaL paper's PPO settings (run by hand):
`python bench/plan_bench.py` writes bench/results/plan_bench.{json,md}.

Per case: solve time, status, gap, estimated iteration time, ratio to the symmetric
baseline and to MCMC given the same wall-clock budget, and the process's peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "planner"))

from planner_fixtures import CODELLAMA_34B, LLAMA_7B, LLAMA_13B, LLAMA_70B, ppo_dataflow  # noqa: E402

from rlhfc.ir import Cluster  # noqa: E402
from rlhfc.planner.solve import build_problem, plan_dataflow  # noqa: E402
from rlhfc.planner.solve.baselines import mcmc  # noqa: E402

CASES = [  # name, shape, GPUs, CP-SAT time limit
    ("7B", LLAMA_7B, 8, 10), ("7B", LLAMA_7B, 16, 10), ("13B", LLAMA_13B, 32, 10),
    ("34B", CODELLAMA_34B, 64, 10), ("70B", LLAMA_70B, 128, 10),
    ("70B", LLAMA_70B, 512, 60), ("70B", LLAMA_70B, 1024, 60),
]


def run_case(name, shape, gpus, limit) -> dict:
    df = ppo_dataflow(shape, Cluster(gpus // 8, 8, "H100-80GB"))
    t0 = time.perf_counter()
    plan = plan_dataflow(df, time_limit=limit)
    wall = time.perf_counter() - t0
    problem = build_problem(df)
    chain = mcmc(problem, budget_seconds=wall, seed=0)
    mcmc_time = problem.seconds(chain[1].makespan) if chain else None
    return {
        "case": f"{name} on {gpus}", "gpus": gpus, "solve_s": round(wall, 2), "status": plan.status,
        "gap": round(plan.gap, 4), "iteration_s": plan.iteration_time, "lower_bound_s": plan.lower_bound,
        "symmetric_s": plan.baseline_time, "vs_symmetric": round(plan.baseline_time / plan.iteration_time, 3),
        "mcmc_s": mcmc_time, "vs_mcmc": round(mcmc_time / plan.iteration_time, 3) if mcmc_time else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    rows = []
    only = set(sys.argv[1:])
    for case in CASES:
        if only and str(case[2]) not in only:
            continue
        rows.append(run_case(*case))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    if only and (out / "plan_bench.json").exists():  # a partial run updates its rows only
        done = {r["case"] for r in rows}
        old = [r for r in json.loads((out / "plan_bench.json").read_text()) if r["case"] not in done]
        rows = sorted(old + rows, key=lambda r: r["gpus"])
    (out / "plan_bench.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    cols = ["case", "solve_s", "status", "gap", "iteration_s", "lower_bound_s", "symmetric_s", "vs_symmetric",
            "mcmc_s", "vs_mcmc", "peak_rss_mib"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "plan_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
