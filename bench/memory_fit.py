"""Fit the cost model's memory coefficients to what the runtime allocates.

Runs the runtime's own train step, forward pass and generation (`ShardedLlama`,
`generate`) on tiny models under a grid of shapes, layouts (tp, pp), micro-batch
counts, precisions and recompute, in one 2-process gloo world; measures each call's
peak with `rlhfc_runtime.memory.LiveBytes` (the figure `peak_bytes/CALL` logs on CPU);
fits by least squares the per-term bytes of `rlhfc.planner.cost.memory` (the feature
functions below mirror its formulas, named by its `MemoryCoefficients` fields) and
writes them with the fit's errors; `MEMORY_COEFFICIENTS` holds these values (a test
compares them with bench/results/memory_fit.json).

    .venv/bin/python bench/memory_fit.py     # ~1 min on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.layout import Layout, stage_layers
from rlhfc_runtime.dist import ensure_groups, rank_groups, spawn
from rlhfc_runtime.generate import SamplingParams, generate
from rlhfc_runtime.memory import LiveBytes
from rlhfc_runtime.model import DTYPES, ModelConfig, ShardedLlama, lm_loss

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
ROWS, PROMPT, NEW = 48, 16, 12
LAYERS, HEADS, KV_HEADS = 4, 4, 2
SHAPES = [(64, 128, 40), (128, 256, 400), (64, 384, 40)]  # (hidden, intermediate, vocab)
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 1 or 2 ranks
CASES = [dict(tp=tp, pp=pp, n_mbs=m, precision=p, hidden=h, inter=i, vocab=v, head=head)
         for tp, pp in LAYOUTS for m in (1, 4) for p in ("fp32", "bf16") for h, i, v in SHAPES
         for head in ("lm", "value")]


def _peak(fn) -> int:
    mode = LiveBytes().__enter__()
    try:
        fn()
    finally:
        mode.__exit__(None, None, None)
    return mode.peak


def _batch(vocab: int, seq: int):
    ids = torch.randint(3, vocab, (ROWS, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::3, :4] = 0  # left padding on every third row, as prompts have
    return ids, mask


def _loss(head: str):
    if head == "lm":
        return lambda h, mb: lm_loss(h, mb)
    return lambda h, mb: (h.values().float() ** 2).mean()


def _measure() -> list[dict]:
    rank = torch.distributed.get_rank()
    layouts = {(tp, pp): Layout(tuple(range(tp * pp)), 1, tp, pp) for tp, pp in LAYOUTS}
    ensure_groups(list(layouts.values()))
    out = []
    for c in CASES:
        lay = layouts[(c["tp"], c["pp"])]
        if rank not in lay.ranks:
            continue
        torch.manual_seed(0)
        cfg = ModelConfig.from_hf(ck.tiny_config(
            vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"], num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS))
        model = ShardedLlama(cfg, rank_groups(lay, rank), c["head"])
        opt = torch.optim.Adam(model.parameters())
        ids, mask = _batch(c["vocab"], PROMPT + NEW)
        row = dict(c, rank=rank, stage=lay.coord(rank)[0], params=sum(p.numel() for p in model.parameters()))

        def step(recompute: bool):
            model.train_step(ids, mask, _loss(c["head"]), opt, c["n_mbs"], precision=c["precision"],
                             recompute=recompute)
            opt.zero_grad(set_to_none=True)  # the runtime frees gradients after a train call

        step(False)  # Adam state exists from here on, as in every later step of a run
        row["train"] = _peak(lambda: step(False))
        row["train_recompute"] = _peak(lambda: step(True))
        with torch.no_grad():  # a frozen copy holds its weights in the call's precision
            for p in model.parameters():
                p.data = p.data.to(DTYPES[c["precision"]])
        model.dtype = DTYPES[c["precision"]]

        def forward():
            with torch.no_grad():
                model.run_pipeline(ids, mask, lambda h, mb: (h.values() if c["head"] == "value"
                                                             else h.token_logprobs(mb["input_ids"])).float(),
                                   c["n_mbs"])

        row["inference"] = _peak(forward)
        if c["head"] == "lm":
            params = SamplingParams(max_new_tokens=NEW, greedy=False, temperature=1.0, top_k=0, top_p=1.0, seed=3,
                                    first_row=0, total_rows=ROWS, eos_token_id=-1, pad_token_id=0)
            row["generate"] = _peak(lambda: generate(model, ids[:, :PROMPT], mask[:, :PROMPT], params,
                                                     c["precision"], c["n_mbs"]))
        out.append(row)
    return out


def _common(r: dict) -> dict:
    """Per-rank sizes every feature uses (the names of `rlhfc.planner.cost.memory`)."""
    layers = len(stage_layers(LAYERS, r["pp"], r["stage"]))
    last = float(r["stage"] == r["pp"] - 1)
    vocab_out = r["vocab"] if r["head"] == "lm" else 1
    return dict(layers=layers, last=last, vocab_out=vocab_out / r["tp"] if r["head"] == "lm" else 1.0,
                inter=r["inter"] / r["tp"], hidden=r["hidden"])


def train_features(r: dict, recompute: bool) -> list[float]:
    s = _common(r)
    tokens = ROWS * (PROMPT + NEW) / r["n_mbs"]
    in_flight = min(r["pp"] - r["stage"], r["n_mbs"])
    layer = [in_flight * tokens * s["layers"] * s["hidden"], in_flight * tokens * s["layers"] * s["inter"]]
    if recompute:  # each layer keeps its input; one layer's full set while it is recomputed
        layer = [in_flight * tokens * s["layers"] * s["hidden"], tokens * s["inter"]]
    return [r["params"]] + layer + [s["last"] * tokens * s["hidden"], s["last"] * tokens * s["vocab_out"]]


def forward_features(r: dict) -> list[float]:
    s = _common(r)
    tokens = ROWS * (PROMPT + NEW) / r["n_mbs"]
    return [tokens * s["hidden"], tokens * s["inter"], s["last"] * tokens * s["vocab_out"],
            ROWS * (PROMPT + NEW)]


def kv_cache_bytes(r: dict) -> float:
    s = _common(r)
    head_dim = r["hidden"] // HEADS
    return 2 * s["layers"] * (KV_HEADS // r["tp"]) * head_dim * ROWS / r["n_mbs"] * (PROMPT + NEW) * (
        4 if r["precision"] == "fp32" else 2)


def generate_features(r: dict) -> list[float]:
    s = _common(r)
    prefill = ROWS / r["n_mbs"] * PROMPT
    return [prefill * s["hidden"], prefill * s["inter"], s["last"] * ROWS / r["n_mbs"] * s["vocab_out"],
            ROWS * (PROMPT + NEW)]


# fit -> (the `MemoryCoefficients` field of each feature, features, target bytes)
FITS = {
    "train": (["params", "layer_hidden", "layer_inter", "head_hidden", "head_vocab"],
              lambda r: train_features(r, False), lambda r: r["train"]),
    "train_recompute": (["recompute_params", "recompute_boundary", "recompute_layer", "recompute_head_hidden",
                         "recompute_head_vocab"], lambda r: train_features(r, True), lambda r: r["train_recompute"]),
    "inference": (["forward_hidden", "forward_inter", "forward_vocab", "forward_tokens"],
                  forward_features, lambda r: r["inference"]),
    "generate": (["prefill_hidden", "prefill_inter", "decode_vocab", "generate_tokens"],
                 generate_features, lambda r: r["generate"] - kv_cache_bytes(r)),
}


def fit(rows: list[dict]) -> dict:
    """Least-squares coefficients per (call kind, precision), relative errors weighted
    equally (each row divided by its measured peak), and the worst relative error."""
    result = {}
    for kind, (names, features, target) in FITS.items():
        for precision in ("fp32", "bf16"):
            sel = [r for r in rows if r["precision"] == precision and kind in r]
            x = np.array([features(r) for r in sel], float)
            y = np.array([target(r) for r in sel], float)
            measured = np.array([r[kind] for r in sel], float)
            coef = np.linalg.lstsq(x / measured[:, None], y / measured, rcond=None)[0]
            errors = np.abs((x @ coef - y) / measured)
            result[f"{kind}/{precision}"] = {
                "coefficients": dict(zip(names, (round(float(c), 2) for c in coef))),
                "worst_error": round(float(errors.max()), 3), "median_error": round(float(np.median(errors)), 3),
                "cases": len(sel)}
    return result


def main() -> None:
    per_rank = spawn(_measure, 2)
    rows = [r for part in per_rank for r in part]
    result = fit(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory_fit.json").write_text(json.dumps({"fits": result, "measurements": rows}, indent=1) + "\n")
    lines = ["# Memory coefficients fitted to the runtime's measured peaks", "",
             f"{len(rows)} measured (rank, case) pairs: shapes {SHAPES} (hidden, intermediate, vocab), "
             f"{LAYERS} layers, layouts (tp, pp) {LAYOUTS}, n_mbs 1 and 4, lm and value heads, "
             f"{ROWS} rows of {PROMPT}+{NEW} tokens; `LiveBytes` peaks on CPU (`bench/memory_fit.py`).", "",
             "| fit | coefficients (bytes per unit) | median error | worst error |", "|---|---|---|---|"]
    for key, f in result.items():
        coefs = ", ".join(f"{k} {v}" for k, v in f["coefficients"].items())
        lines.append(f"| {key} | {coefs} | {f['median_error']:.1%} | {f['worst_error']:.1%} |")
    (OUT / "memory_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
