"""Calls priced with what the runtime does besides their own pass. A generate call on
vLLM is priced as the runtime runs it (`planner.cost.engine`): the weight sync into the
engine and the trainer's recomputation of the log-probs on top of the decode, the
engine's weights and KV pool in the call's memory, and `gpu_memory_utilization` a plan
decision, what the plan leaves on the device, carried in the call's settings
(test_vllm_engine checks that vLLM's constructor gets it). A train call's off-policy
correction costs its no-grad forward."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from rlhfc.backend.lower import lower
from rlhfc.frontend.check import load_program
from rlhfc.hardware import CATALOG, device_for
from rlhfc.ir import Mesh, Strategy
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.engine import engine_bytes, kv_pool_bytes, page_tokens
from rlhfc.planner.cost.model import call_cost
from rlhfc.planner.solve import symmetric_plan
from rlhfc_runtime.contract import engines

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


def test_engine_logprobs_drop_exactly_the_recompute():
    """`rollout_logp = "engine"`: the generate call keeps vLLM's log-probs, runs no
    forward of its own, and costs exactly `engine_recompute` less (the train call's
    `old_logp` prices the forward that replaces it)."""
    s = Strategy(Mesh(0, 1, 0, 2), dp=1, tp=2, pp=1)
    call = next(c for c in GRPO.calls if c.name == "gen")
    owner, device = next(m for m in GRPO.models if m.name == "actor"), CATALOG[GRPO.cluster.device]
    costs = {}
    for mode in ("trainer", "engine"):
        values = {"engine": "vllm", "rollout_logp": mode}
        changed = replace(call, settings=tuple((k, values.get(k, v)) for k, v in call.settings))
        costs[mode] = call_cost(changed, owner, s, GRPO.cluster, device, Coefficients(), False)
    trainer, engine = dict(costs["trainer"].terms), dict(costs["engine"].terms)
    recompute = trainer.pop("engine_recompute")
    assert recompute > 0 and trainer == engine
    assert costs["trainer"].seconds - costs["engine"].seconds == pytest.approx(recompute, rel=1e-9)


def test_off_policy_correction_prices_one_forward():
    """A train call with `off_policy` runs one no-grad forward over its batch first (the
    pre-update log-probs): what the same-shaped reference's inference over it costs."""
    s = Strategy(Mesh(0, 1, 0, 2), dp=2, tp=1, pp=1)
    plain, corrected = _terms("a_tr", "off_policy", "decoupled", s, is_home=True)
    forward, _ = _terms("refl", "precision", "fp32", s, model="ref", is_home=True)
    assert "old_logp" not in plain
    assert corrected.pop("old_logp") == sum(forward.values()) > 0 and corrected == plain


def _vllm_program(tmp_path: Path, cluster: str, actor: str) -> Path:
    text = (ROOT / "programs" / "grpo.rlhf").read_text().replace('"../', f'"{ROOT}/')
    text = text.replace('import grpo from "stdlib/grpo.rlhf"', f'import grpo from "{ROOT}/stdlib/grpo.rlhf"')
    text = text.replace('cluster { nodes = 1  devices_per_node = 2  device = "cpu" }', cluster)
    text = text.replace('llama(preset = "tiny")', actor).replace("seed = 1", 'seed = 1  engine = "vllm"')
    path = tmp_path / "p.rlhf"
    path.write_text(text)
    return path


@pytest.mark.parametrize("cluster, actor", [
    ('cluster { nodes = 1  devices_per_node = 8  device = "H100-80GB" }', 'hf(preset = "qwen3-8b")'),
    ('cluster { nodes = 1  devices_per_node = 2  device = "cpu" }',
     "hf(layers = 2, hidden = 64, heads = 2, kv_heads = 2, intermediate = 128, vocab = 64, max_positions = 128)"),
])
def test_the_engine_pool_fits_and_its_share_reaches_the_settings(tmp_path, monkeypatch, cluster, actor):
    monkeypatch.setattr(engines, "installed", lambda package: True)
    df = load_program(_vllm_program(tmp_path, cluster, actor))
    plan = symmetric_plan(df)
    device = device_for(df.cluster)
    gen, model = df.call("gen"), df.model("actor")
    placement = plan.placement("gen")
    decided = dict(placement.engine)
    s = placement.strategy
    rows = -(-gen.batch // s.dp)
    precision = dict(gen.settings)["precision"]
    pool = kv_pool_bytes(model.shape, rows, gen.seq_len, precision, page_tokens(device))
    # every row of the replica fits the pool at the call's whole length
    assert decided["kv_cache_bytes"] == pool >= rows * gen.seq_len * 2 * model.shape.n_layers * \
        model.shape.n_kv_heads * model.shape.head_dim * (4 if precision == "fp32" else 2)
    assert decided["max_model_len"] == gen.seq_len and decided["engine_start_s"] > 0
    # the engine's share holds its weights and pool, and only what the plan leaves free
    engine = engine_bytes(gen, model.shape, model.head, s, precision, page_tokens(device))
    share = decided["gpu_memory_utilization"] * device.memory
    assert placement.peak_memory <= device.plan_memory
    assert engine <= share <= device.plan_memory - (placement.peak_memory - engine) + device.memory / 1000
    assert 0 < decided["gpu_memory_utilization"] <= 0.95
    settings = dict(next(op.settings for op in lower(df, plan).ops if getattr(op, "name", "") == "gen"))
    assert {k: settings[k] for k in decided} == decided
    assert not dict(plan.placement("a_tr").engine)  # only the vLLM call carries them
