"""GRPO on the tiny task with vLLM as the generate engine: a head_dim-32 actor on 2
processes, generating on another layout than it trains on (reallocated every step and
synced into vLLM before every generate call). Generating dp=2 runs two engines, one per
replica, whose raw log-probs match the trainer's at fp32 every step, whether the trainer
recomputes the rollout's log-probs or the engine's are kept and TIS-corrected; generating
on two pipeline stages feeds one engine, and a sync that is skipped stops the run with a
clear error. Three runs.
Skipped where vllm is not installed (`pip install "rlhfc[vllm]"`)."""

from __future__ import annotations

import json

import pytest
from codegen_fixtures import plan, strategy
from test_e2e_run import generated, metrics, run

from rlhfc_runtime.contract.engines import installed

pytestmark = pytest.mark.skipif(not installed("vllm"), reason='vllm is not installed (pip install "rlhfc[vllm]")')

HD32 = 'hf(layers = 2, hidden = 64, heads = 2, kv_heads = 2, intermediate = 128, vocab = 64, max_positions = 128)'


def vllm_grpo(text: str) -> str:
    return (text.replace('llama(preset = "tiny")', HD32).replace("seed = 1", 'seed = 1  engine = "vllm"'))


def engine_tis_grpo(text: str) -> str:
    return vllm_grpo(text).replace('engine = "vllm"', 'engine = "vllm"  rollout_logp = "engine"  off_policy = "tis"')


def replicated_generation(df):
    """The actor trains pp=2 and generates dp=2: two engines, one per replica, each fed
    the whole model and sampling its own rows."""
    stages = strategy(0, 2, 1, 1, 2)
    return plan(df, {c.name: strategy(0, 2, dp=2) if c.name == "gen" else stages for c in df.calls})


def replicated_run(tmp_path, edit, steps: int) -> list[dict]:
    """GRPO on two vLLM replicas (`replicated_generation`), `steps` steps: its metrics."""
    script = generated(tmp_path, "grpo", plan=replicated_generation, edit=edit)
    done = run(script, tmp_path / "run", "--steps", str(steps), "--save-every", "1000")
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(tmp_path / "run")
    assert len(records) == steps
    return records


@pytest.fixture(scope="module")
def trainer_logprobs_run(tmp_path_factory):
    """The default `rollout_logp = "trainer"`: the generate call recomputes the ratio's old
    log-probs with the trainer's forward. (metrics, run dir)."""
    tmp_path = tmp_path_factory.mktemp("trainer_logp")
    return replicated_run(tmp_path, vllm_grpo, 4), tmp_path / "run"


def test_grpo_on_two_vllm_replicas_logs_a_logprob_diff_under_1e_3_every_step(trainer_logprobs_run):
    records, _ = trainer_logprobs_run
    assert all(r["gen/logprob_diff"] <= 1e-3 for r in records), [r["gen/logprob_diff"] for r in records]
    assert all(r["gen/sync_s"] >= 0 for r in records)
    assert records[0]["gen/engine_start_estimate_s"] > 0  # the plan's start-up, beside the measured one
    assert "a_tr/is_weight" not in records[0]  # no correction: the ratio's old log-probs are the rollout's


def test_engine_logprobs_with_tis_sample_the_same_rollouts_and_train_alike(tmp_path, trainer_logprobs_run):
    """`rollout_logp = "engine"` with `off_policy = "tis"`: the generate call keeps vLLM's
    raw log-probs (the behaviour policy), the train call's forward gives the ratio's old
    ones and logs `gen/logprob_diff` against them. Same seed: step 0 samples the same
    rollouts as the trainer mode, and with engine and trainer agreeing at fp32 the TIS
    weights are 1 to within 1e-3, so the losses agree too."""
    records = replicated_run(tmp_path, engine_tis_grpo, 3)
    trainer, trainer_dir = trainer_logprobs_run
    assert all(r["gen/logprob_diff"] <= 1e-3 for r in records), [r["gen/logprob_diff"] for r in records]
    assert all(abs(r["a_tr/is_weight"] - 1) <= 1e-3 and r["a_tr/is_capped_frac"] == 0 for r in records)
    first, theirs = records[0], trainer[0]
    assert (first["reward"], first["gen/response_len"]) == (theirs["reward"], theirs["gen/response_len"])
    shown = [samples(tmp_path / "run", 1), samples(trainer_dir, 1)]
    assert shown[0] and [without_logprobs(r) for r in shown[0]] == [without_logprobs(r) for r in shown[1]]
    for mine, their in zip(*shown):  # the engine's log-probs against the trainer's, token by token
        assert mine["logprobs"] == pytest.approx(their["logprobs"], abs=1e-3)
    for mine, their in zip(records, trainer):
        assert mine["a_tr/loss"] == pytest.approx(their["a_tr/loss"], rel=1e-4, abs=1e-6)


def samples(out, step: int) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] == step]


def without_logprobs(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "logprobs"}


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

