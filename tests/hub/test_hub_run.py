"""`rlhfc run` on a hub id, offline from the cache: the generated program keeps the id
and resolves it at run start; weights the cache lacks stop the run with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hub_fixtures import REPO, add_to_cache, rlhfc, sft_program

from rlhfc.driver import compile_program
from rlhfc_runtime.contract import hub


def test_rlhfc_run_trains_a_hub_checkpoint_with_its_tokenizer(offline, tmp_path):
    out = tmp_path / "run"
    result = rlhfc("run", str(sft_program(tmp_path, f'hf("{REPO}")')), "--devices", "1", "--steps", "2",
                   "--out", str(out))
    assert result.returncode == 0, result.stderr + (out / "worker.log").read_text()
    assert f"checkpoint='hf://{REPO}'" in (out / "program.py").read_text()
    assert f"hf://{REPO} → {offline / 'hub'}" in result.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(r["a_tr/loss"] > 0 for r in steps)
    export = out / "hf" / "actor"
    assert (export / "tokenizer.json").is_file() and json.loads((export / "config.json").read_text())["vocab_size"] == 64


def test_weights_missing_from_the_cache_stop_the_program_at_start(offline, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hub.resolve_checkpoint(REPO) / name, files / name)
    add_to_cache(offline / "hub", "tiny-org/no-weights", files)
    path = sft_program(tmp_path, 'hf("tiny-org/no-weights")')
    _, text = compile_program(path, output=tmp_path / "prog.py")  # config.json is enough to check
    (tmp_path / "prog.py").write_text(text)
    done = subprocess.run([sys.executable, str(tmp_path / "prog.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 1
    assert done.stderr.startswith("rlhfc: error: hub id `tiny-org/no-weights` has no `model.safetensors` in the cache")
    assert "HF_HUB_OFFLINE" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    result = rlhfc("run", str(path), "--devices", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 1 and "error: hub id `tiny-org/no-weights` has no `model.safetensors`" in result.stderr
    assert not Path(tmp_path / "run" / "worker.log").exists()  # stopped before the program started
