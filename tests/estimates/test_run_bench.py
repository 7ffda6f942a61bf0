"""bench/run_bench.py's calibrated section end to end, tiny: one calibration run, the fit
`rlhfc calibrate` makes, the calibrated plans, one round of 4 steps; checks what
bench.json holds, never how fast anything ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import run_bench  # noqa: E402

from rlhfc.planner.cost.fit import FIT_FIELDS, load_coefficients  # noqa: E402


def test_calibrated_section_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(run_bench, "CALIBRATION_PLANS", {"one_process": {"devices": 1, "symmetric": True}})
    program = ROOT / "programs" / "ppo.rlhf"
    runs = run_bench.calibration_runs(program, 4, tmp_path / "calibration")
    assert [r.name for r in runs] == ["one_process"]
    assert {p.name for p in runs[0].iterdir()} == {"metrics.jsonl", "cost_inputs.json"}

    out = tmp_path / "out"
    result = run_bench.main([str(program), "--steps", "4", "--repeats", "1", "--sections", "calibrated",
                             "--out", str(out), "--calibration-runs", str(runs[0])])
    doc = json.loads((out / "bench.json").read_text())
    assert doc == json.loads(json.dumps(result))
    assert doc["sections"] == ["calibrated"] and len(doc["rounds"]) == 1
    cal = doc["calibration"]
    assert cal["steps"] is None and cal["samples"] == 5  # the five neural calls of PPO
    assert set(cal["fitted"]) == {*FIT_FIELDS, "move_latency"}
    load_coefficients(out / "coefficients.json")  # a file `--coefficients` accepts
    assert set(doc["calibrated_plans"]) == {"calibrated_solver", "calibrated_symmetric", "calibrated_one_process"}
    assert all(len(lines) == 6 for lines in doc["calibrated_plans"].values())  # one line per call
    for key in ("symmetric_plan_s_per_iter", "calibrated_solver_s_per_iter", "calibrated_solver_estimate_s",
                "calibrated_symmetric_estimate_s", "calibrated_one_process_estimate_s",
                "speedup_calibrated_solver_vs_symmetric", "predicted_speedup_calibrated_solver_vs_symmetric",
                "calibrated_symmetric_s_per_iter", "symmetric_plan_calibrated_estimate_s",
                "speedup_calibrated_solver_vs_calibrated_symmetric",
                "predicted_speedup_calibrated_solver_vs_calibrated_symmetric"):
        assert doc[key] > 0 and doc["rounds"][0][key] == doc[key]
    assert doc["predicted_speedup_calibrated_solver_vs_symmetric"] == (
        doc["symmetric_plan_calibrated_estimate_s"] / doc["calibrated_solver_estimate_s"])
    low, high = doc["speedup_calibrated_solver_vs_symmetric_range"]
    assert low == high == doc["speedup_calibrated_solver_vs_symmetric"]
    preferred = doc["calibrated_one_process_estimate_s"] < doc["calibrated_solver_estimate_s"]
    assert doc["model_prefers_one_process"] is preferred
    assert ("calibrated_one_process_s_per_iter" in doc) is preferred
    assert "solver_plan_s_per_iter" not in doc and "hand_written_s_per_iter" not in doc
