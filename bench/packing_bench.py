"""Tokens per second, packed vs padded, on a length distribution like a real RL run.

Rollouts of an RL step have a long tail: most responses are short and a few run 10 to
20 times the median (long chains of thought). This bench draws such a batch
(log-normal response lengths, median `--median`, clipped to 20x the median; prompts
uniform in [16, 64]), lays it out as the runtime holds it (left-padded prompts,
right-padded responses: the padded width is the longest prompt plus the longest
response), and times, in one process, a train step (forward, backward, Adam) and an
inference pass (per-token log-probs) of a decoder through `run_pipeline`, packed and
padded. Each round runs both layouts back to back (interleaved); figures are medians
over rounds, ratios per round. Real tokens are counted (padding does no useful work).

Usage: python bench/packing_bench.py [--rounds 5] [--rows 32] [--median 24] [--out bench/results/packing_bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lengths(rows: int, median: int, seed: int) -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    response = (torch.randn(rows, generator=gen) * 1.1).exp() * median
    response = response.clamp(1, 20 * median).round().long()
    response[0] = 20 * median  # the long tail is there in every batch
    prompt = torch.randint(16, 65, (rows,), generator=gen)
    return prompt.tolist(), response.tolist()


def batch(prompt: list[int], response: list[int], vocab: int, seed: int) -> dict:
    p, r = max(prompt), max(response)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(prompt), p + r), generator=gen)
    mask = torch.zeros_like(ids)
    for row, (a, b) in enumerate(zip(prompt, response)):
        mask[row, p - a:p + b] = 1
    return {"input_ids": ids * mask, "attention_mask": mask}


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args) -> dict:
    from rlhfc_runtime.checkpoint import init_random, tiny_config
    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.dist import ensure_groups
    from rlhfc_runtime.model import lm_loss

    torch.set_num_threads(args.threads)
    layout = Layout((0,), 1, 1, 1)
    ensure_groups([layout])
    cfg = tiny_config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=4096)
    model = init_random(cfg, layout, "lm", 0, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    prompt, response = lengths(args.rows, args.median, 1)
    data = batch(prompt, response, args.vocab, 2)
    real = int(data["attention_mask"].sum())
    budget = data["input_ids"].numel()  # the priced micro-batch: the padded batch, one micro-batch

    def train():
        model.train_step(data["input_ids"], data["attention_mask"], lm_loss, opt, token_budget=budget)

    def infer():
        with torch.no_grad():
            model.token_logprobs(data["input_ids"], data["attention_mask"])

    rounds = []
    for r in range(args.rounds):
        row = {}
        for layout_name in ("packed", "padded"):
            model.pack = layout_name == "packed"
            row[f"train/{layout_name}"] = _time(train)
            row[f"inference/{layout_name}"] = _time(infer)
        rounds.append(row)
        print(r, {k: round(v, 3) for k, v in row.items()}, flush=True)
    rounds = rounds[1:] if len(rounds) > 1 else rounds  # the first round warms up
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    speedup = {kind: statistics.median(r[f"{kind}/padded"] / r[f"{kind}/packed"] for r in rounds)
               for kind in ("train", "inference")}
    return {"real_tokens": real, "padded_tokens": budget, "rows": args.rows,
            "response_median": statistics.median(response), "response_max": max(response),
            "prompt_range": [min(prompt), max(prompt)], "seconds": med,
            "tokens_per_s": {k: real / v for k, v in med.items()}, "speedup": speedup, "rounds": rounds,
            "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}, "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--median", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "packing_bench")
    args = ap.parse_args()
    from rlhfc_runtime.dist import spawn

    res = spawn(run, 1, args)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(res, indent=1))
    lines = [f"{res['rows']} rows, responses median {res['response_median']} / max {res['response_max']} tokens "
             f"(log-normal, clipped at 20x the median), prompts {res['prompt_range'][0]}–{res['prompt_range'][1]}: "
             f"{res['real_tokens']} real tokens in a padded batch of {res['padded_tokens']}.",
             "", "| pass | packed tokens/s | padded tokens/s | packed speed-up (per-round median) |", "|---|---:|---:|---:|"]
    for kind in ("train", "inference"):
        lines.append(f"| {kind} | {res['tokens_per_s'][f'{kind}/packed']:.0f} | "
                     f"{res['tokens_per_s'][f'{kind}/padded']:.0f} | {res['speedup'][kind]:.2f}x |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
