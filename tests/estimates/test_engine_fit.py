"""`rlhfc calibrate` fits vLLM's decode coefficients (`engine_*`, `cost.engine.decode_terms`)
from runs with `engine = "vllm"`: synthetic runs whose `time/gen` the cost model made with
known coefficients give them back, through the files a run writes (`cost_inputs.json`
with the call's engine, `metrics.jsonl`); the other coefficients stay where they were."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from rlhfc.ir import Call, CallKind, Cluster, Head, Mesh, Model, ModelShape, Span, Strategy
from rlhfc.plan import _strategy_dict
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.fit import (COST_INPUTS_SCHEMA_VERSION, FIT_FIELDS, PricedCall, fit_coefficients, priced_calls,
                                    samples_from_run)

SPAN = Span("<test>", 0, 0, 0, 0)
SHAPE = ModelShape(30, 576, 9, 3, 1536, 49152, 256)  # SmolLM2-135M's width, as bench/vllm_bench.py
CLUSTER = Cluster(1, 1, "cpu")
ONE = Strategy(Mesh(0, 1, 0, 1), 1, 1, 1)
ENGINE = ("engine_compute_efficiency", "engine_bandwidth_efficiency", "engine_step_overhead")


def _run(folder, batch: int, prompt: int, gen_len: int, response: int, truth) -> None:
    """A run of a vLLM generate call and the reference's forward over its sequences (which
    pins the own coefficients the trainer's recompute shares): its cost inputs, and 3 steps
    of each call's time as the model prices it with `truth` (the first step, the engine's
    start-up, far off: the fit skips it)."""
    folder.mkdir()
    calls = [Call("gen", "actor", CallKind.GENERATE, (), (), "", (), batch, prompt, gen_len, SPAN,
                  (("engine", "vllm"), ("response_len", response))),
             Call("refl", "ref", CallKind.INFERENCE, (), (), "", (), batch, prompt, gen_len, SPAN,
                  (("response_len", response),))]
    doc = {"schema_version": COST_INPUTS_SCHEMA_VERSION, "driver_ops": 0,
           "cluster": {"nodes": 1, "devices_per_node": 1, "device": "cpu", "overrides": []},
           "calls": [{"call": c.name, "kind": c.kind.value, "batch": batch, "prompt_len": prompt, "gen_len": gen_len,
                      "engine": dict(c.settings).get("engine", "rlhfc"), "model": c.model, "head": "lm",
                      "shape": asdict(SHAPE), "strategy": _strategy_dict(ONE), "is_home": False} for c in calls]}
    (folder / "cost_inputs.json").write_text(json.dumps(doc))
    seconds = {c.name: PricedCall(c, Model(c.model, "llama", SHAPE, Head.LM, False, None, None, None, SPAN), ONE,
                                  CLUSTER, False).seconds(truth) for c in calls}
    rows = [{"step": i + 1, "gen/response_len": response, **{f"time/{n}": t * (40 if i == 0 else 1)
                                                             for n, t in seconds.items()}} for i in range(3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cost_inputs_carry_the_engine(tmp_path):
    _run(tmp_path / "r", 4, 16, 32, 32, DEFAULT_COEFFICIENTS)
    assert dict(priced_calls(tmp_path / "r" / "cost_inputs.json")["gen"].call.settings) == {"engine": "vllm"}


def test_calibrate_recovers_the_engine_coefficients(tmp_path):
    truth = replace(DEFAULT_COEFFICIENTS, compute_efficiency=0.2, engine_compute_efficiency=0.5, engine_bandwidth_efficiency=0.3,
                    engine_step_overhead=0.05)
    runs = []  # batch sizes and lengths where each term leads: overhead, bytes, FLOPs
    for i, (batch, prompt, gen_len, response) in enumerate(
            [(1, 8, 64, 64), (1, 8, 32, 12), (4, 8, 64, 40), (16, 16, 32, 32), (64, 32, 64, 40), (128, 16, 16, 16)]):
        _run(tmp_path / f"run{i}", batch, prompt, gen_len, response, truth)
        runs.append(tmp_path / f"run{i}" / "metrics.jsonl")
    samples = [s for run in runs for s in samples_from_run(run)]  # what `calibrate_runs` reads
    assert len(samples) == 12
    fitted = fit_coefficients(samples, prior=1e-9)  # no pull towards the start: the runs say everything
    for name in ENGINE:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.03), name
    for name in set(FIT_FIELDS) - set(ENGINE):  # the own coefficients: truth's
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=0.03), name
