"""vLLM against rlhfc's own loop on this machine: engine start-up once, weight sync, and
decode throughput (greedy, every row runs to the end; vLLM's without its sync) on one random-weight LLaMA of a
SmolLM2-135M-like width with head_dim 64, in one process. Run under the bench lock:

    flock /tmp/rlhfc-bench.lock python bench/vllm_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rlhfc.planner.cost.engine import kv_pool_bytes
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(run_here(_bench, args.rounds, args.batch, args.new)))


if __name__ == "__main__":
    main()
