"""GRPO step time, rlhfc against TRL's GRPOTrainer, on the same job (issue 22): a
SmolLM2-135M-shaped checkpoint (llama, 30 layers, hidden 576, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings; random weights written by
`transformers`), 8 prompts x 4 samples, 32 new tokens, fp32, 1 process, the tiny task's
prompts and the same reward (`pattern_reward` on token ids), KL coefficient 0.04 against
a reference copy, one optimizer step per rollout. Each tool runs with its defaults
otherwise: rlhfc's plan and threads (cores / processes), TRL's GRPOConfig and torch's
threads. Rounds interleave the two tools; a round's figure per tool is the median
seconds per step after the first (warm-up) step. Writes bench/results/trl_compare.{json,md}.

    flock /tmp/rlhfc-bench.lock python bench/trl_compare.py [--rounds 3] [--steps 4]

TRL is a bench-only dependency (`pip install -e ".[bench]"`); `--tool trl` / `--tool rlhfc` run
one tool once (what each round spawns)."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)
PROMPTS, GROUP, NEW_TOKENS, KL = 8, 4, 32, 0.04
LR = 1e-6
MAX_LEN = 16


def write_checkpoint(path: Path) -> Path:
    """The SmolLM2-135M-shaped checkpoint (random weights, seed 0) with the tiny
    task's tokenizer, once."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(SMOLLM2_135M)
    cfg.pop("model_type")
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, path / name)
    return path


def rlhfc_program(ckpt: Path, steps: int, tmp: Path, devices: int = 1) -> Path:
    text = f"""import grpo from "{ROOT}/stdlib/grpo.rlhf"

cluster {{ nodes = 1  devices_per_node = {devices}  device = "cpu" }}

model actor  = llama("{ckpt}") {{ trainable  optimizer = adam(lr = {LR}) }}
model ref    = llama("{ckpt}")
model reward = rule("pattern_reward")

dataset prompts = jsonl("{TINY}/prompts.jsonl", field = "prompt", max_len = {MAX_LEN},
                        tokenizer = "{TINY}/tokenizer.json")

run grpo(actor, ref, reward, prompts) {{
    batch = {PROMPTS}  group_size = {GROUP}  max_new_tokens = {NEW_TOKENS}  steps = {steps}  kl_coef = {KL}
    precision = "fp32"  seed = 1
}}
"""
    path = tmp / "grpo_smollm2.rlhf"
    path.write_text(text)
    return path


def run_rlhfc(ckpt: Path, steps: int, out: Path) -> list[float]:
    """Seconds of each step (`time/iteration` in metrics.jsonl); the calls' measured
    peaks and times beside the plan's estimates in OUT/estimates.json."""
    program = rlhfc_program(ckpt, steps, out.parent)
    rlhfc = str(Path(sys.executable).parent / "rlhfc")
    done = subprocess.run([rlhfc, "run", str(program), "--devices", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"rlhfc run failed\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    (out / "estimates.json").write_text(json.dumps(estimates(rows)))
    return [r["time/iteration"] for r in rows if "time/iteration" in r]


def estimates(rows: list[dict]) -> dict:
    """Per call: measured peak bytes (the first step, where they are counted) over the
    plan's estimate, and measured seconds (median of the later steps) over the estimate."""
    first, later = rows[0], rows[1:] or rows
    out = {}
    for key in first:
        if key.startswith("estimate/peak_bytes/") and f"peak_bytes/{key.split('/')[-1]}" in first:
            call = key.split("/")[-1]
            out.setdefault(call, {})["peak"] = first[f"peak_bytes/{call}"] / first[key]
        elif key.startswith("estimate/") and key.count("/") == 1 and f"time/{key[9:]}" in first and first[key]:
            call = key[9:]
            out.setdefault(call, {})["time"] = statistics.median(r[f"time/{call}"] for r in later) / first[key]
    return out


def pattern_reward(prompts, completions, completion_ids, prompt_ids, **_) -> list[float]:
    """rlhfc's `pattern_reward` rule on the same token ids (eos removed as rlhfc does)."""
    from rlhfc_runtime.algorithms.rules import RULE_FUNCTIONS

    rule, eos = RULE_FUNCTIONS["pattern_reward"], SMOLLM2_135M["eos_token_id"]
    out = []
    for prompt, answer in zip(prompt_ids, completion_ids):
        answer = list(answer)
        if eos in answer:
            answer = answer[:answer.index(eos)]
        out.append(float(rule(list(prompt), answer, NEW_TOKENS)))
    return out


def run_trl(ckpt: Path, steps: int, out: Path) -> list[float]:
    """Seconds of each GRPOTrainer step (callback timestamps)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(ckpt)
    rows = [json.loads(line) for line in (TINY / "prompts.jsonl").read_text().splitlines() if line.strip()]
    data = Dataset.from_list([{"prompt": r["prompt"], "prompt_ids": tok(r["prompt"])["input_ids"][-MAX_LEN:]}
                              for r in rows])
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, beta=KL, learning_rate=LR, max_steps=steps, use_cpu=True,
        bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=1, seed=1,
        dataloader_num_workers=0,
    )
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=pattern_reward, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return [b - a for a, b in zip(marks, marks[1:])]


def one(tool: str, ckpt: Path, steps: int, out: Path) -> None:
    """One run of one tool, in this process; its step seconds as JSON on the last line."""
    times = run_rlhfc(ckpt, steps, out) if tool == "rlhfc" else run_trl(ckpt, steps, out)
    print(json.dumps(times))


def spawn(tool: str, ckpt: Path, steps: int, out: Path) -> dict:
    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = ["/usr/bin/time", "-f", "%U %S", sys.executable, __file__, "--tool", tool, "--ckpt", str(ckpt),
           "--steps", str(steps), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{tool} failed\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    times = json.loads(done.stdout.strip().splitlines()[-1])
    user, system = map(float, done.stderr.strip().splitlines()[-1].split())
    row = {"steps": times, "step_s": statistics.median(times[1:] or times), "wall_s": time.perf_counter() - start,
           "user_s": user, "system_s": system}
    if tool == "rlhfc":
        row["measured_over_estimate"] = json.loads((out / "estimates.json").read_text())
        shutil.rmtree(out / "checkpoint", ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tool", choices=("rlhfc", "trl"))
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.tool:
        return one(args.tool, args.ckpt, args.steps, args.out)
    cache = Path(tempfile.gettempdir()) / "rlhfc-smollm2-135m-shaped"
    ckpt = write_checkpoint(cache)
    rounds = []
    tmp = Path(tempfile.gettempdir()) / "rlhfc-trl-compare"
    for r in range(args.rounds):
        order = ("rlhfc", "trl") if r % 2 == 0 else ("trl", "rlhfc")
        row = {tool: spawn(tool, ckpt, args.steps, Path(tmp) / f"{tool}{r}") for tool in order}
        row["trl_over_rlhfc"] = row["trl"]["step_s"] / row["rlhfc"]["step_s"]
        rounds.append(row)
        print(f"round {r}: rlhfc {row['rlhfc']['step_s']:.2f} s/step, trl {row['trl']['step_s']:.2f} s/step, "
              f"trl/rlhfc {row['trl_over_rlhfc']:.2f}", flush=True)
    write(rounds, args)


def write(rounds: list[dict], args) -> None:
    import torch
    import trl

    med = lambda tool, key: statistics.median(r[tool][key] for r in rounds)  # noqa: E731
    ratios = [r["trl_over_rlhfc"] for r in rounds]
    summary = {"rounds": rounds, "steps_per_run": args.steps, "torch": torch.__version__, "trl": trl.__version__,
               "cores": torch.get_num_threads(), "median_trl_over_rlhfc": statistics.median(ratios)}
    results = ROOT / "bench" / "results"
    (results / "trl_compare.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["| tool | s/step (median of rounds) | user s / run | system s / run |", "|---|---:|---:|---:|"]
    for tool in ("rlhfc", "trl"):
        lines.append(f"| {tool} | {med(tool, 'step_s'):.2f} | {med(tool, 'user_s'):.0f} | {med(tool, 'system_s'):.0f} |")
    lines.append("")
    lines.append(f"TRL / rlhfc per round: {', '.join(f'{x:.2f}' for x in ratios)} (median "
                 f"{statistics.median(ratios):.2f}; above 1: rlhfc faster). {len(rounds)} interleaved rounds, "
                 f"{args.steps} steps per run, the first step of each run left out; TRL {trl.__version__}, "
                 f"torch {torch.__version__}.")
    (results / "trl_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
