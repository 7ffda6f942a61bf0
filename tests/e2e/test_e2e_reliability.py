"""A run you can trust: checkpoints without pickle that resume under another process
count, fall back past a damaged one and refuse a changed program; the HF export loads
in transformers and generates what the trained model does; SIGINT / SIGTERM stop every
process with a checkpoint; one run per directory."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfc.driver import compile_program
from rlhfc_runtime import ckpt_store
from rlhfc_runtime.contract.rundir import RunDirError, RunLock, check_fresh
from rlhfc_runtime.errors import RunError
from test_e2e_run import metrics, run, untimed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """programs/ppo.rlhf on 2 processes, 4 steps, a checkpoint every 2: (source, run dir)."""
    tmp = tmp_path_factory.mktemp("trust")
    source = tmp / "ppo.rlhf"
    source.write_text((ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/'))
    script = _compiled(source, tmp / "ppo2.py", devices=2)
    done = run(script, tmp / "whole", "--steps", "4", "--save-every", "2")
    assert done.returncode == 0, done.stderr
    return source, tmp / "whole"


def _compiled(source: Path, output: Path, devices: int) -> Path:
    _, text = compile_program(source, devices=devices, output=output)
    output.write_text(text)
    return output


def _assert_same_metrics(whole: Path, resumed: Path, **tolerance) -> None:
    """Steps 1-4 of both runs, every untimed metric but the estimates equal within `tolerance`."""
    a, b = untimed(metrics(whole)), untimed(metrics(resumed))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for k in x:
            if not k.startswith("estimate/"):
                assert y[k] == pytest.approx(x[k], **tolerance), (x["step"], k)


def _cut_at_step_2(whole: Path, cut: Path) -> None:
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoint" / "step-000004")
    (cut / "checkpoint" / "latest").write_text("2")


def test_resume_under_another_process_count_gives_the_same_metrics(tmp_path, ppo_run):
    source, whole = ppo_run
    ckpt = whole / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-000002", "step-000004"]
    manifest = json.loads((ckpt / "step-000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    assert {e["file"] for e in manifest["shards"]["actor"]} <= set(manifest["files"])
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.partial"))
    _cut_at_step_2(whole, tmp_path / "cut")
    one = _compiled(source, tmp_path / "ppo1.py", devices=1)
    resumed = run(one, tmp_path / "cut", "--steps", "4", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "written by 2 processes, this run has 1" in resumed.stderr
    _assert_same_metrics(whole, tmp_path / "cut", rel=1e-4, abs=1e-6)


def test_a_crafted_pickle_in_the_run_directory_never_executes(tmp_path, ppo_run):
    source, _ = ppo_run
    script = _compiled(source, tmp_path / "ppo2.py", devices=2)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "out"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "rank0.pt").write_bytes(pickle.dumps(Exploit()))
    (out / "checkpoint" / "latest").write_text("2")
    resumed = run(script, out, "--steps", "4", "--resume")
    assert resumed.returncode == 1
    assert "old pickle checkpoint" in resumed.stderr and "Traceback" not in resumed.stderr
    assert not marker.exists()


def test_a_damaged_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, ppo_run):
    _, whole = ppo_run
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    weights = sorted((out / "checkpoint" / "step-000004").glob("critic.rank*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # a torn write
    program = _program_of(whole)
    chosen, notes = ckpt_store.prepare(out, program)
    assert chosen.name == "step-000002"
    assert any("step-000004" in n and "checksum" in n for n in notes)
    assert any("newest intact checkpoint, step-000002" in n for n in notes)


def _program_of(out: Path):
    """The PROGRAM of the run's generated file, paths resolved (as the launcher does)."""
    import runpy

    from rlhfc_runtime.contract.resume import resolve_paths

    return resolve_paths(runpy.run_path(str(out.parent / "ppo2.py"))["PROGRAM"], out.parent)


def _with_model(program, name, **changes):
    return replace(program, models={**program.models, name: replace(program.models[name], **changes)})


def test_resume_refuses_a_changed_shape_and_applies_a_changed_lr(tmp_path, ppo_run):
    _, whole = ppo_run
    program = _program_of(whole)
    manifest = ckpt_store.read_manifest(whole / "checkpoint" / "step-000004")
    wider = _with_model(program, "critic", shape=replace(program.models["critic"].shape, hidden=128))
    refuse, _ = ckpt_store.compare(manifest, wider)
    assert refuse == ["model critic: shape.hidden 64 -> 128"]
    with pytest.raises(RunError, match="(?s)cannot resume .*model critic: shape.hidden 64 -> 128"):
        ckpt_store.prepare(whole, wider)
    slower = replace(_with_model(program, "actor", optimizer={**program.models["actor"].optimizer, "lr": 1e-4}),
                     run=replace(program.run, save_every=program.run.save_every + 5))
    _, notes = ckpt_store.prepare(whole, slower)
    assert notes == ["resuming with changed settings: actor lr 0.002 -> 0.0001; "
                     f"save_every {program.run.save_every} -> {program.run.save_every + 5}"]


def test_rlhfc_run_refuses_a_changed_program_before_any_worker_starts(tmp_path, ppo_run):
    """The list of changes was only in worker.log, under a message that suggested the same
    `--resume` again: now `rlhfc run` compares before it writes program.py or starts a worker."""
    source, whole = ppo_run
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    (out / "worker.log").unlink(missing_ok=True)
    changed = tmp_path / "ppo.rlhf"
    changed.write_text(source.read_text().replace("intermediate = 128", "intermediate = 256", 1))
    done = _rlhfc("run", str(changed), "--out", str(out), "--resume", "--devices", "2")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert (f"error: cannot resume {out / 'checkpoint' / 'step-000004'}: the program changed in ways the checkpoint "
            "cannot follow:\n  - model actor: shape.intermediate 128 -> 256\n"
            "revert these changes, or start over with --overwrite") in done.stderr, done.stderr
    assert "rlhfc run" not in done.stderr and "Continue from" not in done.stderr
    assert not (out / "worker.log").exists() and not (out / "program.py").exists()


def test_a_jsonl_file_starting_with_a_byte_order_mark_runs(tmp_path):
    """A UTF-8 BOM was "invalid JSON" on line 1: it is skipped at check and at run time."""
    data = tmp_path / "prompts.jsonl"
    rows = (ROOT / "data" / "tiny" / "prompts.jsonl").read_text().splitlines(keepends=True)
    data.write_bytes(b"\xef\xbb\xbf" + "".join(rows[:20]).encode())
    source = tmp_path / "ppo.rlhf"
    text = (ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/tiny/prompts.jsonl"', f'"{data}"')
    source.write_text(text.replace('"../data/', f'"{ROOT}/data/'))
    done = run(_compiled(source, tmp_path / "ppo1.py", devices=1), tmp_path / "r", "--steps", "1")
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1]


def test_hf_export_loads_in_transformers_and_generates_what_the_trained_model_does(ppo_run):
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    from rlhfc_runtime.dist import spawn

    _, whole = ppo_run
    hf = whole / "hf"
    actor = AutoModelForCausalLM.from_pretrained(hf / "actor", dtype=torch.float32).eval()
    critic, info = AutoModelForTokenClassification.from_pretrained(hf / "critic", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(hf / "actor")
    assert tok("ab3")["input_ids"]
    exported = hf_tensors(hf / "actor")
    trained = ckpt_store.read_weights(whole / "checkpoint" / "step-000004", "actor")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    ids = torch.tensor([tok("ab3")["input_ids"], tok("cd7")["input_ids"]])
    ours, initial = spawn(_greedy_in_runtime, 1, str(whole / "checkpoint" / "step-000004"), ids)[0]
    theirs = actor.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)
    assert any(not torch.equal(initial[k], exported[k]) for k in exported)  # weights moved


def hf_tensors(path: Path) -> dict:
    """Every tensor of an exported HF directory (model.safetensors, or the files of its index)."""
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    return {k: v for f in sorted(files) for k, v in load_file(str(path / f)).items()}


def _greedy_in_runtime(step_dir: str, ids):
    from rlhfc_runtime import checkpoint as ck
    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.dist import ensure_groups
    from rlhfc_runtime.generate import SamplingParams, generate

    lay = Layout((0,), 1, 1, 1)
    ensure_groups([lay])
    cfg = json.loads((Path(step_dir).parents[1] / "hf" / "actor" / "config.json").read_text())
    model = ck.init_random(cfg, lay)
    initial = {k: v.clone() for k, v in model.shards().items()}
    weights = ckpt_store.read_weights(Path(step_dir), "actor")
    model.load_shards({n: weights[n] for n in model.shards()})
    out = generate(model, ids, torch.ones_like(ids), SamplingParams(max_new_tokens=6, eos_token_id=None,
                                                                    pad_token_id=0))
    return out.sequences, initial


def test_one_run_per_directory(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "since": "now"}))
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid} on"):
            RunLock(out).acquire()
        cli = _rlhfc("run", "programs/ppo.rlhf", "--out", str(out), "--steps", "1")
        assert cli.returncode == 1 and f"pid {holder.pid}" in cli.stderr and "Traceback" not in cli.stderr
    finally:
        holder.kill()
        holder.wait()
    with RunLock(out):  # its holder is gone: a stale lock is taken over
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert not (out / ".lock").exists()
    (out / "checkpoint" / "step-000002").mkdir(parents=True)
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        check_fresh(out, resume=False, overwrite=False)
    fresh = _rlhfc("run", "programs/ppo.rlhf", "--out", str(out), "--steps", "1")
    assert fresh.returncode == 1 and "--overwrite" in fresh.stderr
    check_fresh(out, resume=False, overwrite=True)
    assert not (out / "checkpoint").exists()


def _rlhfc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "rlhfc"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)


def _wait_for_steps(out: Path, n: int, proc, limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps in {limit} s")


def _group_left(pgid: int, limit: float = 5.0) -> list[str]:
    """The processes of group `pgid` still alive after up to `limit` s (multiprocessing's
    resource tracker leaves a moment after its parent)."""
    end = time.monotonic() + limit
    while True:
        found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["rlhfc run, SIGINT", "generated program, SIGTERM", "one process, SIGTERM"])
def test_a_signal_stops_every_process_with_a_checkpoint_and_resumes(tmp_path, how):
    out = tmp_path / "out"
    if how.startswith("rlhfc"):
        cmd = [str(Path(sys.executable).parent / "rlhfc"), "run", "programs/grpo.rlhf", "--steps", "400",
               "--out", str(out), "--save-every", "1000"]
        sig, code = signal.SIGINT, 130
    else:  # the generated program: spawned workers, or the one rank in its own process
        script = tmp_path / "grpo.py"
        _, text = compile_program(ROOT / "programs" / "grpo.rlhf", output=script,
                                  devices=1 if how.startswith("one") else None)
        script.write_text(text)
        cmd = [sys.executable, str(script), "--out", str(out), "--steps", "400", "--save-every", "1000"]
        sig, code = signal.SIGTERM, 143
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_steps(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == code, err
    assert _group_left(proc.pid) == []  # no worker outlives the run
    done = [r["step"] for r in metrics(out)]
    latest = int((out / "checkpoint" / "latest").read_text())
    assert latest == done[-1] < 400  # the checkpoint of the step it stopped at
    line = [ln for ln in err.splitlines() if "stopped by " + signal.Signals(sig).name in ln]
    assert line and "nothing lost" in line[-1] and f"--out {out} --resume" in line[-1]
    if how.startswith("rlhfc"):
        resumed = _rlhfc("run", "programs/grpo.rlhf", "--steps", str(latest + 1), "--out", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert [r["step"] for r in metrics(out)] == list(range(1, latest + 2))


def test_a_partial_metrics_line_is_dropped_on_resume(tmp_path, ppo_run, capsys):
    from rlhfc_runtime.metrics_log import MetricsLog

    _, whole = ppo_run
    path = tmp_path / "metrics.jsonl"
    path.write_text((whole / "metrics.jsonl").read_text() + '{"step": 5, "rew')
    MetricsLog(tmp_path, 2)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2]
    assert "dropped 1 damaged line(s) (line 5)" in capsys.readouterr().err


def test_resume_keeps_the_adaptive_kl_coefficient(tmp_path):
    """The adaptive KL coefficient is state carried across steps: a resumed run goes on
    from the saved coefficient, so its metrics equal the uninterrupted run's."""
    source = tmp_path / "ppo_adaptive.rlhf"
    text = (ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')
    source.write_text(text.replace("steps = 150", "steps = 150  kl_target = 0.001  kl_horizon = 100"))
    script = _compiled(source, tmp_path / "ppo1.py", devices=1)
    done = run(script, tmp_path / "whole", "--steps", "4", "--save-every", "2")
    assert done.returncode == 0, done.stderr
    whole = untimed(metrics(tmp_path / "whole"))
    assert whole[0]["a_tr/kl_coef"] != whole[3]["a_tr/kl_coef"]  # it does adapt
    _cut_at_step_2(tmp_path / "whole", tmp_path / "cut")
    resumed = run(script, tmp_path / "cut", "--steps", "4", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for x, y in zip(whole, untimed(metrics(tmp_path / "cut")), strict=True):
        assert y["a_tr/kl_coef"] == pytest.approx(x["a_tr/kl_coef"], rel=1e-9), x["step"]


def test_data_damaged_after_compile_stops_the_run_before_step_1_with_its_line(tmp_path):
    """`rlhfc check` scans the rows; a file changed (or larger than the check scans) is
    checked again before the first step: FILE:LINE:COL, exit 1, no traceback, nothing run."""
    data = tmp_path / "prompts.jsonl"
    rows = (ROOT / "data" / "tiny" / "prompts.jsonl").read_text().splitlines(keepends=True)
    data.write_text("".join(rows[:20]))
    source = tmp_path / "ppo.rlhf"
    text = (ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/tiny/prompts.jsonl"', f'"{data}"')
    source.write_text(text.replace('"../data/', f'"{ROOT}/data/'))
    script = _compiled(source, tmp_path / "ppo1.py", devices=1)
    data.write_text("".join(rows[:6]) + '["not", "an", "object"]\n' + "".join(rows[6:20]))
    done = run(script, tmp_path / "r", "--steps", "1")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"rlhfc: error: {data}:7:1: a row must be a JSON object, not list" in done.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists() or not metrics(tmp_path / "r")


def test_under_torchrun_a_checkpoint_resumes_to_the_uninterrupted_metrics(tmp_path, ppo_run):
    """The generated program launched by torchrun (2 processes, gloo): steps 1-2 with a
    checkpoint, then `--resume` to step 4, equal to the spawned uninterrupted run."""
    source, whole = ppo_run
    script = _compiled(source, tmp_path / "ppo2.py", devices=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                "--out", str(tmp_path / "r"), "--save-every", "2"]
    for extra in (["--steps", "2"], ["--steps", "4", "--resume"]):
        done = subprocess.run(torchrun + extra, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "r" / "checkpoint" / "latest").read_text() == "4"
    assert json.loads((tmp_path / "r" / "checkpoint" / "step-000002" / "manifest.json").read_text())["world_size"] == 2
    _assert_same_metrics(whole, tmp_path / "r", rel=1e-6, abs=1e-8)
