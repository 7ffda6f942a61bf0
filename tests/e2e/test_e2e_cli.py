"""`rlhfc run` / `rlhfc compile` as a user runs them: compile into the run dir, train,
stop clearly when a worker dies (resume exactness: test_e2e_run), plot the curves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhfc.cli.run import plot_metrics, read_metrics, summarize

ROOT = Path(__file__).resolve().parents[2]


def rlhfc(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "rlhfc"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, **(env or {})})


def test_run_dies_clearly_and_says_how_to_resume(tmp_path):
    out = tmp_path / "grpo"
    died = rlhfc("run", "programs/grpo.rlhf", "--steps", "3", "--save-every", "1", "--out", str(out),
                 env={"RLHFC_FAIL_AT_STEP": "2"})
    assert died.returncode == 1
    message = " ".join(died.stderr.split())
    assert "the run stopped" in message and f"--out {out} --resume" in message
    assert (out / "program.py").exists() and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert (out / "checkpoint" / "latest").read_text() == "2"  # --resume starts after step 2
    png = plot_metrics(out / "metrics.jsonl", tmp_path / "curves.png")  # what --plot writes
    assert png.read_bytes()[:4] == b"\x89PNG"
    resumed = rlhfc("run", "programs/grpo.rlhf", "--steps", "3", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert "3 steps" in resumed.stderr and "reward" in resumed.stderr


def test_summary_compares_first_and_last_steps():
    records = [{"step": i + 1, "time/iteration": 0.1 * (i + 1), "a_tr/loss": 1.0, "reward": i / 10}
               for i in range(30)]
    line = summarize(records)
    assert line.startswith("30 steps, 1.550 s/step (median)")
    assert line.endswith("reward 0.450 (first 10) → 2.450 (last 10)")
    no_reward = summarize([{"step": 1, "time/iteration": 1.0, "a_tr/loss": 4.0}])
    assert no_reward.endswith("loss 4.000 (first 1) → 4.000 (last 1)")
    assert summarize([]) == "no steps recorded"


def test_compile_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.rlhf"
    bad.write_text('model actor = llama(preset = "tiny")\nrun nothing(actor) { batch = 1 }\n')
    done = rlhfc("compile", str(bad), "-o", str(tmp_path / "x.py"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "bad.rlhf:2" in done.stderr
    assert not (tmp_path / "x.py").exists()
