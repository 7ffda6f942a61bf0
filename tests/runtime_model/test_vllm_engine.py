"""vLLM as the generate engine, against rlhfc's own loop on one head_dim-32 model: greedy
rollouts equal token for token (EOS and lengths per row), raw log-probs equal the
trainer's, sampling reproducible per row seed, every weight change synced, and a
skipped sync stopping with `WeightSyncError`. One engine start (about a minute on two
cores) serves every check. Skipped where vllm is not installed (`pip install
"rlhfc[vllm]"`)."""

from __future__ import annotations

import os

import pytest
import torch

from rlhfc_runtime.checkpoint import init_random, tiny_config
from rlhfc_runtime.contract.engines import installed
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import run_here
from rlhfc_runtime.generate import SamplingParams, generate, left_pad

pytestmark = pytest.mark.skipif(not installed("vllm"), reason='vllm is not installed (pip install "rlhfc[vllm]")')

HD32 = tiny_config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128,
                   vocab_size=64, max_position_embeddings=128)
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 7, 8], [1, 12, 13], [1, 40], [1, 7, 7, 7, 7]]
# A call's settings as the compiler writes them, the plan's engine decisions included
# (`planner.cost.engine.engine_decisions`): 6 rows of up to 17 tokens, a 128-token page
# each and vLLM's own, at 2 layers x (k, v) x 64 fp32 values per token.
SETTINGS = {"precision": "fp32", "n_mbs": 1, "gpu_memory_utilization": 0.123,
            "kv_cache_bytes": 7 * 128 * 2 * 2 * 64 * 4, "max_model_len": 17, "engine_start_s": 15.0}


def _rows(gen) -> list[list[int]]:
    """Each row's response tokens (EOS included)."""
    new = gen.sequences[:, gen.prompt_len:]
    mask = gen.response_mask[:, gen.prompt_len:].bool()
    return [r[m].tolist() for r, m in zip(new, mask)]


def _response_logprobs(gen) -> list[list[float]]:
    mask = gen.response_mask[:, gen.prompt_len:].bool()
    return [r[m].tolist() for r, m in zip(gen.logprobs, mask)]


def _trainer_logprobs(model, gen) -> list[list[float]]:
    """The sampled tokens' log-probs as the trainer's forward pass computes them."""
    lp = model.token_logprobs(gen.sequences, gen.attention_mask)[:, gen.prompt_len - 1:]
    mask = gen.response_mask[:, gen.prompt_len:].bool()
    return [r[m].tolist() for r, m in zip(lp, mask)]


def _max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _checks():
    from rlhfc_runtime.engines import _BUILT, engine
    from rlhfc_runtime.engines.vllm_engine import SKIP_SYNC_ENV, WeightSyncError

    model = init_random(HD32, Layout((0,), 1, 1, 1), seed=3)
    ids, mask = left_pad(PROMPTS, 0)
    probe = generate(model, ids, mask, SamplingParams(max_new_tokens=10))
    eos = _rows(probe)[0][3]  # a token row 0 emits: some rows stop early, others run to the end
    greedy = SamplingParams(max_new_tokens=10, greedy=True, eos_token_id=eos, pad_token_id=0)
    vllm = engine("vllm")
    try:
        own, out = generate(model, ids, mask, greedy), vllm.generate(model, ids, mask, greedy, SETTINGS)
        assert _rows(out) == _rows(own)
        cache = vllm.llm.llm_engine.vllm_config.cache_config  # the plan's decisions reached vLLM
        assert (cache.gpu_memory_utilization, cache.kv_cache_memory_bytes) == (0.123, SETTINGS["kv_cache_bytes"])
        assert len({len(r) for r in _rows(out)}) > 1 and all(r[-1] == eos or len(r) == 10 for r in _rows(out))
        assert _max_diff(_response_logprobs(out), _response_logprobs(own)) < 1e-4

        sampled = SamplingParams(max_new_tokens=10, greedy=False, temperature=0.7, top_p=0.9, seed=11,
                                 total_rows=len(PROMPTS), eos_token_id=eos)
        first, again = (vllm.generate(model, ids, mask, sampled, SETTINGS) for _ in range(2))
        assert _rows(first) == _rows(again)  # one seed per row: the same draw
        raw = _response_logprobs(first)  # raw: before temperature and top-p, what the trainer recomputes
        assert _max_diff(raw, _trainer_logprobs(model, first)) <= 1e-3

        with torch.no_grad():  # a training step's worth of change: the next call must see it
            for p in model.parameters():
                p.mul_(1.5)
        own2, out2 = generate(model, ids, mask, greedy), vllm.generate(model, ids, mask, greedy, SETTINGS)
        assert _rows(out2) == _rows(own2) != _rows(own)

        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        os.environ[SKIP_SYNC_ENV] = str(vllm.version + 1)
        with pytest.raises(WeightSyncError, match="stale policy"):
            vllm.generate(model, ids, mask, greedy, SETTINGS)
        return vllm.stats
    finally:
        os.environ.pop(SKIP_SYNC_ENV, None)
        _BUILT.pop("vllm").close()


def test_vllm_rollouts_equal_the_own_loop_and_a_skipped_sync_stops():
    stats = run_here(_checks)
    assert stats["sync_s"] >= 0
