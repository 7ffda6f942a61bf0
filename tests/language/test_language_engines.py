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


def _calls(path: Path) -> dict:
    flow, diagnostics = check_program(path)
    assert flow is not None, diagnostics
    return {c.name: dict(c.settings) for c in flow.calls}


def test_engine_logprobs_resolve_and_the_train_call_learns_whose_they_are(tmp_path, monkeypatch):
    """`rollout_logp` is "trainer" unless set; with "engine" and a correction the train
    call carries the generate call's name, under which it logs `logprob_diff`."""
    monkeypatch.setattr(engines, "installed", lambda package: True)
    plain = _calls(program(tmp_path, HD32, 'engine = "vllm"  off_policy = "tis"'))
    assert plain["gen"]["rollout_logp"] == "trainer" and "engine_logp_of" not in plain["a_tr"]
    kept = _calls(program(tmp_path, HD32, 'engine = "vllm"  off_policy = "tis"', gen_option='rollout_logp = "engine"'))
    assert kept["gen"]["rollout_logp"] == "engine" and kept["a_tr"]["engine_logp_of"] == "gen"
    assert all("engine_logp_of" not in s for name, s in kept.items() if name != "a_tr")


@pytest.mark.parametrize("run_extra, gen_option, needle, hint", [
    ('off_policy = "tis"', 'rollout_logp = "engine"', "decodes on the own loop", 'engine = "vllm"'),
    ('engine = "vllm"', 'rollout_logp = "engine"', 'train call `a_tr` would take them', 'off_policy = "tis" on `a_tr`'),
    ('engine = "vllm"  rollout_logp = "engine"', "", 'off_policy = "none"', 'off_policy = "tis"'),
    ('engine = "vllm"  rollout_logp = "both"', "", "`rollout_logp` must be one of", "trainer's recomputation"),
])
def test_engine_logprobs_without_an_engine_or_a_correction_are_e022_at_the_setting(tmp_path, monkeypatch, run_extra,
                                                                                     gen_option, needle, hint):
    monkeypatch.setattr(engines, "installed", lambda package: True)
    path = program(tmp_path, HD32, run_extra, gen_option)
    [err] = errors(path)
    assert err.code == "E022" and needle in err.message and hint in err.hint, err
    source = Path(err.span.file).read_text().splitlines()[err.span.line - 1]
    assert source[err.span.col - 1:].startswith(('"engine"', '"both"')), (source, err.span)
    assert err.span.file.endswith("grpo.rlhf" if gen_option else "p.rlhf")


def test_engine_logprobs_with_decoupled_check(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "installed", lambda package: True)
    path = program(tmp_path, HD32, 'engine = "vllm"  off_policy = "decoupled"', 'rollout_logp = "engine"')
    assert errors(path) == [] and _calls(path)["a_tr"]["engine_logp_of"] == "gen"
