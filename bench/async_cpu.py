"""Asynchronous RL on 2 CPU processes: each program as written (synchronous) against the
same program with `max_staleness = 1`, run interleaved, `rlhfc run` as a user runs it.

Per round and program: the two runs one after the other (which first alternates by
round), the median of `time/iteration` over each run's steps after the first two, and
the plan's `estimate/iteration`. Reports medians over rounds, the per-round measured
speedup (sync / K=1) beside the predicted one, and the reward of each run's first and
last 10 steps (the learning curves). Writes
bench/results/async_cpu.{json,md}.

    flock /tmp/rlhfc-bench.lock python bench/async_cpu.py [--rounds 3] [--steps 150]

`--smollm2` runs instead GRPO on the SmolLM2-135M-shaped checkpoint of
`bench/trl_compare.py` (vocab 49,152, 30 layers) on 2 processes: a real shape, few steps.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhfc.cli.run import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def with_staleness(source: Path, k: int, into: Path) -> Path:
    """A copy of `source` (its relative paths made absolute) whose run block sets max_staleness = k."""
    text = source.read_text().replace('"../', f'"{ROOT}/').replace('from "stdlib/', f'from "{ROOT}/stdlib/')
    text = re.sub(r"(run \w+\([^)]*\)\s*\{)", rf"\1 max_staleness = {k} ", text, count=1)
    path = into / f"{source.stem}_k{k}.rlhf"
    path.write_text(text)
    return path


def one_run(program: Path, out: Path, steps: int) -> dict:
    rlhfc = str(Path(sys.executable).parent / "rlhfc")
    done = subprocess.run([rlhfc, "run", str(program), "--out", str(out), "--steps", str(steps), "--overwrite"],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{program.name}: rlhfc run failed\n{done.stderr[-3000:]}")
    records = read_metrics(out / "metrics.jsonl")
    rewards = [r["reward"] for r in records if "reward" in r]
    return {"s_per_step": statistics.median(r["time/iteration"] for r in records[2:]),
            "estimate": records[-1]["estimate/iteration"],
            "staleness": statistics.mean(r.get("staleness", 0.0) for r in records),
            "reward_first10": statistics.mean(rewards[:10]), "reward_last10": statistics.mean(rewards[-10:])}


def smollm2_source(tmp: Path) -> Path:
    """GRPO on the SmolLM2-135M-shaped random checkpoint, 2 processes (`trl_compare`'s job)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from trl_compare import rlhfc_program, write_checkpoint

    ckpt = write_checkpoint(Path(tempfile.gettempdir()) / "rlhfc-smollm2-135m-shaped")
    return rlhfc_program(ckpt, 1, tmp, devices=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="*", default=["ppo", "grpo"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--smollm2", action="store_true", help="GRPO at SmolLM2-135M's shape instead")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ["grpo_smollm2"] if args.smollm2 else args.programs:
            source = smollm2_source(tmp) if args.smollm2 else ROOT / "programs" / f"{name}.rlhf"
            sources = {k: with_staleness(source, k, tmp) for k in (0, 1)}
            rounds = []
            for r in range(args.rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                runs = {k: one_run(sources[k], tmp / f"{name}_k{k}", args.steps) for k in order}
                rounds.append(runs)
                print(f"{name} round {r + 1}: sync {runs[0]['s_per_step']:.4f} s/step, K=1 {runs[1]['s_per_step']:.4f}"
                      f" (predicted {runs[0]['estimate']:.4f} / {runs[1]['estimate']:.4f})", flush=True)
            measured = [x[0]["s_per_step"] / x[1]["s_per_step"] for x in rounds]
            predicted = rounds[0][0]["estimate"] / rounds[0][1]["estimate"]
            rows.append({
                "program": name, "steps": args.steps, "rounds": args.rounds,
                "sync_s_per_step": statistics.median(x[0]["s_per_step"] for x in rounds),
                "k1_s_per_step": statistics.median(x[1]["s_per_step"] for x in rounds),
                "sync_estimate": rounds[0][0]["estimate"], "k1_estimate": rounds[0][1]["estimate"],
                "measured_speedup_per_round": measured, "measured_speedup": statistics.median(measured),
                "predicted_speedup": predicted, "k1_mean_staleness": rounds[-1][1]["staleness"],
                "reward": {k: [rounds[-1][k]["reward_first10"], rounds[-1][k]["reward_last10"]] for k in (0, 1)},
            })
    results = ROOT / "bench" / "results"
    stem = "async_cpu_smollm2" if args.smollm2 else "async_cpu"
    (results / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| program | sync s/step | K=1 s/step | measured speedup (median; per round) | predicted | "
             "K=1 staleness | reward sync first→last 10 | reward K=1 first→last 10 |", "|---|---:|---:|---|---:|---:|---|---|"]
    for x in rows:
        per = ", ".join(f"{v:.2f}" for v in x["measured_speedup_per_round"])
        lines.append(f"| {x['program']} | {x['sync_s_per_step']:.4f} | {x['k1_s_per_step']:.4f} | "
                     f"{x['measured_speedup']:.2f}x ({per}) | {x['predicted_speedup']:.2f}x | {x['k1_mean_staleness']:.2f} | "
                     f"{x['reward'][0][0]:.3f} → {x['reward'][0][1]:.3f} | {x['reward'][1][0]:.3f} → {x['reward'][1][1]:.3f} |")
    (results / f"{stem}.md").write_text(
        f"# Asynchronous RL on 2 CPU processes (`bench/async_cpu.py`, {args.rounds} interleaved rounds, "
        f"{args.steps} steps each)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
