"""vLLM runs the families E033 lets through: for each, a checkpoint written by
`transformers` (tests/family_cases.py, head_dim 32 for vLLM's CPU kernels) is loaded by
rlhfc, synced into a fresh vLLM engine through the family's weight names (Phi-3's fused
qkv_proj / gate_up_proj arrive unfused and vLLM fuses them again), and the engine's raw
log-probs of the tokens it samples equal the trainer's within 1e-3 at fp32, with its
greedy rollouts equal to the own loop's. One engine start per family (15-60 s on two
cores), in one test. Skipped where vllm is not installed (`pip install "rlhfc[vllm]"`)."""

from __future__ import annotations

import pytest
from family_cases import write_family
from test_vllm_engine import _max_diff, _response_logprobs, _rows, _trainer_logprobs

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.engines import ENGINES, installed
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import run_here
from rlhfc_runtime.generate import SamplingParams, generate, left_pad

pytestmark = pytest.mark.skipif(not installed("vllm"), reason='vllm is not installed (pip install "rlhfc[vllm]")')

# Each family's distinguishing feature kept, at head_dim 32: Qwen3's per-head q/k norms,
# Phi-3's fused tensors and partial rotary, Gemma 2's sandwich norms and soft-caps (tied, as
# vLLM's Gemma 2 always is).
CASES = {"qwen3": dict(head_dim=32), "phi3": dict(num_attention_heads=2, num_key_value_heads=1),
         "gemma2": dict(head_dim=32, tie_word_embeddings=True)}
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8], [1, 40]]
SETTINGS = {"precision": "fp32", "n_mbs": 1, "gpu_memory_utilization": 0.5, "kv_cache_bytes": 4 << 20,
            "max_model_len": 16, "engine_start_s": 15.0}


def _family(path: str) -> dict:
    from rlhfc_runtime.engines import _BUILT, engine

    model = ck.load_checkpoint(path, Layout((0,), 1, 1, 1))
    ids, mask = left_pad(PROMPTS, 0)
    vllm = engine("vllm")
    try:
        greedy = SamplingParams(max_new_tokens=8, greedy=True, pad_token_id=0)
        own, out = generate(model, ids, mask, greedy), vllm.generate(model, ids, mask, greedy, SETTINGS)
        sampled = SamplingParams(max_new_tokens=8, greedy=False, temperature=0.8, seed=5, total_rows=len(PROMPTS))
        drawn = vllm.generate(model, ids, mask, sampled, SETTINGS)
        return {"greedy_equal": _rows(out) == _rows(own),
                "greedy_diff": _max_diff(_response_logprobs(out), _trainer_logprobs(model, out)),
                "sampled_diff": _max_diff(_response_logprobs(drawn), _trainer_logprobs(model, drawn))}
    finally:
        _BUILT.pop("vllm").close()


def test_each_allowed_family_syncs_and_matches_the_trainer(tmp_path):
    assert set(CASES) <= set(ENGINES["vllm"].families)
    for i, (name, overrides) in enumerate(CASES.items()):
        path = write_family(name, tmp_path / name, seed=i, **overrides)
        got = run_here(_family, str(path))
        assert got["greedy_equal"], name
        assert got["greedy_diff"] <= 1e-3 and got["sampled_diff"] <= 1e-3, (name, got)
