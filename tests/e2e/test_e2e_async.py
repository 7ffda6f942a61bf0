"""Asynchronous RL at run time (`max_staleness` = 1): the engine's body of step t samples
step t+1's rollouts while step t trains, every batch carries the policy version that
sampled it, a resume with rollouts in flight continues exactly, and a weight sync that
did not happen stops the run with a clear error.

The plan is the tiny GRPO job with generation and training on disjoint devices, and
generation one iteration ahead: the runtime is tested on the plan it is given, whatever
the planner would choose."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rlhfc.backend.emit import emit
from rlhfc.backend.lower import lower
from rlhfc.frontend.check import load_program
from rlhfc.planner.solve import plan_dataflow
from rlhfc_runtime import ckpt_store
from rlhfc_runtime.contract.ops import Call, Drop, Load, Move, Realloc
from test_e2e_run import metrics, run, untimed

ROOT = Path(__file__).resolve().parents[2]
SOURCE = f'''import grpo from "{ROOT}/stdlib/grpo.rlhf"
cluster {{ nodes = 1  devices_per_node = 2  device = "cpu" }}
model actor  = llama(preset = "tiny") {{ trainable  optimizer = adam(lr = 2e-3) }}
model ref    = llama(preset = "tiny")
model reward = rule("pattern_reward")
dataset prompts = jsonl("{ROOT}/data/tiny/prompts.jsonl", field = "prompt", max_len = 16,
                        tokenizer = "{ROOT}/data/tiny/tokenizer.json")
run grpo(actor, ref, reward, prompts) {{
    batch = 8  group_size = 4  max_new_tokens = 12  steps = 8  kl_coef = 0.04  seed = 1  max_staleness = 1
}}
place gen  on node0[0:1]  dp = 1  tp = 1  pp = 1
place refl on node0[1:2]  dp = 1  tp = 1  pp = 1
place a_tr on node0[1:2]  dp = 1  tp = 1  pp = 1
'''


@pytest.fixture(scope="module")
def async_program(tmp_path_factory):
    """(dataflow, plan with gen one iteration ahead, directory)."""
    tmp = tmp_path_factory.mktemp("async")
    (tmp / "grpo.rlhf").write_text(SOURCE)
    df = load_program(str(tmp / "grpo.rlhf"), need_run=True)
    plan = plan_dataflow(df, time_limit=5)
    plan = replace(plan, max_staleness=1,
                   calls=tuple(replace(p, ahead=1 if p.call == "gen" else 0) for p in plan.calls))
    return df, plan, tmp


def script_of(prog, path: Path) -> Path:
    path.write_text(emit(prog, str(path)))
    return path


@pytest.fixture(scope="module")
def whole(async_program):
    """8 uninterrupted steps, a checkpoint every 3: (script, run dir)."""
    df, plan, tmp = async_program
    script = script_of(lower(df, plan), tmp / "k1.py")
    done = run(script, tmp / "whole", "--save-every", "3")
    assert done.returncode == 0, done.stderr
    return script, tmp / "whole"


def test_generation_runs_one_iteration_ahead_in_the_body(async_program):
    df, plan, _ = async_program
    ops = lower(df, plan).ops
    gen = next(op for op in ops if isinstance(op, Call) and op.name == "gen")
    a_tr = next(op for op in ops if isinstance(op, Call) and op.name == "a_tr")
    sync_to_gen = next(op for op in ops if isinstance(op, Realloc) and op.dst == gen.layout)
    assert (gen.ahead, a_tr.ahead, sync_to_gen.ahead) == (1, 0, 1)
    assert next(op for op in ops if isinstance(op, Load)).ahead == 1  # prompts are drawn for the rollouts
    # the step's own rollouts reach the trainer before the next ones are sampled: no rank waits on the other
    moves = [i for i, op in enumerate(ops) if isinstance(op, Move) and op.src == gen.layout]
    assert moves and max(moves) < ops.index(gen)
    assert ops.index(sync_to_gen) < ops.index(a_tr)  # samples with the weights of the step before


def test_lowering_refuses_a_consumer_ahead_of_its_producer(async_program):
    df, plan, _ = async_program
    wrong = replace(plan, calls=tuple(replace(p, ahead=1 if p.call == "refl" else 0) for p in plan.calls))
    with pytest.raises(ValueError, match="'refl' 1 iteration\\(s\\) ahead but its input 'seq' 0 ahead"):
        lower(df, wrong)


def test_every_batch_is_one_update_old_and_says_which_policy_sampled_it(whole):
    _, out = whole
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["staleness"] for r in records] == [0.0] + [1.0] * 7  # step 1's rollouts: the initial policy
    samples = [s for s in (json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines())]
    assert samples and {s["policy_version"] for s in samples if s["step"] == 5} == {3}
    assert all(s["policy_version"] == max(s["step"] - 2, 0) for s in samples)


def test_resume_with_rollouts_in_flight_is_exact(async_program, whole):
    """Killed after step 4: the checkpoint of step 3 holds step 4's rollouts, sampled by
    policy 2; the resumed run trains on exactly those and ends with the same weights."""
    df, plan, tmp = async_program
    script, straight = whole
    cut = tmp / "cut"
    died = run(script, cut, "--save-every", "3", env={"RLHFC_FAIL_AT_STEP": "4"})
    assert died.returncode != 0
    state = (cut / "checkpoint" / "step-000003" / "rank1.json").read_text()
    assert '"inflight"' in state and '"seq"' in state  # step 4's sequences wait on the trainer's rank
    resumed = run(script, cut, "--save-every", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = ckpt_store.read_weights(straight / "checkpoint" / "step-000008", "actor")
    b = ckpt_store.read_weights(cut / "checkpoint" / "step-000008", "actor")
    assert all((a[k] == b[k]).all() for k in a)
    assert untimed(metrics(cut))[3:] == untimed(metrics(straight))[3:]


def test_a_weight_sync_that_did_not_happen_stops_the_run(async_program):
    """The program loses the reallocation that feeds the generation copy (and the drop
    that frees it): the engine refuses to sample before any step has run."""
    df, plan, tmp = async_program
    prog = lower(df, plan)
    gen_layout = next(op.layout for op in prog.ops if isinstance(op, Call) and op.name == "gen")
    kept = tuple(op for op in prog.ops if not (isinstance(op, Realloc) and op.dst == gen_layout
                                              or isinstance(op, Drop) and op.layout == gen_layout))
    done = run(script_of(replace(prog, ops=kept), tmp / "unsynced.py"), tmp / "unsynced", "--steps", "2")
    assert done.returncode == 1
    assert "call 'gen' of step 1 would read 'actor' in L1 with no copy" in done.stderr
    assert "a weight sync (reallocation) the program needs did not happen" in done.stderr


def test_rollouts_older_than_max_staleness_stop_the_run(async_program):
    """A schedule that samples two iterations ahead reads weights two updates old, which
    max_staleness = 1 forbids: the run stops at the first such rollout, before training on it."""
    df, plan, tmp = async_program
    prog = lower(df, plan)
    two = tuple(replace(op, ahead=2) if op.ahead == 1 else op for op in prog.ops)
    done = run(script_of(replace(prog, ops=two), tmp / "two_ahead.py"), tmp / "two_ahead", "--steps", "4")
    assert done.returncode == 1
    assert "call 'gen' of step 3 would read 'actor' in L1 with weights 2 update(s) old (version 0)" in done.stderr
    assert not (tmp / "two_ahead" / "checkpoint").exists() or not list((tmp / "two_ahead" / "checkpoint").glob("step-*"))
