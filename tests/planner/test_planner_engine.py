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
from rlhfc.frontend.presets import PRESETS
from rlhfc.ir import Call, CallKind, Head, Mesh, Span, Strategy
from rlhfc.planner.cost.coefficients import Coefficients, default_coefficients
from rlhfc.planner.cost.engine import decode_terms, engine_bytes, kv_pool_bytes, page_tokens
from rlhfc.planner.cost.model import allreduce_seconds, call_cost
from rlhfc.planner.solve import symmetric_plan
from rlhfc_runtime.contract import engines

ROOT = Path(__file__).resolve().parents[2]


GRPO = load_program(ROOT / "programs" / "grpo.rlhf")
SPAN = Span("<test>", 0, 0, 0, 0)


def _terms(name: str, key: str, value, s: Strategy, model: str = "actor", is_home: bool = False
           ) -> tuple[dict, dict]:
    """The cost terms of call `name` of programs/grpo.rlhf as it is, and with setting `key` = `value`."""
    call = next(c for c in GRPO.calls if c.name == name)
    changed = replace(call, settings=tuple((k, value if k == key else v) for k, v in call.settings))
    owner = next(m for m in GRPO.models if m.name == model)
    device = CATALOG[GRPO.cluster.device]
    return tuple(dict(call_cost(c, owner, s, GRPO.cluster, device, Coefficients(), is_home).terms)
                 for c in (call, changed))


def test_vllm_adds_sync_and_recompute_terms_and_prices_its_own_decode():
    s = Strategy(Mesh(0, 1, 0, 2), dp=1, tp=2, pp=1)
    own, vllm = _terms("gen", "engine", "vllm", s)
    assert "engine_sync" not in own and "bubble" in own and "bubble" not in vllm
    assert vllm.pop("engine_sync") > 0 and vllm.pop("engine_recompute") > 0
    gen = next(c for c in GRPO.calls if c.name == "gen")
    decode = decode_terms(replace(gen, settings=(*gen.settings, ("engine", "vllm"))), GRPO.model("actor").shape,
                          GRPO.model("actor").head, s, CATALOG[GRPO.cluster.device], Coefficients(), 4,
                          gen.gen_len, lambda nbytes: allreduce_seconds(nbytes, 2, CATALOG["cpu"].intra_bandwidth,
                                                                        Coefficients()))
    assert vllm == pytest.approx(decode)  # prefill and decode are `decode_terms`', and nothing else
    assert vllm != own  # the own loop's decode model is not vLLM's


def _vllm_gen(batch: int, prompt: int, gen_len: int, response: int = 0):
    settings = (("engine", "vllm"),) + ((("response_len", response),) if response else ())
    return Call("gen", "actor", CallKind.GENERATE, (), (), "", (), batch, prompt, gen_len, SPAN, settings)


ONE = Strategy(Mesh(0, 1, 0, 1), 1, 1, 1)
MEMORY_BOUND = Coefficients(engine_compute_efficiency=1e6)  # no step is compute-bound


def test_vllm_decode_is_priced_per_generated_token_in_one_running_batch():
    """Continuous batching: the steps follow the responses' expected length, not the
    longest one × micro-batches; a step's bytes are the weights and the live rows' KV."""
    shape, cpu, c = PRESETS["tiny"], CATALOG["cpu"], MEMORY_BOUND
    price = lambda call, s=ONE: decode_terms(call, shape, Head.LM, s, cpu, c, 4, seen(call), lambda b: 0.0)  # noqa: E731
    seen = lambda call: dict(call.settings).get("response_len", call.gen_len)  # noqa: E731
    full, half = price(_vllm_gen(8, 16, 64)), price(_vllm_gen(8, 16, 64, response=32))
    # the responses' lengths uniform on [0, 64]: the batch runs 64 steps, shrinking linearly to 0
    rows_at = [8 * (64 - t) / 64 for t in range(64)]  # live rows at step t (mean over steps: 4)
    kv = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * 4
    weights = 4 * shape.param_count(Head.LM)
    bandwidth = cpu.mem_bandwidth * c.engine_bandwidth_efficiency
    brute = sum((weights + kv * r * (16 + t)) / bandwidth for t, r in enumerate(rows_at))
    assert half["decode_memory"] == pytest.approx(brute, rel=0.02)  # the closed form against the steps one by one
    assert full["decode_overhead"] == pytest.approx(65 * c.engine_step_overhead)  # prefill + 64 steps
    assert price(_vllm_gen(8, 16, 64, response=16))["decode_overhead"] == pytest.approx(33 * c.engine_step_overhead)
    # no micro-batch serialisation and no pipeline bubble: n_mbs and pp change nothing
    assert price(_vllm_gen(8, 16, 64), Strategy(Mesh(0, 1, 0, 2), 1, 1, 2, 4)) == pytest.approx(full)
    # one running batch: twice the rows cost the same weight reads, only more KV
    double = price(_vllm_gen(16, 16, 64))
    assert full["decode_memory"] < double["decode_memory"] < 2 * full["decode_memory"]


def test_vllm_decode_compute_bound_and_tensor_parallel():
    """A big batch is compute-bound (2·N FLOPs per live row); tp splits the engine's bytes
    and FLOPs over its devices and adds 2 all-reduces per layer per step."""
    shape, h100 = PRESETS["llama-3.1-8b"], CATALOG["H100-80GB"]
    c = default_coefficients("H100-80GB")
    call = _vllm_gen(512, 128, 256)
    one = decode_terms(call, shape, Head.LM, ONE, h100, c, 2, 256, lambda b: 0.0)
    assert one["decode_compute"] > 0 and "decode_memory" not in one
    assert one["decode_compute"] == pytest.approx(
        256 * 2 * shape.param_count(Head.LM) * 512 / (h100.flops * h100.achievable * c.engine_compute_efficiency))
    tp = decode_terms(call, shape, Head.LM, Strategy(Mesh(0, 1, 0, 4), 1, 4, 1, 1), h100, c, 2, 256, lambda b: 1e-5)
    assert tp["decode_compute"] == pytest.approx(one["decode_compute"] / 4)
    assert tp["tp"] == pytest.approx((1 + 256) * 2 * shape.n_layers * 1e-5)  # prefill + every step


@pytest.mark.parametrize("device, rows, prompt, published", [
    ("H100-80GB", 1, 256, 6.48e-3),  # InferenceBench, vLLM 0.21.0: median TPOT at concurrency 1
    ("A100-40GB", 1, 1088, 1 / 75),  # J. Musgrave, vLLM 0.23.0: ~75 tokens/s at 1024 + 128 tokens
    ("H100-80GB", 4, 256, 6.59e-3),  # InferenceBench at concurrency 4: not fitted, a check
])
def test_gpu_engine_defaults_reproduce_the_published_decode_steps(device, rows, prompt, published):
    """`VLLM_GPU` (bench/results/vllm_gpu_defaults.md) prices one decode step of
    Llama-3.1-8B in bf16 as the published vLLM figures it was fitted to."""
    c = default_coefficients(device)
    one_step = lambda gen_len: sum(decode_terms(_vllm_gen(rows, prompt, gen_len), PRESETS["llama-3.1-8b"], Head.LM,  # noqa: E731
                                                ONE, CATALOG[device], c, 2, gen_len, lambda b: 0.0).values())
    step = one_step(3) - one_step(2)  # the third step alone (context prompt + 2)
    assert step == pytest.approx(published, rel=0.02)


def test_engine_logprobs_drop_exactly_the_recompute():
    """`rollout_logp = "engine"`: the generate call keeps vLLM's log-probs, runs no
    forward of its own, and costs exactly `engine_recompute` less (the train call's
    `old_logp` prices the forward that replaces it), and none of the forward's memory."""
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
    # nor its memory: the sync's buffers are then the larger of the two
    assert costs["engine"].transient_bytes <= costs["trainer"].transient_bytes


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
