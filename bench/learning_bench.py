"""What every tiny example program learns: `rlhfc run programs/X.rlhf` for each, all its
steps, and the first-10 vs last-10 step means of its headline metric (the line `rlhfc run`
ends with). Writes bench/results/learning_bench.{json,md}.

    python bench/learning_bench.py [--programs ppo grpo …]   (rows of other programs are kept)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhfc.cli.run import read_metrics, summarize

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("ppo", "ppo_epochs", "grpo", "grpo_seqmean", "rloo", "remax", "dpo", "sft", "reward_model", "ppo_pinned",
            "grpo_math")
METRICS = {"dpo": "a_tr/dpo_loss", "sft": "a_tr/sft_loss", "reward_model": "rm_tr/reward_accuracy",
           "grpo_math": "score/reward/exact_match"}


def first_last(records: list[dict], key: str, window: int = 10) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` steps."""
    values = [r[key] for r in records if key in r]
    head, tail = values[:window], values[-window:]
    return sum(head) / len(head), sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="*", default=list(PROGRAMS))
    args = parser.parse_args()
    rows = []
    rlhfc = str(Path(sys.executable).parent / "rlhfc")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.programs:
            out = Path(tmp) / name
            done = subprocess.run([rlhfc, "run", f"programs/{name}.rlhf", "--out", str(out)], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{name}: rlhfc run failed\n{done.stderr[-2000:]}")
            records = read_metrics(out / "metrics.jsonl")
            key = METRICS.get(name, "reward")
            if key not in records[-1]:  # a metric renamed: say which exist
                sys.exit(f"{name}: no `{key}` in metrics; keys: {sorted(records[-1])}")
            first, last = first_last(records, key)
            rows.append({"program": name, "steps": records[-1]["step"], "metric": key, "first10": first,
                         "last10": last, "summary": summarize(records)})
            print(f"{name}: {key} {first:.3f} -> {last:.3f}", flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    saved = results / "learning_bench.json"
    kept = [r for r in json.loads(saved.read_text()) if r["program"] not in args.programs] if saved.exists() else []
    order = {name: i for i, name in enumerate(PROGRAMS)}
    rows = sorted(kept + rows, key=lambda r: order.get(r["program"], len(order)))
    saved.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| program | steps | metric | first 10 steps | last 10 steps | s/step (median) |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        per_step = r["summary"].split(",")[1].split()[0]
        lines.append(f"| `{r['program']}.rlhf` | {r['steps']} | `{r['metric']}` | {r['first10']:.3f} | "
                     f"{r['last10']:.3f} | {per_step} |")
    (results / "learning_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
