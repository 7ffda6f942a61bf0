"""GRPO on the tiny task with vLLM as the generate engine: a head_dim-32 actor on 2
processes, generating on another layout than it trains on (reallocated every step and
synced into vLLM before every generate call). Generating dp=2 runs two engines, one per
replica, whose raw log-probs match the trainer's at fp32 every step; generating on two
pipeline stages feeds one engine, and a sync that is skipped stops the run with a clear
error. Two runs.
Skipped where vllm is not installed (`pip install "rlhfc[vllm]"`)."""

from __future__ import annotations

import pytest
from codegen_fixtures import plan, strategy
from test_e2e_run import generated, metrics, run

from rlhfc_runtime.contract.engines import installed

pytestmark = pytest.mark.skipif(not installed("vllm"), reason='vllm is not installed (pip install "rlhfc[vllm]")')

HD32 = 'hf(layers = 2, hidden = 64, heads = 2, kv_heads = 2, intermediate = 128, vocab = 64, max_positions = 128)'


def vllm_grpo(text: str) -> str:
    return (text.replace('llama(preset = "tiny")', HD32).replace("seed = 1", 'seed = 1  engine = "vllm"'))


def replicated_generation(df):
    """The actor trains pp=2 and generates dp=2: two engines, one per replica, each fed
    the whole model and sampling its own rows."""
    stages = strategy(0, 2, 1, 1, 2)
    return plan(df, {c.name: strategy(0, 2, dp=2) if c.name == "gen" else stages for c in df.calls})


def test_grpo_on_two_vllm_replicas_logs_a_logprob_diff_under_1e_3_every_step(tmp_path):
    script = generated(tmp_path, "grpo", plan=replicated_generation, edit=vllm_grpo)
    done = run(script, tmp_path / "run", "--steps", "4", "--save-every", "1000")
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(tmp_path / "run")
    assert len(records) == 4
    assert all(r["gen/logprob_diff"] <= 1e-3 for r in records), [r["gen/logprob_diff"] for r in records]
    assert all(r["gen/sync_s"] >= 0 for r in records)
    assert records[0]["gen/engine_start_estimate_s"] > 0  # the plan's start-up, beside the measured one


def pipelined_generation(df):
    """The actor trains dp=2 and generates pp=2 on both devices: the engine's weights
    are gathered from both stages onto rank 0 before every call."""
    both = strategy(0, 2, dp=2)
    return plan(df, {c.name: strategy(0, 2, 1, 1, 2) if c.name == "gen" else both for c in df.calls})


def test_generation_on_two_pipeline_stages_feeds_one_engine_and_a_skipped_sync_stops(tmp_path):
    script = generated(tmp_path, "grpo", plan=pipelined_generation, edit=vllm_grpo)
    done = run(script, tmp_path / "run", "--steps", "3", "--save-every", "1000", env={"RLHFC_TEST_SKIP_SYNC": "2"})
    assert done.returncode != 0
    assert "weight sync check failed before generate call 2" in done.stderr
    assert "stale policy" in done.stderr
    [first] = metrics(tmp_path / "run")
    assert first["gen/logprob_diff"] <= 1e-3

