"""A full disk while a run writes any of its files (tests/e2e/full_disk/sitecustomize.py
makes the writes to one file fail, in every process): the run stops with one message
naming the file and the bytes it needed, leaves no temp file or partial directory, and
the previous checkpoint, HF export and metrics stay whole, so `--resume` continues."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rlhfc_runtime import ckpt_store
from test_e2e_reliability import _compiled, hf_tensors
from test_e2e_run import metrics, run

ROOT = Path(__file__).resolve().parents[2]
INJECT = str(Path(__file__).parent / "full_disk")


@pytest.fixture(scope="module")
def ppo1(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    source = tmp / "ppo.rlhf"
    source.write_text((ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/'))
    return _compiled(source, tmp / "ppo1.py", devices=1)


def _full(target: str, allowed: int = 0) -> dict:
    return {"PYTHONPATH": INJECT, "RLHFC_TEST_FULL_DISK": f"*/{target}@{allowed}"}


def _assert_whole_at_step_1(out: Path, logged: list[int]) -> None:
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    ckpt = out / "checkpoint"
    assert (ckpt / "latest").read_text() == "1"
    assert [d.name for d in ckpt.iterdir() if d.is_dir()] == ["step-000001"]
    assert ckpt_store.problem_of(ckpt / "step-000001") is None
    assert [r["step"] for r in metrics(out)] == logged  # whole lines only
    assert all(json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines())
    exported, saved = hf_tensors(out / "hf" / "actor"), ckpt_store.read_weights(ckpt / "step-000001", "actor")
    assert exported.keys() == saved.keys() and all(exported[k].equal(saved[k]) for k in saved)


@pytest.mark.parametrize("target, allowed, logged", [
    ("checkpoint/step-000002.partial/actor.rank0.safetensors", 0, [1, 2]),  # the shard's header
    ("checkpoint/latest", 1, [1, 2]),  # after the step directory was renamed: renamed back
    ("samples.jsonl", 1, [1]),  # appended: cut back to whole lines
    # streamed: one write for the header and one per tensor (21 of the actor), so the 23rd
    # write is step 2's header and its first tensor fails: the export of step 1 stays
    ("hf/actor.tmp/model.safetensors", 23, [1, 2]),
])
def test_a_full_disk_on_any_file_names_it_and_keeps_the_previous_checkpoint(tmp_path, ppo1, target, allowed, logged):
    out = tmp_path / "r"
    done = run(ppo1, out, "--steps", "2", "--save-every", "1", env=_full(target, allowed))
    assert done.returncode == 1, done.stderr
    error = next(ln for ln in done.stderr.splitlines() if ln.startswith("rlhfc: error: "))
    m = re.search(r": no space left on device \((\d+) bytes needed\)", error)
    assert f"{out}/{target}" in error and m and int(m.group(1)) > 0, error
    _assert_whole_at_step_1(out, logged)


def test_rlhfc_run_shows_the_full_disk_without_a_traceback_and_resumes(tmp_path):
    source = tmp_path / "ppo.rlhf"
    source.write_text((ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/'))
    out = tmp_path / "r"
    args = [str(Path(sys.executable).parent / "rlhfc"), "run", str(source), "--devices", "1", "--steps", "2",
            "--save-every", "1", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240,
                          env={**os.environ, **_full("metrics.jsonl", 1)})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{out}/metrics.jsonl: no space left on device (" in done.stderr and "bytes needed" in done.stderr
    assert "Traceback" in (out / "worker.log").read_text()  # the worker's traceback is kept in the log
    _assert_whole_at_step_1(out, [1])
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2] and (out / "checkpoint" / "latest").read_text() == "2"


def test_the_writers_name_the_path_and_bytes_and_leave_the_old_file(tmp_path, monkeypatch):
    """write_atomic (manifests, configs, tokenizers, every compiler output) and append_atomic
    (metrics, samples) under a disk that fills after a few bytes; `rlhfc compile -o` says so."""
    from typer.testing import CliRunner

    from rlhfc.cli import app
    from rlhfc_runtime.contract.atomic import append_atomic, write_atomic

    whole, target = tmp_path / "m.jsonl", tmp_path / "manifest.json"
    whole.write_bytes(b'{"step": 1}\n')
    target.write_bytes(b"old")
    real = os.write

    def full(fd, data):
        real(fd, bytes(data)[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    for write, path in ((append_atomic, whole), (write_atomic, target)):
        with pytest.raises(OSError) as caught:
            write(path, b"x" * 100)
        assert caught.value.filename == str(path) and caught.value.strerror == "no space left on device (100 bytes needed)"
    assert whole.read_bytes() == b'{"step": 1}\n' and target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "manifest.json"]
    monkeypatch.undo()
    target.chmod(0o600)
    write_atomic(target, b"new")  # fmt --write keeps a program's permissions
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr(os, "write", full)
    done = CliRunner().invoke(app, ["compile", str(ROOT / "programs" / "ppo.rlhf"), "-o", str(tmp_path / "p.py")])
    assert done.exit_code == 1 and (done.exception is None or isinstance(done.exception, SystemExit))
    assert re.search(rf"cannot write output `{tmp_path}/p.py`: no space left on device \(\d+ bytes needed\)", done.output)
    assert not (tmp_path / "p.py").exists() and not (tmp_path / "p.py.tmp").exists()
