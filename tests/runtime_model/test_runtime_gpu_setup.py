"""GPU setup on a CPU machine: the precision setting as the checker resolves it, how the
world is initialised on CUDA (mocked), and ranks per GPU refused up front."""

from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rlhfc.frontend.check import check_program, load_program
from rlhfc_runtime import dist as rdist

PROGRAM = '''import grpo from "stdlib/grpo.rlhf"
cluster {{ nodes = 1  devices_per_node = 1  device = "{device}" }}
model actor = llama(preset = "tiny") {{ trainable  optimizer = adam(lr = 1e-3) }}
model ref = llama(preset = "tiny")
model reward = rule("pattern_reward")
dataset p = jsonl("p.jsonl", field = "prompt", max_len = 8)
run grpo(actor, ref, reward, p) {{ batch = 4  max_new_tokens = 4  group_size = 2 {extra} }}
'''


def _program(tmp_path: Path, device="cpu", extra="") -> Path:
    path = tmp_path / "prog.rlhf"
    path.write_text(PROGRAM.format(device=device, extra=extra))
    return path


@pytest.mark.parametrize("device, extra, want", [
    ("cpu", "", "fp32"), ("H100-80GB", "", "bf16"), ("cpu", 'precision = "bf16"', "bf16"),
    ("H100-80GB", 'precision = "fp32"', "fp32"),
])
def test_precision_is_resolved_for_every_model_call(tmp_path, device, extra, want):
    calls = load_program(_program(tmp_path, device, extra)).calls
    settings = {c.name: dict(c.settings) for c in calls}
    assert {n: s.get("precision") for n, s in settings.items()} == {"gen": want, "score": None, "refl": want,
                                                                    "a_tr": want}


def test_precision_values_are_checked(tmp_path):
    diags = [d for d in check_program(_program(tmp_path, extra='precision = "fp16"'))[1] if d.is_error]
    assert [d.code for d in diags] == ["E022"] and "'bf16', 'fp32'" in diags[0].message


def test_init_on_cuda_binds_the_device_with_a_timeout(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set", d))
    monkeypatch.setattr(rdist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(rdist.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(rdist.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RLHFC_DIST_TIMEOUT", "42")
    assert rdist.init_from_env() == 1
    assert seen["backend"] == "cpu:gloo,cuda:nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["set"] == torch.device("cuda", 1) and seen["timeout"] == timedelta(seconds=42)


def test_more_ranks_than_gpus_is_refused_up_front(monkeypatch):
    with pytest.raises(RuntimeError, match="3 processes on this node but only 2 GPU"):
        rdist.check_ranks_per_gpu(3, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="one rank per GPU"):
        rdist.spawn(print, 2)
    rdist.check_ranks_per_gpu(2, 2)  # one each: fine
