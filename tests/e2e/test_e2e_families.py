"""A GRPO step on a checkpoint of every model family, as a user runs it (`rlhfc run`):
on 2 processes with generation pinned to tp = 2 and actor training to pp = 2 (so the
actor is reallocated between them), and on 1 process for a few; the run's HF export
loads with `transformers` as the checkpoint's own class."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from family_cases import write_family

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = """import grpo from "stdlib/grpo.rlhf"
cluster {{ nodes = 1  devices_per_node = {devices}  device = "cpu" }}
model actor  = llama("ckpt") {{ trainable  optimizer = adam(lr = 1e-3) }}
model ref    = llama("ckpt")
model reward = rule("pattern_reward")
dataset prompts = jsonl("{data}/prompts.jsonl", field = "prompt", max_len = 16, tokenizer = "{data}/tokenizer.json")
run grpo(actor, ref, reward, prompts) {{ batch = 4  group_size = 2  max_new_tokens = 6  steps = 2  seed = 1 }}
"""
PINS = "place gen on node0[0:2] dp = 1 tp = 2 pp = 1\nplace a_tr on node0[0:2] dp = 1 tp = 1 pp = 2\n"
TWO = ["llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"]
ONE = ["llama_yarn", "gemma3", "phi3"]


def _run(tmp_path: Path, family: str, devices: int) -> Path:
    write_family(family, tmp_path / "ckpt", seed=1)
    text = PROGRAM.format(devices=devices, data=ROOT / "data" / "tiny") + (PINS if devices == 2 else "")
    (tmp_path / "g.rlhf").write_text(text)
    done = subprocess.run([str(Path(sys.executable).parent / "rlhfc"), "run", str(tmp_path / "g.rlhf"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / "out"


def _check(out: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float)), records
    want = json.loads((out.parent / "ckpt" / "config.json").read_text())["architectures"]
    model = AutoModelForCausalLM.from_pretrained(out / "hf" / "actor")
    assert [type(model).__name__] == want, family


@pytest.mark.parametrize("family", TWO)
def test_grpo_on_two_processes_with_tp_and_pp_pins(tmp_path, family):
    _check(_run(tmp_path, family, 2), family)


@pytest.mark.parametrize("family", ONE)
def test_grpo_on_one_process(tmp_path, family):
    _check(_run(tmp_path, family, 1), family)
