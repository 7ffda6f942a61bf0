"""`engine` is a generate setting: the checker resolves it (call option > run block >
"rlhfc") and refuses, located at the setting, what the engine cannot run (E033)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfc.frontend.check import check_program
from rlhfc_runtime.contract import engines
from rlhfc_runtime.contract.shapes import ModelShape

ROOT = Path(__file__).resolve().parents[2]
HD32 = 'hf(layers = 2, hidden = 64, heads = 2, kv_heads = 2, intermediate = 128, vocab = 64, max_positions = 128)'


def program(tmp_path: Path, actor: str, run_extra: str = "", gen_option: str = "") -> Path:
    flow = (ROOT / "stdlib" / "grpo.rlhf").read_text()
    if gen_option:
        flow = flow.replace("-> seq, logp\n", f"-> seq, logp  {{ {gen_option} }}\n")
    (tmp_path / "grpo.rlhf").write_text(flow)
    text = f'''import grpo from "grpo.rlhf"
cluster {{ nodes = 1  devices_per_node = 2  device = "cpu" }}
model actor  = {actor} {{ trainable }}
model ref    = {actor}
model reward = rule("pattern_reward")
dataset prompts = jsonl("{ROOT}/data/tiny/prompts.jsonl", field = "prompt", max_len = 16,
                        tokenizer = "{ROOT}/data/tiny/tokenizer.json")
run grpo(actor, ref, reward, prompts) {{ batch = 4  group_size = 2  max_new_tokens = 4  {run_extra} }}
'''
    path = tmp_path / "p.rlhf"
    path.write_text(text)
    return path


def errors(path: Path) -> list:
    _, diagnostics = check_program(path)
    return [d for d in diagnostics if d.code.startswith("E")]


def test_default_engine_is_the_own_loop(tmp_path):
    flow, _ = check_program(program(tmp_path, 'llama(preset = "tiny")'))
    assert dict(next(c for c in flow.calls if c.name == "gen").settings)["engine"] == "rlhfc"


def test_vllm_on_a_head_dim_32_model_checks(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "installed", lambda package: True)
    flow, _ = check_program(program(tmp_path, HD32, 'engine = "vllm"'))
    assert dict(next(c for c in flow.calls if c.name == "gen").settings)["engine"] == "vllm"


def test_head_dim_16_is_refused_at_the_call_option(tmp_path):
    [err] = errors(program(tmp_path, 'llama(preset = "tiny")', gen_option='engine = "vllm"'))
    assert err.code == "E033" and "head_dim >= 32" in err.message and err.span.file.endswith("grpo.rlhf")


def test_a_missing_package_is_refused_at_the_run_key(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "installed", lambda package: False)
    [err] = errors(program(tmp_path, HD32, 'engine = "vllm"'))
    assert err.code == "E033" and "not installed" in err.message and err.span.line == 8


@pytest.mark.parametrize("value", ['"sglang"', "3"])
def test_an_unknown_engine_is_e022(tmp_path, value):
    [err] = errors(program(tmp_path, HD32, f"engine = {value}"))
    assert err.code == "E022"


@pytest.mark.parametrize("family, tied, refusal", [
    ("qwen3", False, None), ("phi3", False, None), ("gemma2", True, None),
    ("gemma2", False, "ties the 'gemma2' LM head"), ("olmo2", False, "does not run the 'olmo2' family"),
])
def test_vllm_runs_the_families_whose_sync_is_tested(family, tied, refusal, monkeypatch):
    monkeypatch.setattr(engines, "installed", lambda package: True)
    shape = ModelShape(2, 64, 2, 2, 128, 64, tied_embeddings=tied, family=family, head_dim=32)
    problem = engines.engine_problem("vllm", shape, "cpu")
    assert problem is None if refusal is None else refusal in problem
