"""GRPO on the tiny task under TRL's conventions, one at a time: which of them explains
the reward TRL's GRPOTrainer reached over rlhfc's (issue 15). Each variant is
`programs/grpo.rlhf` with run-block settings added, `--steps 100`, seeds 1-3; the
figure is the mean reward of the last 10 steps. Writes bench/results/grpo_gap.{json,md}.

    python bench/grpo_gap.py [--steps 100] [--seeds 1 2 3] [--variants NAME…]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhfc.cli.run import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_bench import first_last  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STM = 'loss_agg = "seq-mean-token-mean"'
VARIANTS = {
    "rlhfc (grpo.rlhf: token-mean, beta 0.04)": "",
    "kl_coef = 0 (TRL's beta default in recent releases)": "kl_coef = 0.0",
    "max_grad_norm 1, linear lr decay (HF Trainer defaults)": 'max_grad_norm = 1.0  lr_schedule = "linear"',
    "seq-mean-token-mean (TRL loss_type grpo)": STM,
    "4 mini-batches per rollout (TRL steps_per_generation 4)": "mini_batches = 4",
    "seq-mean-token-mean, 4 mini-batches": f"{STM}  mini_batches = 4",
    "seq-mean-token-mean, kl_coef = 0": f"{STM}  kl_coef = 0.0",
    "issue 15's GRPO options": f'{STM}  scale_rewards = "none"  clip_high = 0.28  entropy_coef = 0.001',
    "Dr.GRPO (token sums / max_new_tokens, no std)": 'loss_agg = "seq-mean-token-sum-norm"  scale_rewards = "none"',
}


def program(extra: str, seed: int, steps: int, tmp: Path) -> Path:
    """grpo.rlhf with `extra` settings, `seed` and `steps` in its run block (schedules span
    the run's steps), paths made absolute."""
    text = (ROOT / "programs" / "grpo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')
    text = re.sub(r"seed = \d+", f"seed = {seed}", re.sub(r"steps = \d+", f"steps = {steps}", text))
    for key, value in re.findall(r"(\w+) = (\S+)", extra):  # override the program's value, or add
        text, n = re.subn(rf"\b{key} = \S+", f"{key} = {value}", text)
        text = text if n else text.replace(f"seed = {seed}", f"seed = {seed}  {key} = {value}")
    path = tmp / f"grpo_{abs(hash((extra, seed)))}.rlhf"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    rlhfc = str(Path(sys.executable).parent / "rlhfc")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            lasts = []
            for seed in args.seeds:
                out = Path(tmp) / f"run{len(rows)}_{seed}"
                done = subprocess.run([rlhfc, "run", str(program(VARIANTS[name], seed, args.steps, Path(tmp))),
                                       "--devices", "1", "--out", str(out)], cwd=ROOT,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name}: rlhfc run failed\n{done.stderr[-2000:]}")
                lasts.append(first_last(read_metrics(out / "metrics.jsonl"), "reward")[1])
            rows.append({"variant": name, "settings": VARIANTS[name], "last10": lasts})
            print(f"{name}: last-10 reward {' '.join(f'{x:.3f}' for x in lasts)}", flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "grpo_gap.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"| variant of grpo.rlhf ({args.steps} steps) | run-block settings | last-10 reward, seeds "
             f"{', '.join(map(str, args.seeds))} | mean |", "|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | `{r['settings'] or '—'}` | "
                     f"{' / '.join(f'{x:.3f}' for x in r['last10'])} | {sum(r['last10']) / len(r['last10']):.3f} |")
    (results / "grpo_gap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
