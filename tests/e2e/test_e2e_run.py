"""End to end on real gloo processes: generated programs under plans that reallocate
parameters and move data, learning on the tiny task, and kill-and-resume exactness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from codegen_fixtures import plan, split_plan, strategy

from rlhfc.frontend.check import load_program
from rlhfc.backend.emit import emit
from rlhfc.backend.lower import lower
from rlhfc_runtime.contract.ops import Realloc

ROOT = Path(__file__).resolve().parents[2]


def generated(tmp_path: Path, program: str, plan=split_plan, edit=lambda text: text) -> Path:
    """programs/PROGRAM (its text passed through `edit`) compiled under `plan`, written
    into tmp_path."""
    source = (ROOT / "programs" / f"{program}.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')
    (tmp_path / f"{program}.rlhf").write_text(edit(source))
    df = load_program(tmp_path / f"{program}.rlhf")
    prog = lower(df, plan(df))
    assert any(isinstance(op, Realloc) and op.model == "actor" for op in prog.ops)
    out = tmp_path / f"{program}.py"
    out.write_text(emit(prog, str(out)))
    return out


def run(script: Path, out: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=240, env={**os.environ, **(env or {})})


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "peak_bytes/"))} for r in records]


@pytest.fixture(scope="module")
def ppo_whole(tmp_path_factory):
    """The tiny PPO job under the split plan, 4 uninterrupted steps: (script, run dir)."""
    tmp_path = tmp_path_factory.mktemp("ppo")
    script = generated(tmp_path, "ppo")
    whole = run(script, tmp_path / "whole", "--steps", "4", "--save-every", "2")
    assert whole.returncode == 0, whole.stderr
    return script, tmp_path / "whole"


def mixed_plan(df):
    """Generation tp=2, reference and critic training pp=2, actor training dp=2."""
    tp2, pp2, dp2 = strategy(0, 2, dp=1, tp=2), strategy(0, 2, dp=1, pp=2), strategy(0, 2, dp=2)
    return plan(df, {"gen": tp2, "score": tp2, "refl": pp2, "vals": dp2, "a_tr": dp2, "c_tr": pp2})


def test_plan_changes_speed_not_results(tmp_path, ppo_whole):
    """tp, pp and dp layouts with reallocation between them learn what the split plan
    learns (same seeds, same samples; only float reduction order differs)."""
    script = generated(tmp_path, "ppo", plan=mixed_plan)
    done = run(script, tmp_path / "mixed", "--steps", "2", "--save-every", "10")
    assert done.returncode == 0, done.stderr
    for a, b in zip(untimed(metrics(ppo_whole[1]))[:2], untimed(metrics(tmp_path / "mixed")), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("estimate/"):
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-6), k


def four_device_plan(df):
    """Four processes: generation dp2 x tp2, reference pp=2 on two devices beside the
    critic's tp=2 inference on the other two, both trainings dp=4."""
    gen, dp4 = strategy(0, 4, dp=2, tp=2), strategy(0, 4, dp=4)
    return plan(df, {"gen": gen, "score": gen, "refl": strategy(0, 2, dp=1, pp=2),
                     "vals": strategy(2, 2, dp=1, tp=2), "a_tr": dp4, "c_tr": dp4})


@pytest.mark.parametrize("program", ["ppo", "grpo"])
def test_four_processes_learn_what_two_learn(tmp_path, program):
    """On 4 gloo processes, with the actor reallocated between dp=4 training and dp2 x tp2
    generation, the first steps' metrics equal those of the 2-process split plan."""
    runs = {}
    for name, plan_of, devices in (("two", split_plan, 2), ("four", four_device_plan, 4)):
        (tmp_path / name).mkdir()
        script = generated(tmp_path / name, program, plan=plan_of,
                           edit=lambda text, d=devices: text.replace("devices_per_node = 2", f"devices_per_node = {d}"))
        done = run(script, tmp_path / name / "out", "--steps", "2", "--save-every", "10")
        assert done.returncode == 0, done.stderr
        runs[name] = untimed(metrics(tmp_path / name / "out"))
    for a, b in zip(runs["two"], runs["four"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("estimate/"):
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-6), k


def test_ppo_with_reallocation_resumes_exactly_after_a_worker_dies(tmp_path, ppo_whole):
    script, whole = ppo_whole
    died = run(script, tmp_path / "cut", "--steps", "4", "--save-every", "2", env={"RLHFC_FAIL_AT_STEP": "3"})
    assert died.returncode != 0
    assert "the run stopped" in died.stderr and "rerun with --resume" in died.stderr
    assert [r["step"] for r in metrics(tmp_path / "cut")] == [1, 2, 3]  # step 3 was never checkpointed
    early = run(script, tmp_path / "early", "--steps", "4", "--save-every", "2", env={"RLHFC_FAIL_AT_STEP": "1"})
    assert early.returncode != 0 and "rerun with --resume" not in early.stderr  # nothing to resume from
    assert "no checkpoint was written yet" in early.stderr
    resumed = run(script, tmp_path / "cut", "--steps", "4", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = untimed(metrics(whole)), untimed(metrics(tmp_path / "cut"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b  # losses, KL, reward: bit-identical to the uninterrupted run
    timed = metrics(whole)[0]  # every op ran, timed beside the planner's estimate
    assert {"time/gen", "time/a_tr", "time/c_tr", "time/realloc actor L0->L2", "estimate/gen"} <= set(timed)
    op_times = [v for k, v in timed.items() if k.startswith("time/") and k != "time/iteration"]
    assert all(0 < v < timed["time/iteration"] for v in op_times)  # last start to last end, within the step


def test_grpo_reward_rises_with_actor_reallocated_every_step(tmp_path):
    """Fixed seeds make the run deterministic; a faster learning rate makes it short."""
    script = generated(tmp_path, "grpo", edit=lambda text: text.replace("lr = 5e-4", "lr = 2e-3"))
    done = run(script, tmp_path / "run", "--steps", "100", "--save-every", "1000")
    assert done.returncode == 0, done.stderr
    rewards = [r["reward"] for r in metrics(tmp_path / "run")]
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > 2 * first, (first, last)


def test_offloaded_reference_computes_what_a_resident_one_does_and_resumes(tmp_path):
    """Device memory that holds the plan only with the frozen reference in host memory:
    the plan offloads it, the program reloads it before its call and offloads it after,
    and the metrics equal those of the same plan with the reference resident."""
    from dataclasses import replace

    from rlhfc.planner.solve import plan_dataflow

    source = ((ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')
              .replace("batch = 64", "batch = 8").replace('device = "cpu" }', 'device = "cpu"  memory = 1550KiB }'))
    (tmp_path / "ppo.rlhf").write_text(source)
    df = load_program(tmp_path / "ppo.rlhf")
    offloaded = plan_dataflow(df, time_limit=5)
    assert offloaded.offloaded == ("ref",)
    scripts = {}
    for name, p in (("offloaded", offloaded), ("resident", replace(offloaded, offloaded=()))):
        scripts[name] = tmp_path / f"{name}.py"
        scripts[name].write_text(emit(lower(df, p), str(scripts[name])))
    text = scripts["offloaded"].read_text()
    assert text.index("Reload(model='ref'") < text.index("Call(name='refl'") < text.index("Offload(model='ref'")
    assert "Reload(" not in scripts["resident"].read_text()
    for name, script in scripts.items():
        done = run(script, tmp_path / name, "--steps", "4", "--save-every", "2")
        assert done.returncode == 0, done.stderr
    assert untimed(metrics(tmp_path / "offloaded")) == untimed(metrics(tmp_path / "resident"))
    assert any(k.startswith("time/reload ref ") for k in metrics(tmp_path / "offloaded")[0])

    died = run(scripts["offloaded"], tmp_path / "cut", "--steps", "4", "--save-every", "2",
               env={"RLHFC_FAIL_AT_STEP": "3"})
    assert died.returncode != 0
    resumed = run(scripts["offloaded"], tmp_path / "cut", "--steps", "4", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert untimed(metrics(tmp_path / "cut")) == untimed(metrics(tmp_path / "offloaded"))


def test_mini_batch_epochs_clip_and_keep_results_across_plans(tmp_path):
    """PPO with 2 epochs x 4 mini-batches: 8 optimizer steps per call, the ratio moves
    off 1 (clip_frac > 0), and a dp=2 / pp=2 plan gives the single-layout plan's metrics
    (the shuffle depends on seed, step and epoch only)."""
    runs = {}
    for name, chosen in (("split", split_plan), ("mixed", mixed_plan)):
        script = generated(tmp_path / name if (tmp_path / name).mkdir() is None else None, "ppo_epochs", plan=chosen)
        done = run(script, tmp_path / name / "out", "--steps", "2", "--save-every", "10")
        assert done.returncode == 0, done.stderr
        runs[name] = untimed(metrics(tmp_path / name / "out"))
    assert all(r["a_tr/train_steps"] == 8 and r["c_tr/train_steps"] == 8 for r in runs["split"])
    assert max(r["a_tr/clip_frac"] for r in runs["split"]) > 0 and runs["split"][0]["a_tr/approx_kl"] != 0
    for a, b in zip(runs["split"], runs["mixed"], strict=True):
        for k in a:
            if not k.startswith("estimate/"):
                assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-6), k
