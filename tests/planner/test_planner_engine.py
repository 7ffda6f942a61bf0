"""Calls priced with what the runtime does besides their own pass: a generate call on
vLLM (the weight sync into the engine and the trainer's recomputation of the log-probs),
and a train call's off-policy correction (its no-grad forward)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlhfc.frontend.check import load_program
from rlhfc.hardware import CATALOG
from rlhfc.ir import Mesh, Strategy
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.model import call_cost

ROOT = Path(__file__).resolve().parents[2]


GRPO = load_program(ROOT / "programs" / "grpo.rlhf")


def _terms(name: str, key: str, value, s: Strategy, model: str = "actor", is_home: bool = False
           ) -> tuple[dict, dict]:
    """The cost terms of call `name` of programs/grpo.rlhf as it is, and with setting `key` = `value`."""
    call = next(c for c in GRPO.calls if c.name == name)
    changed = replace(call, settings=tuple((k, value if k == key else v) for k, v in call.settings))
    owner = next(m for m in GRPO.models if m.name == model)
    device = CATALOG[GRPO.cluster.device]
    return tuple(dict(call_cost(c, owner, s, GRPO.cluster, device, Coefficients(), is_home).terms)
                 for c in (call, changed))


def test_vllm_adds_sync_and_recompute_terms():
    own, vllm = _terms("gen", "engine", "vllm", Strategy(Mesh(0, 1, 0, 2), dp=1, tp=2, pp=1))
    assert "engine_sync" not in own
    assert vllm.pop("engine_sync") > 0 and vllm.pop("engine_recompute") > 0
    assert vllm == own  # the decode itself is still priced as the own loop's


def test_off_policy_correction_prices_one_forward():
    """A train call with `off_policy` runs one no-grad forward over its batch first (the
    pre-update log-probs): what the same-shaped reference's inference over it costs."""
    s = Strategy(Mesh(0, 1, 0, 2), dp=2, tp=1, pp=1)
    plain, corrected = _terms("a_tr", "off_policy", "decoupled", s, is_home=True)
    forward, _ = _terms("refl", "precision", "fp32", s, model="ref", is_home=True)
    assert "old_logp" not in plain
    assert corrected.pop("old_logp") == sum(forward.values()) > 0 and corrected == plain
