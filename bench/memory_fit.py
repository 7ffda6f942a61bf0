"""Fit the cost model's memory coefficients to what the runtime allocates.

Runs the runtime's own train step, forward pass and generation (`ShardedDecoder`,
`generate`, the calls' response-only head `calls.head_outputs`) on few-layer models at
real vocabularies (32k-256k) and head dims (64-256), with the families whose activations
differ (Qwen3's q/k norms, Gemma 2's soft-capping and head_dim), under layouts (tp, pp),
micro-batch counts, precisions and recompute, in one 2-process gloo world; measures each call's
peak with `rlhfc_runtime.memory.LiveBytes` (the figure `peak_bytes/CALL` logs on CPU);
fits by least squares the per-term bytes of `rlhfc.planner.cost.memory` (the feature
functions below mirror its formulas, named by its `MemoryCoefficients` fields) and
writes them with the fit's errors; `MEMORY_COEFFICIENTS` holds these values (a test
compares them with bench/results/memory_fit.json).

    flock /tmp/rlhfc-bench.lock .venv/bin/python bench/memory_fit.py     # ~10 min on 2 cores
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from rlhfc.ir import Head
from rlhfc.planner.cost.memory import attention_width, head_units
from rlhfc_runtime.calls import head_outputs
from rlhfc_runtime.contract.layout import Layout, stage_layers
from rlhfc_runtime.contract.shapes import ModelShape
from rlhfc_runtime.dist import ensure_groups, rank_groups, spawn
from rlhfc_runtime.generate import SamplingParams, generate
from rlhfc_runtime.memory import LiveBytes
from rlhfc_runtime.model import DTYPES, ModelConfig, ShardedDecoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "bench" / "results"
ROWS, PROMPT, NEW = 24, 16, 12
LAYERS, HEADS, KV_HEADS = 2, 4, 2
# (name, family, hidden, intermediate, vocab, head_dim): vocabularies of Llama 2 / Mistral
# (32000), SmolLM (49152), Llama 3 (128256), Qwen2/3 (151936), Gemma (256000)
SHAPES = [
    ("llama-32k-hd64", "llama", 64, 192, 32000, 64),
    ("smollm-49k-hd64", "llama", 576, 1536, 49152, 64),
    ("llama3-128k-hd128", "llama", 128, 256, 128256, 128),
    ("qwen3-152k-hd128-qknorm", "qwen3", 128, 384, 151936, 128),
    ("gemma2-256k-hd256-softcap", "gemma2", 64, 128, 256000, 256),
]
VALUE_SHAPES = ("llama-32k-hd64", "smollm-49k-hd64")
# The examples' tiny models (vocab 40 and 400), where per-token bytes dominate, measured
# by the previous version of this bench (sizes in each row) and fitted with the rest.
TINY = OUT / "memory_fit_tiny.json"
LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) on 1 or 2 ranks
CASES = [dict(tp=tp, pp=pp, n_mbs=m, precision=p, shape=name, family=fam, hidden=h, inter=i, vocab=v, head_dim=hd,
              head=head)
         for tp, pp in LAYOUTS for m in (1, 4) for p in ("fp32", "bf16") for name, fam, h, i, v, hd in SHAPES
         for head in ("lm", "value") if head == "lm" or name in VALUE_SHAPES]


def hf_config(c: dict) -> dict:
    """The case's config.json: the family's own keys (tests/family_cases.py), its sizes."""
    from family_cases import hf_config as family_config

    name = {"llama": "llama", "qwen3": "qwen3", "gemma2": "gemma2"}[c["family"]]
    cfg = family_config(name, vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                        head_dim=c["head_dim"], max_position_embeddings=256)
    return cfg.to_dict()


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
    response = torch.zeros_like(ids)
    response[:, PROMPT:] = 1  # the generated tokens, where the calls' LM head runs
    return ids, mask, response


def _loss(model):
    """A loss through the calls' head (log-probs at the response, values everywhere)."""
    def loss(h, mb):
        out = head_outputs(model, h, mb)
        return (out["logp"].sum() if "logp" in out else (out["values"].float() ** 2).sum()) / ROWS
    return loss


def _measure() -> list[dict]:
    rank = torch.distributed.get_rank()
    layouts = {(tp, pp): Layout(tuple(range(tp * pp)), 1, tp, pp) for tp, pp in LAYOUTS}
    ensure_groups(list(layouts.values()))
    out = []
    only = set(sys.argv[sys.argv.index("--shapes") + 1:]) if "--shapes" in sys.argv else None
    for c in CASES:
        if only and c["shape"] not in only:
            continue
        lay = layouts[(c["tp"], c["pp"])]
        if rank not in lay.ranks:
            continue
        torch.manual_seed(0)
        cfg = ModelConfig.from_hf(hf_config(c))
        model = ShardedDecoder(cfg, rank_groups(lay, rank), c["head"])
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        opt = torch.optim.Adam(model.parameters())
        ids, mask, response = _batch(c["vocab"], PROMPT + NEW)
        row = dict(c, rank=rank, stage=lay.coord(rank)[0], params=sum(p.numel() for p in model.parameters()),
                   layers=LAYERS, rows=ROWS, prompt=PROMPT, new=NEW, response=NEW)

        def step(recompute: bool):
            model.train_step(ids, mask, _loss(model), opt, c["n_mbs"], {"response_mask": response},
                             precision=c["precision"], recompute=recompute)
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
                key = "logp" if c["head"] == "lm" else "values"
                model.run_pipeline(ids, mask, lambda h, mb: head_outputs(model, h, mb)[key].float(), c["n_mbs"],
                                   {"response_mask": response})

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
    layers = len(stage_layers(r["layers"], r["pp"], r["stage"]))
    last = float(r["stage"] == r["pp"] - 1)
    shape = ModelShape(n_layers=r["layers"], hidden=r["hidden"], n_heads=HEADS, n_kv_heads=KV_HEADS,
                       intermediate=r["inter"], vocab=r["vocab"], head_dim=r["head_dim"])
    tokens = r["rows"] * (r["prompt"] + r["new"]) / r["n_mbs"]
    kept, tile = head_units(shape, Head(r["head"]), r["tp"], int(tokens), int(r["rows"] * r["response"] / r["n_mbs"]))
    return dict(layers=layers, last=last, kept=kept, tile=tile, inter=r["inter"] / r["tp"], hidden=r["hidden"],
                tokens=tokens, attn=attention_width(shape, r["tp"]), replica=r["rows"] * (r["prompt"] + r["new"]))


def train_features(r: dict, recompute: bool) -> list[float]:
    s = _common(r)
    tokens = s["tokens"]
    in_flight = min(r["pp"] - r["stage"], r["n_mbs"])
    per_layer = in_flight * tokens * s["layers"]
    layer = [per_layer * s["hidden"], per_layer * s["inter"], per_layer * s["attn"], per_layer]
    if recompute:  # each layer keeps its input; one layer's full set while it is recomputed
        layer = [per_layer * s["hidden"], tokens * (s["inter"] + s["attn"])]
    return [r["params"]] + layer + [s["last"] * s["kept"] * s["hidden"], s["last"] * s["tile"]]


def forward_features(r: dict) -> list[float]:
    s = _common(r)
    tokens = s["tokens"]
    return [tokens * s["hidden"], tokens * s["inter"], tokens * s["attn"], s["last"] * s["tile"], s["replica"]]


def kv_cache_bytes(r: dict) -> float:
    s = _common(r)
    return 2 * s["layers"] * (KV_HEADS // r["tp"]) * r["head_dim"] * s["replica"] / r["n_mbs"] * (
        4 if r["precision"] == "fp32" else 2)


def generate_features(r: dict) -> list[float]:
    s = _common(r)
    prefill = r["rows"] / r["n_mbs"] * r["prompt"]
    return [prefill * s["hidden"], prefill * s["inter"], prefill * s["attn"],
            s["last"] * r["rows"] / r["n_mbs"] * r["vocab"] / r["tp"], s["replica"]]


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares (Lawson and Hanson 1974): bytes per unit are never
    negative, so the fit extrapolates to other shapes without cancelling terms."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, bool)
    for _ in range(10 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or (w[~passive] <= 1e-12 * np.abs(w).max()).all():
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            x = x + np.min(x[neg] / (x[neg] - z[neg])) * (z - x)
            passive &= x > 1e-12
    return x


# fit -> (the `MemoryCoefficients` field of each feature, features, target bytes)
FITS = {
    "train": (["params", "layer_hidden", "layer_inter", "layer_attn", "layer_tokens", "head_hidden", "head_vocab"],
              lambda r: train_features(r, False), lambda r: r["train"]),
    "train_recompute": (["recompute_params", "recompute_boundary", "recompute_layer", "recompute_head_hidden",
                         "recompute_head_vocab"], lambda r: train_features(r, True), lambda r: r["train_recompute"]),
    "inference": (["forward_hidden", "forward_inter", "forward_attn", "forward_vocab", "forward_tokens"],
                  forward_features, lambda r: r["inference"]),
    "generate": (["prefill_hidden", "prefill_inter", "prefill_attn", "decode_vocab", "generate_tokens"],
                 generate_features, lambda r: r["generate"] - kv_cache_bytes(r)),
}


# Coefficients set, not fitted: what the fit's small models cannot tell apart from the
# parameters' bytes, fixed at their physical value (a recomputed layer keeps its input,
# one fp32 residual-stream vector per token).
FIXED = {"recompute_boundary": 4.0}


def _two_phase(x: np.ndarray, y: np.ndarray, known: np.ndarray, optimizer: float | None
               ) -> tuple[np.ndarray, float, np.ndarray]:
    """A train step's peak is the larger of two phases: the backward pass (features `x`
    plus the `known` bytes of fixed terms: gradients, activations, head) and the optimizer
    step (bytes per parameter, column 0). Alternates: each row goes to the phase that
    predicts more, each phase is refitted on its rows (`optimizer` fixed where given).
    Returns (backward coefficients, optimizer bytes per parameter, predictions)."""
    params = x[:, 0]
    backward = nnls(x / y[:, None], 1 - known / y)
    opt = optimizer if optimizer is not None else float(np.median(y / params))
    for _ in range(20):
        first = x @ backward + known >= params * opt
        if first.sum() > x.shape[1]:
            backward = nnls(x[first] / y[first, None], 1 - known[first] / y[first])
        if optimizer is None and (~first).any():
            opt = float(np.median(y[~first] / params[~first]))
    return backward, opt, np.maximum(x @ backward + known, params * opt)


def fit(rows: list[dict]) -> dict:
    """Non-negative least-squares coefficients per (call kind, precision), relative errors
    weighted equally (each row divided by its measured peak), and the worst relative
    error; train peaks as the larger of two phases (`_two_phase`)."""
    result = {}
    for kind, (names, features, target) in FITS.items():
        for precision in ("fp32", "bf16"):
            sel = [r for r in rows if r["precision"] == precision and kind in r]
            x = np.array([features(r) for r in sel], float)
            y = np.array([target(r) for r in sel], float)
            measured = np.array([r[kind] for r in sel], float)
            extra = {}
            fixed_cols = [i for i, n in enumerate(names) if n in FIXED]
            known = sum((x[:, i] * FIXED[names[i]] for i in fixed_cols), np.zeros(len(y)))
            free = [i for i in range(len(names)) if i not in fixed_cols]
            x = x[:, free]
            if kind.startswith("train"):
                fixed = None if kind == "train" else result[f"train/{precision}"]["coefficients"]["optimizer_params"]
                coef, opt, predicted = _two_phase(x, y, known, fixed)
                extra = {"optimizer_params": round(opt, 2)} if kind == "train" else {}
            else:
                coef = nnls(x / measured[:, None], (y - known) / measured)
                predicted = x @ coef + known
            errors = np.abs((predicted - y) / measured)
            full = dict(zip([names[i] for i in free], (round(float(c), 2) for c in coef)))
            full.update({names[i]: FIXED[names[i]] for i in fixed_cols})
            result[f"{kind}/{precision}"] = {
                "coefficients": {**{n: full[n] for n in names}, **extra},
                "worst_error": round(float(errors.max()), 3), "median_error": round(float(np.median(errors)), 3),
                "cases": len(sel)}
    return result


def main() -> None:
    """Measure and fit; `--fit-only` fits the measurements memory_fit.json already holds,
    `--shapes NAME…` measures those shapes again and keeps the others' measurements."""
    OUT.mkdir(parents=True, exist_ok=True)
    if "--fit-only" in sys.argv:
        rows = json.loads((OUT / "memory_fit.json").read_text())["measurements"]
    elif "--shapes" in sys.argv:
        only = set(sys.argv[sys.argv.index("--shapes") + 1:])
        kept = [r for r in json.loads((OUT / "memory_fit.json").read_text())["measurements"] if r["shape"] not in only]
        rows = kept + [r for part in spawn(_measure, 2) for r in part]
        (OUT / "memory_fit.json").write_text(json.dumps({"fits": {}, "measurements": rows}, indent=1) + "\n")
    else:
        rows = [r for part in spawn(_measure, 2) for r in part]
        (OUT / "memory_fit.json").write_text(json.dumps({"fits": {}, "measurements": rows}, indent=1) + "\n")
    result = fit(rows + json.loads(TINY.read_text())["measurements"])
    (OUT / "memory_fit.json").write_text(json.dumps({"fits": result, "measurements": rows}, indent=1) + "\n")
    lines = ["# Memory coefficients fitted to the runtime's measured peaks", "",
             f"{len(rows)} measured (rank, case) pairs, and the examples' tiny models from `{TINY.name}`: shapes {SHAPES} (name, family, hidden, intermediate, "
             f"vocab, head_dim), {LAYERS} layers, layouts (tp, pp) {LAYOUTS}, n_mbs 1 and 4, lm heads (value heads on "
             f"{', '.join(VALUE_SHAPES)}), {ROWS} rows of {PROMPT}+{NEW} tokens (the LM head at the {NEW} "
             f"response positions); `LiveBytes` peaks on CPU (`bench/memory_fit.py`).", "",
             "| fit | coefficients (bytes per unit) | median error | worst error |", "|---|---|---|---|"]
    for key, f in result.items():
        coefs = ", ".join(f"{k} {v}" for k, v in f["coefficients"].items())
        lines.append(f"| {key} | {coefs} | {f['median_error']:.1%} | {f['worst_error']:.1%} |")
    (OUT / "memory_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
