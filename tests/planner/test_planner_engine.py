"""A generate call on vLLM is priced with what the runtime does besides decoding: the
weight sync into the engine and the trainer's recomputation of the log-probs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlhfc.frontend.check import load_program
from rlhfc.hardware import CATALOG
from rlhfc.ir import Mesh, Strategy
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.model import call_cost

ROOT = Path(__file__).resolve().parents[2]


def test_vllm_adds_sync_and_recompute_terms():
    df = load_program(ROOT / "programs" / "grpo.rlhf")
    gen = next(c for c in df.calls if c.name == "gen")
    actor = next(m for m in df.models if m.name == "actor")
    on_vllm = replace(gen, settings=tuple((k, "vllm" if k == "engine" else v) for k, v in gen.settings))
    device = CATALOG[df.cluster.device]
    s = Strategy(Mesh(0, 1, 0, 2), dp=1, tp=2, pp=1)
    own = dict(call_cost(gen, actor, s, df.cluster, device, Coefficients(), False).terms)
    vllm = dict(call_cost(on_vllm, actor, s, df.cluster, device, Coefficients(), False).terms)
    assert "engine_sync" not in own
    assert vllm.pop("engine_sync") > 0 and vllm.pop("engine_recompute") > 0
    assert vllm == own  # the decode itself is still priced as the own loop's
