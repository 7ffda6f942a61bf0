"""A train call with an off-policy correction is priced with the no-grad forward it
runs first for the pre-update log-probs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlhfc.frontend.check import load_program
from rlhfc.hardware import CATALOG
from rlhfc.ir import Mesh, Strategy
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.model import call_cost

ROOT = Path(__file__).resolve().parents[2]


def test_correction_prices_one_forward():
    df = load_program(ROOT / "programs" / "grpo.rlhf")
    train = next(c for c in df.calls if c.name == "a_tr")
    actor = next(m for m in df.models if m.name == "actor")
    corrected = replace(train, settings=tuple((k, "decoupled" if k == "off_policy" else v) for k, v in train.settings))
    device = CATALOG[df.cluster.device]
    s = Strategy(Mesh(0, 1, 0, 2), dp=2, tp=1, pp=1)
    plain = dict(call_cost(train, actor, s, df.cluster, device, Coefficients(), True).terms)
    more = dict(call_cost(corrected, actor, s, df.cluster, device, Coefficients(), True).terms)
    assert "old_logp" not in plain
    # one forward over the batch: what the same-shaped reference's inference call over it costs
    ref = next(m for m in df.models if m.name == "ref")
    forward = call_cost(next(c for c in df.calls if c.name == "refl"), ref, s, df.cluster, device, Coefficients(), True)
    assert more.pop("old_logp") == sum(dict(forward.terms).values()) > 0 and more == plain
