"""vLLM against rlhfc's own loop on this machine: engine start-up once, weight sync, and
decode throughput (greedy, every row runs to the end; vLLM's without its sync) on one random-weight LLaMA of a
SmolLM2-135M-like width with head_dim 64, in one process. Run under the bench lock:

    flock /tmp/rlhfc-bench.lock python bench/vllm_bench.py --rounds 3

`--check`: vLLM's measured prefill + decode (`decode_s`, greedy, no EOS) against the
planner's estimate (`rlhfc.planner.cost.engine.decode_terms`) at a few batch sizes and
lengths on one engine: the `engine_*` coefficients are fitted, as `rlhfc calibrate` fits
them, to all but the last setting, which is held out; measured / estimated for each.
Writes bench/results/vllm_decode_check.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfc.hardware import CATALOG
from rlhfc.ir import Call, CallKind, Head, Mesh, Span, Strategy
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS, Coefficients
from rlhfc.planner.cost.engine import decode_terms, kv_pool_bytes
from rlhfc.planner.cost.fit import fit_coefficients
from rlhfc_runtime.checkpoint import init_random, tiny_config
from rlhfc_runtime.contract.family import shape_from_hf
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import run_here
from rlhfc_runtime.engines import close_engines, engine
from rlhfc_runtime.generate import SamplingParams, left_pad

CONFIG = tiny_config(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=256,
                     tie_word_embeddings=True)


def _bench(rounds: int, batch: int, new: int) -> dict:
    model = init_random(CONFIG, Layout((0,), 1, 1, 1), seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 49152, (16,), generator=gen).tolist() for _ in range(batch)]
    ids, mask = left_pad(prompts, 0)
    params = SamplingParams(max_new_tokens=new, greedy=True, eos_token_id=None)
    pool = kv_pool_bytes(shape_from_hf(CONFIG), batch, 16 + new, "fp32", page=128)  # what the planner gives the call
    settings = {"precision": "fp32", "n_mbs": 1, "gpu_memory_utilization": 0.5, "kv_cache_bytes": pool,
                "max_model_len": 16 + new, "engine_start_s": 15.0}
    out: dict = {"batch": batch, "new_tokens": new, "threads": torch.get_num_threads()}
    try:
        for name in ("rlhfc", "vllm"):
            eng = engine(name)
            eng.generate(model, ids, mask, params, settings)  # vLLM starts here; warm-up for both
            if name == "vllm":
                out["vllm_start_s"] = eng.stats["engine_start_s"]
            times, syncs = [], []
            for _ in range(rounds):
                start = time.perf_counter()
                eng.generate(model, ids, mask, params, settings)
                times.append(eng.stats.get("decode_s", time.perf_counter() - start))  # vLLM: decode only
                syncs.append(eng.stats.get("sync_s", 0.0))
            out[f"{name}_tokens_per_s"] = [round(batch * new / t, 1) for t in times]
            if name == "vllm":
                out["vllm_sync_and_check_s"] = [round(s, 3) for s in syncs]
    finally:
        close_engines()
    return out


PROMPT = 16
# (rows, new tokens): the fit's settings, then the held-out one
CHECK = ((1, 32), (8, 32), (32, 32), (16, 64))
ENGINE_FIELDS = ("engine_compute_efficiency", "engine_bandwidth_efficiency", "engine_step_overhead")


@dataclass(frozen=True)
class _Decode:
    """One setting's prefill and decode as the planner prices them (a fit's `priced`)."""

    rows: int
    new: int

    def seconds(self, c: Coefficients) -> float:
        call = Call("gen", "actor", CallKind.GENERATE, (), (), "", (), self.rows, PROMPT, self.new,
                    Span("<bench>", 0, 0, 0, 0), (("engine", "vllm"),))
        return sum(decode_terms(call, shape_from_hf(CONFIG), Head.LM, Strategy(Mesh(0, 1, 0, 1), 1, 1, 1),
                                CATALOG["cpu"], c, 4, self.new, lambda nbytes: 0.0).values())


@dataclass(frozen=True)
class _Measured:
    priced: _Decode
    measured: float


def _measure(rounds: int) -> tuple[list[_Measured], int]:
    """Median `decode_s` of `rounds` calls per setting, on one engine sized for the largest."""
    model = init_random(CONFIG, Layout((0,), 1, 1, 1), seed=0)
    longest = max(new for _, new in CHECK)
    rows = max(r for r, _ in CHECK)
    settings = {"precision": "fp32", "n_mbs": 1, "gpu_memory_utilization": 0.5, "max_model_len": PROMPT + longest,
                "kv_cache_bytes": kv_pool_bytes(shape_from_hf(CONFIG), rows, PROMPT + longest, "fp32", page=128),
                "engine_start_s": 15.0}
    gen = torch.Generator().manual_seed(0)
    out = []
    try:
        eng = engine("vllm")
        for i, (batch, new) in enumerate(CHECK):
            ids, mask = left_pad([torch.randint(3, 49152, (PROMPT,), generator=gen).tolist() for _ in range(batch)], 0)
            params = SamplingParams(max_new_tokens=new, greedy=True, eos_token_id=None)
            times = []
            for r in range(rounds + (i == 0)):  # the engine starts in the first call
                eng.generate(model, ids, mask, params, settings)
                times.append(eng.stats["decode_s"])
            out.append(_Measured(_Decode(batch, new), statistics.median(times[-rounds:])))
    finally:
        close_engines()
    return out, torch.get_num_threads()


def check(rounds: int) -> dict:
    measured, threads = run_here(_measure, rounds)
    fitted = fit_coefficients(measured[:-1], DEFAULT_COEFFICIENTS, ENGINE_FIELDS)
    return {"model": "SmolLM2-135M-shaped random LLaMA, fp32", "prompt": PROMPT, "threads": threads,
            "rounds": rounds, "fitted": {n: getattr(fitted, n) for n in ENGINE_FIELDS},
            "settings": [{"rows": m.priced.rows, "new_tokens": m.priced.new, "measured_s": m.measured,
                          "estimated_s": m.priced.seconds(fitted), "default_estimate_s": m.priced.seconds(DEFAULT_COEFFICIENTS),
                          "measured_over_estimated": m.measured / m.priced.seconds(fitted), "held_out": i == len(measured) - 1}
                         for i, m in enumerate(measured)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--check", action="store_true", help="vLLM's decode against the planner's estimate")
    args = parser.parse_args()
    if args.check:
        doc = check(args.rounds)
        out = Path(__file__).parent / "results" / "vllm_decode_check.json"
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(doc))
        return
    print(json.dumps(run_here(_bench, args.rounds, args.batch, args.new)))


if __name__ == "__main__":
    main()
