"""The plan describes what runs: every example that runs on CPU, under the solver's plan and under pinned
tp / pp / dp layouts with more micro-batches than stages and token budgets the
power-of-two ladder never makes, run for one step on 2 gloo
processes; every model call's measured peak (`peak_bytes/CALL`, the runtime's own
accounting of live tensors) is within 30% of the plan's estimate
(`estimate/peak_bytes/CALL`), and every call's rows are the checker's. The plan prices a
micro-batch full to its token budget, which a padded step is exactly; a packed step
(the default) holds only the real tokens, so there the estimate is a bound."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfc.frontend.check import load_program
from rlhfc.ir import ModelKind

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.30

PPO_LAYOUTS = """
place gen  on node0  dp = 1  tp = 2  pp = 1  n_mbs = 2
place refl on node0  dp = 1  tp = 1  pp = 2  n_mbs = 4
place vals on node0  dp = 2  tp = 1  pp = 1
place a_tr on node0  dp = 1  tp = 1  pp = 2  n_mbs = 4
place c_tr on node0  dp = 1  tp = 2  pp = 1
"""
GRPO_LAYOUTS = """
place gen  on node0  dp = 1  tp = 1  pp = 2  n_mbs = 4
place refl on node0  dp = 1  tp = 2  pp = 1
place a_tr on node0  dp = 2  tp = 1  pp = 1  n_mbs = 2
"""
# budgets the power-of-two ladder never makes (5 and 3 sequences of 28 tokens): 7 generate
# micro-batches, 6 per replica, and 11 through a 2-stage pipeline
GRPO_BUDGETS = """
place gen  on node0  dp = 1  tp = 1  pp = 2  token_budget = 140
place refl on node0  dp = 2  tp = 1  pp = 1  token_budget = 84
place a_tr on node0  dp = 1  tp = 1  pp = 2  token_budget = 84
"""
CASES = {
    "ppo-solver": ("ppo", ""),
    "ppo-tp-pp-dp": ("ppo", PPO_LAYOUTS),
    "grpo-solver": ("grpo", ""),
    "grpo-pp-tp-dp": ("grpo", GRPO_LAYOUTS),
    "grpo-budgets": ("grpo", GRPO_BUDGETS),
    "remax-group4": ("remax", None),  # None: group_size = 4 added to the run block
    "rloo": ("rloo", ""),
    "dpo": ("dpo", ""),
    "sft": ("sft", ""),
    "reward_model": ("reward_model", ""),
    "ppo_epochs": ("ppo_epochs", ""),
    "ppo_pinned": ("ppo_pinned", ""),
    "grpo_seqmean": ("grpo_seqmean", ""),
    "grpo_math": ("grpo_math", ""),  # an HF checkpoint, a chat template, Python rewards, 1 process
}


def _program(tmp_path: Path, name: str, pins: str | None, packing: str = "padded") -> Path:
    text = (ROOT / "programs" / f"{name}.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')
    text = re.sub(r"(\nrun [^{]*\{)", f'\\1 packing = "{packing}" ', text, count=1)
    if pins is None:
        text = text.replace("max_new_tokens = 12", "max_new_tokens = 12  group_size = 4", 1)
    path = tmp_path / f"{name}.rlhf"
    path.write_text(text + (pins or ""))
    (tmp_path / "rewards.py").write_text((ROOT / "programs" / "rewards.py").read_text())
    return path


def _first_step(tmp_path: Path, program: Path) -> dict:
    out = tmp_path / "out"
    done = subprocess.run([str(Path(sys.executable).parent / "rlhfc"), "run", str(program), "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_a_packed_step_stays_within_the_estimate(tmp_path):
    df = load_program(program := _program(tmp_path, "ppo", PPO_LAYOUTS, packing="packed"))
    record = _first_step(tmp_path, program)
    for call in df.calls:
        if df.model(call.model).kind != ModelKind.RULE:
            measured, estimate = record[f"peak_bytes/{call.name}"], record[f"estimate/peak_bytes/{call.name}"]
            assert measured <= (1 + TOLERANCE) * estimate, (call.name, measured, estimate)


@pytest.mark.parametrize("case", list(CASES))
def test_measured_peak_and_rows_match_the_plan(tmp_path, case):
    name, pins = CASES[case]
    program = _program(tmp_path, name, pins)
    df = load_program(program)
    record = _first_step(tmp_path, program)
    model_calls = [c for c in df.calls if df.model(c.model).kind != ModelKind.RULE]
    for call in df.calls:
        assert record[f"rows/{call.name}"] == call.rows, call.name
    for call in model_calls:
        measured, estimate = record[f"peak_bytes/{call.name}"], record[f"estimate/peak_bytes/{call.name}"]
        assert abs(measured - estimate) <= TOLERANCE * estimate, (call.name, measured, estimate)
