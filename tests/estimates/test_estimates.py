"""Hardware profiles, calibration, `plan --explain` and their CLI errors (no timing assertions)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfc.frontend.check import load_program
from rlhfc.cli import app
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.fit import (
    FIT_FIELDS, PricedCall, Sample, coefficients_to_json, cost_inputs_json, fit_coefficients, load_coefficients,
    move_times, priced_calls,
)
from rlhfc.planner.explain import explain_plan
from rlhfc.hardware import device_for, load_profile, with_profile
from rlhfc.ir import CallKind, Cluster, Mesh, Strategy
from rlhfc.backend.lower import lower
from rlhfc.planner.profile import Measurement, derive
from rlhfc.planner.solve import plan_dataflow
from rlhfc.planner.solve.problem import SearchSpace, build_problem, home_calls

ROOT = Path(__file__).resolve().parents[2]
PPO = ROOT / "programs" / "ppo.rlhf"
runner = CliRunner()

MEASURED = [
    Measurement("matmul", (64, 64, 64), 2e-5), Measurement("matmul", (512, 256, 256), 1e-3),
    Measurement("copy", (1 << 26,), 8e-3),
    Measurement("decode", (1, 32), 1e-4), Measurement("decode", (32, 256), 2e-3),
    Measurement("allreduce", (2, 4), 2e-4), Measurement("allreduce", (2, 1 << 22), 4e-3),
]


def _profile(tmp_path: Path) -> Path:
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(derive(MEASURED)))
    return path


def _plan_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
    result = runner.invoke(app, ["plan", str(PPO), "--time-limit", "5", "--workers", "1", "--json", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_profile_round_trip_and_figures(tmp_path):
    doc = derive(MEASURED)
    base, overrides = load_profile(_profile(tmp_path))
    assert base == "cpu" and dict(overrides) == pytest.approx(doc["device"])
    device = device_for(with_profile(Cluster(1, 2, "cpu"), tmp_path / "hw.json"))
    assert device.flops == pytest.approx(2 * 512 * 256 * 256 / 1e-3)  # the best matmul
    assert device.mem_bandwidth * DEFAULT_COEFFICIENTS.mem_bandwidth_efficiency == pytest.approx(2 * (1 << 26) / 8e-3)
    assert load_coefficients(tmp_path / "hw.json").collective_latency == pytest.approx(doc["coefficients"]["collective_latency"])


LAYERS = [Measurement("layer_train", (16, 64), 0.3), Measurement("layer_forward", (16, 64), 0.08),
          Measurement("head_train", (512,), 0.4), Measurement("head_forward", (512,), 0.1),
          Measurement("decode_step", (32, 48, 2), 0.05), Measurement("decode_step", (32, 48, 8), 0.08)]


def test_a_cpu_profile_prices_the_reference_model_at_its_measured_layers(tmp_path):
    """The planner's train and forward seconds per token of the reference model are its
    measured layers' and LM head's; a layer's decode step costs what was measured."""
    from rlhfc.planner.cost.model import flop_rate
    from rlhfc_runtime.contract.family import shape_from_hf
    from rlhfc_runtime.profile import REFERENCE

    path = tmp_path / "hw.json"
    path.write_text(json.dumps(derive(MEASURED + LAYERS)))
    device, c = device_for(with_profile(Cluster(1, 1, "cpu"), path)), load_coefficients(path)
    shape = shape_from_hf(REFERENCE)
    n, per = shape.param_count(), {m.what: m.seconds / math.prod(m.case) for m in LAYERS}
    assert 6 * n / flop_rate(device, c, CallKind.TRAIN) == pytest.approx(30 * per["layer_train"] + per["head_train"])
    assert 2 * n / flop_rate(device, c, CallKind.INFERENCE) == pytest.approx(
        30 * per["layer_forward"] + per["head_forward"])
    # the decode loop's step at 2 and 8 layers: 5 ms a layer, 40 ms of its own; each beyond its roofline
    forward = flop_rate(device, c, CallKind.INFERENCE)
    layer_params = (shape.param_count() - shape.vocab * shape.hidden - shape.hidden) / 30
    assert 0 < c.decode_layer_overhead == pytest.approx(5e-3 - 2 * layer_params * 32 / forward)
    assert 0 < c.decode_step_overhead == pytest.approx(0.04 - 2 * shape.vocab * shape.hidden * 32 / forward)
    without = load_coefficients(_profile(tmp_path))  # no layers measured (a GPU profile): the defaults
    assert (without.compute_efficiency, without.inference_efficiency, without.decode_layer_overhead) == (
        DEFAULT_COEFFICIENTS.compute_efficiency, DEFAULT_COEFFICIENTS.inference_efficiency,
        DEFAULT_COEFFICIENTS.decode_layer_overhead)


def test_plan_uses_the_hardware_profile(tmp_path):
    default = _plan_json(tmp_path)
    profiled = _plan_json(tmp_path, "--hardware", str(_profile(tmp_path)))
    assert profiled["cluster"]["overrides"] and not default["cluster"]["overrides"]
    assert profiled["iteration_time"] != default["iteration_time"]


def test_cluster_block_names_a_profile(tmp_path):
    hw = _profile(tmp_path)
    text = PPO.read_text().replace('"../data/', f'"{ROOT}/data/').replace(
        'device = "cpu" }', f'device = "cpu"  hardware = "{hw.name}" }}')
    program = tmp_path / "ppo_hw.rlhf"
    program.write_text(text)
    cluster = load_program(str(program)).cluster
    assert dict(cluster.overrides) == pytest.approx(dict(load_profile(hw)[1]))


def _synthetic_samples(truth) -> list[Sample]:
    """Every option of a tiny PPO on 4 CPUs, 'measured' by the cost model with `truth`."""
    from tests.planner.planner_fixtures import TINY, ppo_dataflow

    df = ppo_dataflow(TINY, Cluster(1, 4, "cpu"), batch=32, prompt_len=16, gen_len=16)
    homes = home_calls(df)
    out = []
    for call in df.calls:
        model = df.model(call.model)
        for mesh, dp, tp, pp, n_mbs in ((Mesh(0, 1, 0, 1), 1, 1, 1, 1), (Mesh(0, 1, 0, 4), 4, 1, 1, 2),
                                        (Mesh(0, 1, 0, 4), 1, 2, 2, 4), (Mesh(0, 1, 0, 2), 1, 2, 1, 1),
                                        (Mesh(0, 1, 0, 2), 2, 1, 1, 8)):
            s = Strategy(mesh, dp, tp, pp, call.budget_for(dp, n_mbs))
            priced = PricedCall(call, model, s, df.cluster, homes[call.model] == call.name)
            out.append(Sample("synthetic", priced, priced.seconds(truth)))
    return out


def test_calibrate_recovers_known_coefficients():
    truth = replace(DEFAULT_COEFFICIENTS, compute_efficiency=0.3, mem_bandwidth_efficiency=0.2, link_efficiency=0.4,
                    collective_latency=3e-4, micro_batch_overhead=5e-3, decode_step_overhead=4e-4)
    fitted = fit_coefficients(_synthetic_samples(truth), prior=1e-9)
    for name in FIT_FIELDS:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.02), name


def test_move_latency_is_the_median_measured_move(tmp_path):
    """`rlhfc calibrate` prices a data move as the runs' median move (the first step is warm-up)."""
    rows = [{"step": 1, "time/move seq L0->L1": 9.0}, {"step": 2, "time/move seq L0->L1": 1e-3, "time/gen": 1.0},
            {"step": 3, "time/move seq L0->L1": 3e-3, "time/move logp L0->L1": 2e-3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sorted(move_times(tmp_path / "metrics.jsonl")) == [1e-3, 2e-3, 3e-3]
    df = load_program(str(PPO), cluster_override=Cluster(1, 2, "cpu"))
    slow = plan_dataflow(df, time_limit=5, workers=1, coeffs=replace(DEFAULT_COEFFICIENTS, move_latency=1.0))
    layouts = {(p.strategy.mesh, p.strategy.dp, p.strategy.tp, p.strategy.pp) for p in slow.calls}
    assert len(layouts) == 1  # at 1 s a move, no call leaves the others' layout


def test_coefficients_and_cost_inputs_round_trip(tmp_path):
    c = replace(DEFAULT_COEFFICIENTS, micro_batch_overhead=7e-3)
    (tmp_path / "c.json").write_text(coefficients_to_json(c))
    assert load_coefficients(tmp_path / "c.json") == c
    df = load_program(str(PPO), cluster_override=Cluster(1, 4, "cpu"))
    plan = plan_dataflow(df, time_limit=5, workers=1)
    (tmp_path / "cost_inputs.json").write_text(cost_inputs_json(lower(df, plan)))
    priced = priced_calls(tmp_path / "cost_inputs.json")
    for p in plan.calls:
        if p.call in priced:  # neural calls: priced again exactly as the planner did
            assert math.ceil(priced[p.call].seconds(DEFAULT_COEFFICIENTS) * 1e6 - 1e-9) * 1e-6 == pytest.approx(p.end - p.start)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_explain_terms_sum_to_the_estimate(devices):
    df = load_program(str(PPO), cluster_override=Cluster(1, devices, "cpu"))
    plan = plan_dataflow(df, time_limit=5, workers=1)
    rows = explain_plan(df, plan, DEFAULT_COEFFICIENTS)
    assert [r.call for r in rows] == [p.call for p in plan.calls]
    for r in rows:
        assert abs(sum(v for _, v in r.terms) - r.estimate) <= DEFAULT_COEFFICIENTS.time_unit
    moved = {m.before_call: m.seconds for m in plan.reallocations}
    assert {r.call: r.realloc for r in rows if r.realloc} == pytest.approx(moved)


def test_explain_terms_with_pipeline_and_tensor_parallel():
    """Every option of a bigger space (pp and tp > 1, many micro-batches) sums exactly."""
    from tests.planner.planner_fixtures import TINY, ppo_dataflow

    problem = build_problem(ppo_dataflow(TINY, Cluster(1, 8, "cpu"), batch=64, prompt_len=16, gen_len=16),
                            space=SearchSpace(n_mbs=(1, 2, 8)))
    options = [o for _, opts in problem.options for o in opts]
    assert any(o.strategy.pp > 1 for o in options) and any(o.strategy.tp > 1 for o in options)
    for o in options:
        assert math.isclose(sum(v for _, v in o.cost.terms), o.cost.seconds, rel_tol=1e-12)


def test_plan_explain_prints_the_terms(tmp_path):
    result = runner.invoke(app, ["plan", str(PPO), "--time-limit", "5", "--workers", "1", "--explain"])
    assert result.exit_code == 0, result.output
    assert "estimate terms per call" in result.output and "compute" in result.output


@pytest.mark.parametrize("args", [
    ["calibrate", "{tmp}/missing/metrics.jsonl"],
    ["calibrate", "{tmp}/bad/metrics.jsonl"],
    ["plan", str(PPO), "--hardware", "{tmp}/missing.json"],
    ["plan", str(PPO), "--hardware", "{tmp}/bad.json"],
    ["plan", str(PPO), "--coefficients", "{tmp}/bad.json"],
    ["plan", str(PPO), "--coefficients", "{tmp}/other.json"],
    ["compile", str(PPO), "--coefficients", "{tmp}/missing.json"],
])
def test_cli_errors_are_one_clear_line(tmp_path, args):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "bad" / "cost_inputs.json").write_text("{not json")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"schema_version": 1, "coefficients": {"nope": 1}}')
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and "error" in result.output


# ---- shared cores and driver work ------------------------------------------------------


def _ppo_call_seconds(cluster: Cluster) -> dict[str, float]:
    """Every neural call of the tiny PPO on a 4-process dp layout, priced on `cluster`."""
    from rlhfc.planner.cost.model import call_cost

    df = load_program(str(PPO), cluster_override=cluster)
    homes, s = home_calls(df), Strategy(Mesh(0, 1, 0, 4), 4, 1, 1, 1)
    return {c.name: call_cost(c, df.model(c.model), s, df.cluster, device_for(df.cluster), DEFAULT_COEFFICIENTS,
                              homes.get(c.model) == c.name).seconds
            for c in df.calls if df.model(c.model).shape is not None}


def test_four_processes_on_two_cores_take_twice_as_long():
    """4 processes sharing 2 cores: every call takes devices_per_node / cores = 2x the time
    it takes with 4 cores; with enough cores (or none declared) nothing changes."""
    two, four = Cluster(1, 4, "cpu", (("cores", 2.0),)), Cluster(1, 4, "cpu", (("cores", 4.0),))
    shared, own, undeclared = _ppo_call_seconds(two), _ppo_call_seconds(four), _ppo_call_seconds(Cluster(1, 4, "cpu"))
    assert own == undeclared and own
    for name, seconds in own.items():
        assert shared[name] == pytest.approx(2 * seconds), name
    assert _ppo_call_seconds(Cluster(1, 4, "cpu", (("cores", 8.0),))) == own  # spare cores do not speed up
    h100 = Cluster(1, 4, "H100-80GB", (("cores", 2.0),))  # only local CPU devices share cores
    assert _ppo_call_seconds(h100) == _ppo_call_seconds(Cluster(1, 4, "H100-80GB"))


def test_cores_from_the_cluster_block_and_the_profile(tmp_path):
    text = PPO.read_text().replace('"../data/', f'"{ROOT}/data/').replace('device = "cpu" }', 'device = "cpu"  cores = 2 }')
    program = tmp_path / "ppo_cores.rlhf"
    program.write_text(text)
    assert dict(load_program(str(program)).cluster.overrides)["cores"] == 2.0
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(derive(MEASURED, cores=2)))
    device = device_for(with_profile(Cluster(1, 4, "cpu"), path))
    assert device.cores == 2.0
    assert "cores" not in derive(MEASURED)["device"]  # no count given: the profile leaves it out


def test_driver_overhead_fit_and_iteration_estimate(tmp_path):
    from rlhfc.planner.cost.fit import driver_ops, fit_driver_overhead
    from rlhfc.planner.cost.model import iteration_seconds

    runs = [(0.010, 3, 0.010 + 3 * 2e-3), (0.040, 8, 0.040 + 8 * 2e-3), (0.005, 1, 0.005 + 2e-3)]
    k = fit_driver_overhead(runs)
    assert k == pytest.approx(2e-3)
    assert fit_driver_overhead([(0.02, 2, 0.01)]) == 0.0  # never negative
    c = replace(DEFAULT_COEFFICIENTS, driver_op_overhead=k)
    assert iteration_seconds(0.010, 3, c) == pytest.approx(0.016)
    assert iteration_seconds(0.010, 3, DEFAULT_COEFFICIENTS) == 0.010  # the default leaves it out
    (tmp_path / "c.json").write_text(coefficients_to_json(c))
    assert load_coefficients(tmp_path / "c.json") == c
    (tmp_path / "d.json").write_text(coefficients_to_json(DEFAULT_COEFFICIENTS))
    assert load_coefficients(tmp_path / "d.json") == DEFAULT_COEFFICIENTS  # zero is allowed for it
    df = load_program(str(PPO), cluster_override=Cluster(1, 2, "cpu"))
    prog = lower(df, plan_dataflow(df, time_limit=5, workers=1))
    n = driver_ops(prog)
    assert 0 < n < len(prog.ops)  # the loads, moves and rule reward, not the neural calls
    assert json.loads(cost_inputs_json(prog))["driver_ops"] == n


def test_memory_coefficients_are_the_benchmarks_fit():
    """`MEMORY_COEFFICIENTS` holds exactly what bench/memory_fit.py fitted to the runtime's
    measured peaks (bench/results/memory_fit.json): one fact, one place to change it."""
    import json

    from rlhfc.planner.cost.memory import MEMORY_COEFFICIENTS, MemoryCoefficients

    fits = json.loads((ROOT / "bench" / "results" / "memory_fit.json").read_text())["fits"]
    for precision, shipped in MEMORY_COEFFICIENTS.items():
        fitted = {k: v for key, f in fits.items() if key.endswith("/" + precision) for k, v in f["coefficients"].items()}
        assert shipped == MemoryCoefficients(**fitted), precision


def test_lm_head_is_priced_at_the_response_in_one_tile():
    """The LM head runs at the response positions in tiles (`rlhfc_runtime.logits`): its
    vocabulary-wide bytes are one tile's, whatever the batch; a value head's grow with it."""
    from rlhfc.ir import Head, ModelShape
    from rlhfc.planner.cost.memory import head_units
    from rlhfc_runtime.contract.shapes import logit_tile_tokens

    shape = ModelShape(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, intermediate=128, vocab=151936)
    tile = logit_tile_tokens(shape.vocab // 2)
    assert head_units(shape, Head.LM, 2, 4096, 1024) == (1024.0, tile * shape.vocab / 2)
    assert head_units(shape, Head.LM, 2, 4096, 10 * tile)[1] == head_units(shape, Head.LM, 2, 4096, 1024)[1]
    assert head_units(shape, Head.LM, 1, 40, 8) == (8.0, 8 * shape.vocab)  # fewer tokens than a tile
    assert head_units(shape, Head.VALUE, 2, 4096, 1024) == (4096.0, 4096.0)
