"""Measured against estimated, per call, for GRPO on the SmolLM2-135M-shaped checkpoint
(issue 22: time within 50%, peak memory within 30%), with `rlhfc run`'s defaults: the
plan priced by this machine's cached CPU profile (`rlhfc profile`), no calibration.

The job is `bench/trl_compare.py`'s (8 prompts x 4 samples, 32 new tokens, fp32, 1
process). Each round measures this machine afresh (an empty profile cache) and runs
`--steps` steps priced by it. Peaks are counted on the first step and on every
checkpoint step (`save_every = 3`: the third step, once Adam's moments exist); times are
the median of the steps that counted nothing (the count itself is slow) after the first
(warm-up). Beside them, the estimates the same profile's matmuls alone price (the
profile before whole layers were timed: `derive` of its measurements without the layer
cases). Writes bench/results/smollm2_estimates.{json,md}.

    flock /tmp/rlhfc-bench.lock .venv/bin/python bench/smollm2_estimates.py [--rounds 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_compare import ROOT, rlhfc_program, write_checkpoint  # noqa: E402

SAVE_EVERY = 3
LAYER_CASES = ("layer_train", "layer_forward", "head_train", "head_forward", "decode_step")


def run(steps: int, out: Path) -> list[dict]:
    out.parent.mkdir(parents=True, exist_ok=True)
    program = rlhfc_program(write_checkpoint(Path(tempfile.gettempdir()) / "rlhfc-smollm2-135m-shaped"), steps,
                            out.parent)
    text = program.read_text().replace("seed = 1", f"seed = 1  save_every = {SAVE_EVERY}")
    program.write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    rlhfc = str(Path(sys.executable).parent / "rlhfc")
    done = subprocess.run([rlhfc, "run", str(program), "--devices", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"rlhfc run failed\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ratios(rows: list[dict]) -> dict:
    """Per call: seconds measured (median of the uncounted steps after the first) and
    estimated, and the peak measured on each counted step over its estimate."""
    timed = [r for r in rows[1:] if not any(k.startswith("peak_bytes/") for k in r)] or rows[1:]
    counted = [(i + 1, r) for i, r in enumerate(rows) if any(k.startswith("peak_bytes/") for k in r)]
    out = {}
    for key, estimate in rows[0].items():
        call = key.split("/")[-1]
        if key.startswith("estimate/peak_bytes/"):
            out.setdefault(call, {})["peak"] = {step: r[f"peak_bytes/{call}"] / r[key] for step, r in counted}
            out[call]["peak_estimate_bytes"] = estimate
        elif key.startswith("estimate/") and key.count("/") == 1 and f"time/{call}" in rows[0] and estimate:
            measured = statistics.median(r[f"time/{call}"] for r in timed)
            out.setdefault(call, {}).update(time_s=measured, estimate_s=estimate, time=measured / estimate)
    return out


def profile_of(out: Path) -> Path:
    """The machine profile that priced the run (the program's header names it)."""
    return Path(re.search(r"measured once \((.+?)\)", (out / "program.py").read_text()).group(1))


def matmul_only(out: Path, work: Path) -> tuple[dict, dict[str, float]]:
    """(the profile's layer coefficients, each call's estimate when the same profile is
    derived from its matmuls, copies and decode cases alone)."""
    from rlhfc.driver import compile_program
    from rlhfc.planner.profile import derive
    from rlhfc_runtime.profile import Measurement

    doc = json.loads(profile_of(out).read_text())
    kept = [Measurement(m["what"], tuple(m["case"]), m["seconds"], m["precision"]) for m in doc["measurements"]
            if m["what"] not in LAYER_CASES]
    old = work / "matmul_only.json"
    old.write_text(json.dumps(derive(kept, cores=doc["device"].get("cores"))))
    prog, _ = compile_program(work / "grpo_smollm2.rlhf", devices=1, hardware=old, output=work / "old.py")
    layer = {k: doc["coefficients"][k]
             for k in ("compute_efficiency", "inference_efficiency", "decode_layer_overhead", "decode_step_overhead")}
    return layer, {p.call: p.end - p.start for p in prog.plan.calls}


def one_round(steps: int, out: Path) -> dict:
    """A run priced by a profile of this machine measured just before it (a fresh cache:
    on shared cores the machine's speed changes from one minute to the next)."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        load = [os.getloadavg()[0]]
        rows = run(steps, out)
        load.append(os.getloadavg()[0])
        calls = ratios(rows)
        layer, old = matmul_only(out, out.parent)
    for call, c in calls.items():
        if "time" in c and call in old:  # the plan's calls (not the whole iteration)
            c["matmul_only_estimate_s"] = old[call]
            c["matmul_only"] = c["time_s"] / old[call]
    return {"calls": calls, "profile_coefficients": layer, "load_average_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    out = Path(tempfile.gettempdir()) / "rlhfc-smollm2-estimates" / "out"
    rounds = []
    for r in range(args.rounds):
        rounds.append(one_round(args.steps, out))
        print(f"round {r}: " + json.dumps(rounds[-1]), flush=True)
    results = ROOT / "bench" / "results"
    summary = {"steps_per_round": args.steps, "threads": os.environ.get("RLHFC_THREADS", "default"), "rounds": rounds}
    (results / "smollm2_estimates.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "smollm2_estimates.md").write_text(markdown(rounds, args.steps) + "\n")
    print(markdown(rounds, args.steps))


def markdown(rounds: list[dict], steps: int) -> str:
    calls = [c for c, v in rounds[0]["calls"].items() if "matmul_only" in v]
    med = lambda call, key: statistics.median(r["calls"][call][key] for r in rounds)  # noqa: E731
    per = lambda call, key: ", ".join(f"{r['calls'][call][key]:.2f}" for r in rounds)  # noqa: E731
    lines = ["| call | measured s | estimated s | measured / estimate, per round (median) "
             "| matmul-only profile: measured / estimate (median) | peak measured / estimate, step 1 / step 3 |",
             "|---|---:|---:|---|---|---|"]
    for call in calls:
        peaks = rounds[-1]["calls"][call]["peak"]
        lines.append(f"| {call} | {med(call, 'time_s'):.2f} | {med(call, 'estimate_s'):.2f} | {per(call, 'time')} "
                     f"({med(call, 'time'):.2f}) | {per(call, 'matmul_only')} ({med(call, 'matmul_only'):.2f}) | "
                     + " / ".join(f"{v:.2f}" for v in peaks.values()) + " |")
    loads = ", ".join(f"{r['load_average_1min'][0]:.1f}-{r['load_average_1min'][1]:.1f}" for r in rounds)
    coeffs = "; ".join(", ".join(f"{k} {v:.3g}" for k, v in r["profile_coefficients"].items()) for r in rounds)
    return "\n".join(lines + ["", f"{len(rounds)} rounds of {steps} steps, each priced by a profile of this machine "
                               f"measured just before it; 1-minute load average (start-end of each round) {loads} "
                               f"on a shared 2-core machine; threads: {os.environ.get('RLHFC_THREADS', 'default')}. "
                               f"The profiles' layer coefficients: {coeffs}."])


if __name__ == "__main__":
    main()
