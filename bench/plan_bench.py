"""Planner benchmark on ReaL's measured PPO settings (run by hand):
`python bench/plan_bench.py [ROW…]` writes bench/results/plan_bench.{json,md}.

The twelve settings of `bench/data/real_measured.json` (Mei et al. 2024: four same-size
LLaMA models on H100s, 8 per node, prompt 128, generation 128/384/896, batch
512/256/128, 4 PPO mini-batches per train call), planned with the catalog's H100
coefficients in the full search space under the CLI's default 10 s limit. Per setting:
rlhfc's estimate of its plan beside ReaL's measured seconds per iteration, the symmetric
plan's estimate beside ReaL-Heuristic's measured seconds, predicted and measured
speedup over symmetric, the whole `plan_dataflow` wall time, status and gap, and the
process's peak RSS. ROW numbers (0-11) rerun some rows only.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_settings import Setting, settings  # noqa: E402

from rlhfc.planner.solve import plan_dataflow, symmetric_plan  # noqa: E402

TIME_LIMIT = 10.0


def run_case(s: Setting) -> dict:
    df = s.dataflow()
    t0 = time.perf_counter()
    plan = plan_dataflow(df, time_limit=TIME_LIMIT)
    wall = time.perf_counter() - t0
    sym = symmetric_plan(df).iteration_time
    est = plan.iteration_time
    return {
        "setting": s.name, "gpus": s.gpus, "estimate_s": round(est, 2), "real_s": s.real,
        "symmetric_s": round(sym, 2), "real_heuristic_s": s.real_heuristic,
        "speedup_predicted": round(sym / est, 2), "speedup_measured": round(s.real_heuristic / s.real, 2),
        "time_error": round(abs(est - s.real) / s.real, 3), "solve_s": round(wall, 1), "status": plan.status,
        "gap": round(plan.gap, 3), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


COLUMNS = ["setting", "estimate_s", "real_s", "symmetric_s", "real_heuristic_s", "speedup_predicted",
           "speedup_measured", "time_error", "solve_s", "status", "gap", "peak_rss_mib"]


def main() -> None:
    rows = settings()
    only = {int(a) for a in sys.argv[1:]}
    results = []
    for i, s in enumerate(rows):
        if only and i not in only:
            continue
        results.append(run_case(s))
        print(json.dumps(results[-1]), flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    if only and (out / "plan_bench.json").exists():  # a partial run updates its rows only
        done = {r["setting"] for r in results}
        old = [r for r in json.loads((out / "plan_bench.json").read_text()) if r.get("setting") not in done
               and r.get("setting") in {s.name for s in rows}]
        order = {s.name: i for i, s in enumerate(rows)}
        results = sorted(old + results, key=lambda r: order[r["setting"]])
    (out / "plan_bench.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in results]
    (out / "plan_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
