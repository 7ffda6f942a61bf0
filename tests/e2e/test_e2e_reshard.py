"""A checkpoint written by 4 processes (tp = 2, pp = 2: sharded files, each rank its
own) resumes on 2 processes under another plan (dp = 2), reading the intervals it needs
from whichever files hold them, and the run's losses equal the uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhfc.driver import compile_program
from rlhfc_runtime import ckpt_store
from test_e2e_reliability import hf_tensors
from test_e2e_run import metrics, run

ROOT = Path(__file__).resolve().parents[2]


def _sft(tmp: Path, devices: int, place: str) -> Path:
    text = (ROOT / "programs" / "sft.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')
    text = text.replace("devices_per_node = 2", f"devices_per_node = {devices}")
    source = tmp / f"sft{devices}.rlhf"
    source.write_text(text + f"\nplace a_tr on node0[0:{devices}] {place}\n")
    output = tmp / f"sft{devices}.py"
    _, code = compile_program(source, devices=devices, output=output)
    output.write_text(code)
    return output


def test_a_4_process_checkpoint_resumes_on_2_processes_under_another_plan(tmp_path):
    four = _sft(tmp_path, 4, "dp = 1  tp = 2  pp = 2")
    two = _sft(tmp_path, 2, "dp = 2  tp = 1  pp = 1")
    whole = tmp_path / "whole"
    done = run(four, whole, "--steps", "4", "--save-every", "2")
    assert done.returncode == 0, done.stderr
    step2 = whole / "checkpoint" / "step-000002"
    manifest = json.loads((step2 / "manifest.json").read_text())
    assert manifest["world_size"] == 4
    assert sorted({e["file"] for e in manifest["shards"]["actor"]}) == [f"actor.rank{r}.safetensors" for r in range(4)]
    assert ckpt_store.read_weights(whole / "checkpoint" / "step-000004", "actor").keys() == hf_tensors(whole / "hf" / "actor").keys()

    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoint" / "step-000004")
    (cut / "checkpoint" / "latest").write_text("2")
    resumed = run(two, cut, "--steps", "4", "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "written by 4 processes, this run has 2" in resumed.stderr
    a, b = metrics(whole), metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    losses = [k for k in a[0] if "loss" in k and not k.startswith(("estimate/", "time/"))]
    assert losses
    for x, y in zip(a, b, strict=True):
        for k in losses:
            assert y[k] == pytest.approx(x[k], abs=1e-3), (x["step"], k)
    exported = hf_tensors(cut / "hf" / "actor")
    trained = ckpt_store.read_weights(cut / "checkpoint" / "step-000004", "actor")
    assert all((exported[k] - trained[k]).abs().max() == 0 for k in trained)
