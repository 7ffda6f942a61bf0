"""Seconds per step of `programs/sft.rlhf` on its own data at max_len = 32 and 512,
packed and padded (issue 22: padding must not cost time).

The program is copied with the dataset's `max_len` and the run block's `packing` set,
and its model given `max_positions = 2048` (the tiny preset's 128 cannot hold 512 + 513
positions; every other size is the preset's), compiled for 1 process and run in its own
process (as `rlhfc run --devices 1` runs it), with every iteration timed twice: wall
seconds, and the CPU seconds of the process (`time.process_time`: what the step
computes, robust to other jobs sharing the cores; the shared 2-core machine these
figures come from ran at load 5-10). Each round runs every variant once, one after
another (interleaved); a run's figure is the median after its first `--warmup` steps;
the table gives the median over rounds, and the ratios are taken within a round.

Usage: python bench/sft_padding.py [--rounds 3] [--steps 15] [--warmup 3] [--out bench/results/sft_padding]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = 'llama(preset = "tiny")'
SHAPED = "llama(layers = 2, hidden = 64, heads = 4, kv_heads = 2, intermediate = 128, vocab = 64, max_positions = 2048)"
VARIANTS = [(32, "packed"), (512, "packed"), (32, "padded"), (512, "padded")]


def variant(tmp: Path, max_len: int, packing: str) -> Path:
    text = (ROOT / "programs" / "sft.rlhf").read_text()
    text = text.replace('"../data/', f'"{ROOT}/data/').replace(TINY, SHAPED)
    text = text.replace("max_len = 32", f"max_len = {max_len}").replace("seed = 1 }", f'seed = 1  packing = "{packing}" }}')
    path = tmp / f"sft_{max_len}_{packing}.rlhf"
    path.write_text(text)
    return path


def seconds_per_step(program: Path, steps: int, warmup: int) -> tuple[float, float, float, float]:
    """(median wall s/step, median CPU s/step after warm-up, last loss, fastest wall
    s/step: the step least disturbed by other jobs) of one run."""
    out = program.with_suffix("")
    compiled = program.with_suffix(".py")
    subprocess.run([str(Path(sys.executable).with_name("rlhfc")), "compile", str(program), "--devices", "1",
                    "-o", str(compiled)], check=True, capture_output=True)
    subprocess.run([sys.executable, __file__, "--timed", str(compiled), str(out), str(steps)], check=True,
                   capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = json.loads((out / "timed.json").read_text())[warmup:]
    return (statistics.median(w for w, _ in timed), statistics.median(c for _, c in timed), rows[-1]["a_tr/loss"],
            min(w for w, _ in timed))


def timed_run(compiled: str, out: str, steps: str) -> None:
    """Run a compiled program here, timing each iteration (wall and process CPU)."""
    import runpy
    import time

    from rlhfc_runtime import engine

    times: list[tuple[float, float]] = []
    real_main = engine.main

    def main(program, layouts, groups, iteration, here, argv=None):
        def timed(e):
            wall, cpu = time.perf_counter(), time.process_time()
            iteration(e)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        real_main(program, layouts, groups, timed, here, ["--steps", steps, "--out", out, "--overwrite"])

    engine.main = main
    runpy.run_path(compiled, run_name="__main__")
    Path(out, "timed.json").write_text(json.dumps(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sft_padding")
    ap.add_argument("--timed", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.timed:
        return timed_run(*args.timed)
    tmp = Path(tempfile.mkdtemp(prefix="sft_padding_"))
    programs = {v: variant(tmp, *v) for v in VARIANTS}
    rounds = []
    for r in range(args.rounds):
        result = {f"{n}/{p}": seconds_per_step(programs[(n, p)], args.steps, args.warmup) for n, p in VARIANTS}
        rounds.append(result)
        print(r, {k: [round(x, 4) for x in v] for k, v in result.items()}, flush=True)
    print("", flush=True)
    med = {k: statistics.median(r[k][0] for r in rounds) for k in rounds[0]}
    cpu = {k: statistics.median(r[k][1] for r in rounds) for k in rounds[0]}
    fastest = {k: statistics.median(r[k][3] for r in rounds) for k in rounds[0]}
    ratio = lambda a, b, i: statistics.median(r[a][i] / r[b][i] for r in rounds)  # noqa: E731
    summary = {"s_per_step": med, "cpu_s_per_step": cpu, "fastest_s_per_step": fastest, "loss": {k: rounds[-1][k][2] for k in med},
               "ratio_512_to_32_packed": ratio("512/packed", "32/packed", 0),
               "ratio_512_to_32_padded": ratio("512/padded", "32/padded", 0),
               "cpu_ratio_512_to_32_packed": ratio("512/packed", "32/packed", 1),
               "cpu_ratio_512_to_32_padded": ratio("512/padded", "32/padded", 1),
               "fastest_ratio_512_to_32_packed": ratio("512/packed", "32/packed", 3),
               "fastest_ratio_512_to_32_padded": ratio("512/padded", "32/padded", 3),
               "rounds": rounds, "steps": args.steps, "warmup": args.warmup}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(summary, indent=1))
    lines = ["| max_len | packed wall s/step (median / fastest) | packed CPU s/step | padded wall s/step "
             "(median / fastest) | padded CPU s/step | last loss (packed / padded) |", "|---:|---:|---:|---:|---:|---|"]
    for n in (32, 512):
        lines.append(f"| {n} | {med[f'{n}/packed']:.4f} / {fastest[f'{n}/packed']:.4f} | {cpu[f'{n}/packed']:.4f} | "
                     f"{med[f'{n}/padded']:.4f} / {fastest[f'{n}/padded']:.4f} | {cpu[f'{n}/padded']:.4f} | "
                     f"{summary['loss'][f'{n}/packed']:.4f} / {summary['loss'][f'{n}/padded']:.4f} |")
    lines.append(f"\n512 / 32, per-round median: packed {summary['ratio_512_to_32_packed']:.2f}x wall, "
                 f"{summary['cpu_ratio_512_to_32_packed']:.2f}x CPU; padded {summary['ratio_512_to_32_padded']:.2f}x "
                 f"wall, {summary['cpu_ratio_512_to_32_padded']:.2f}x CPU; fastest steps: packed "
                 f"{summary['fastest_ratio_512_to_32_packed']:.2f}x, padded {summary['fastest_ratio_512_to_32_padded']:.2f}x "
                 f"({args.rounds} rounds, {args.steps} steps, median after {args.warmup})")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
