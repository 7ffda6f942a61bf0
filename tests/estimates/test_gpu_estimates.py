"""GPU estimates: the catalog's H100 coefficients (fitted to ReaL's measured PPO
iterations by `bench/fit_real.py`) are physically plausible, are what plans use by
default, reproduce ReaL-Heuristic's measured symmetric iterations, and `--explain`
keeps the physical roofline beside them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfc.cli import app
from rlhfc.hardware import CATALOG
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS, GPU_COEFFICIENTS, default_coefficients
from rlhfc.planner.explain import explain_plan, roofline_seconds
from rlhfc.planner.solve import plan_dataflow, symmetric_plan

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from real_settings import settings  # noqa: E402

H100 = GPU_COEFFICIENTS["H100-80GB"]


def test_fitted_h100_coefficients_are_physical():
    share = CATALOG["H100-80GB"].achievable * H100.compute_efficiency
    assert 0.148 <= share <= 0.6  # of peak bf16 FLOP/s in training (the bound 0.33 × 0.45)
    assert 0.5 <= H100.inference_efficiency <= 1.5 and 0.3 <= H100.mem_bandwidth_efficiency <= 0.9
    assert 5e-6 <= H100.collective_latency <= 1e-3
    assert 0 < H100.decode_step_overhead <= 5e-2 and 0 < H100.decode_layer_overhead <= 2e-3
    assert 0 < H100.realloc_bucket_latency <= 0.5
    fit = json.loads((ROOT / "bench/results/real_fit.json").read_text())
    assert {k: getattr(H100, k) for k in fit["coefficients"]} == pytest.approx(fit["coefficients"])


def test_gpus_default_to_fitted_coefficients_and_cpu_to_the_analytical_ones():
    assert default_coefficients("H100-80GB") == H100
    assert all(default_coefficients(d) is not DEFAULT_COEFFICIENTS for d in ("H200", "A100-80GB", "A100-40GB"))
    assert default_coefficients("cpu") is DEFAULT_COEFFICIENTS
    df = settings()[0].dataflow()
    assert symmetric_plan(df).iteration_time == symmetric_plan(df, H100).iteration_time
    assert symmetric_plan(df).iteration_time > 1.5 * symmetric_plan(df, DEFAULT_COEFFICIENTS).iteration_time


@pytest.mark.parametrize("row", [0, 4, 8])  # 7B on 16 GPUs, generation 128 / 384 / 896
def test_symmetric_estimate_matches_real_heuristic(row):
    """In-sample check of the fit on the cheap rows (the benchmark has all twelve, and
    leave-one-out errors): within 35% of ReaL-Heuristic's measured seconds."""
    s = settings()[row]
    est = symmetric_plan(s.dataflow()).iteration_time
    assert abs(est - s.real_heuristic) / s.real_heuristic <= 0.35, (est, s.real_heuristic)


def test_explain_shows_the_roofline_beside_the_estimate():
    df = settings()[0].dataflow()
    plan = plan_dataflow(df, time_limit=5, workers=2)
    rows = explain_plan(df, plan, None)
    assert all(0 < r.roofline < sum(v for _, v in r.terms) for r in rows if r.terms)
    floor, per_call = roofline_seconds(df, plan, None)
    assert 0 < floor < plan.iteration_time / 2
    assert set(per_call) == {r.call for r in rows}


def test_plan_explain_prints_what_the_estimate_means(tmp_path):
    res = CliRunner().invoke(app, ["plan", str(ROOT / "programs/ppo_7b.rlhf"), "--time-limit", "3", "--explain"])
    assert res.exit_code == 0, res.output
    assert "roofline" in res.output and "fitted to ReaL" in res.output
