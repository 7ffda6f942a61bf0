"""`rlhfc run` / `rlhfc compile` as a user runs them: compile into the run dir, train,
stop clearly when a worker dies (resume exactness: test_e2e_run), plot the curves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlhfc.cli.run import plot_metrics, read_metrics, recent_sample, summarize

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


def test_the_recent_sample_is_the_last_row_however_long(tmp_path):
    path = tmp_path / "samples.jsonl"
    assert recent_sample(path) is None  # no file yet
    row = {"step": 3, "reward": 0.5, "prompt": "What is\n2+2?", "completion": "4", "completion_ids": [7] * 9000,
           "logprobs": [-0.123456789] * 9000}  # far beyond one 8 KiB chunk
    path.write_text(json.dumps({**row, "step": 2}) + "\n" + json.dumps(row) + "\n")
    assert recent_sample(path) == "  sample step 3 reward 0.50: What is 2+2? → '4'"
    path.write_text(json.dumps(row))  # one row, no newline
    assert recent_sample(path).startswith("  sample step 3 ")


def test_compile_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.rlhf"
    bad.write_text('model actor = llama(preset = "tiny")\nrun nothing(actor) { batch = 1 }\n')
    done = rlhfc("compile", str(bad), "-o", str(tmp_path / "x.py"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "bad.rlhf:2" in done.stderr
    assert not (tmp_path / "x.py").exists()


WHO_RUNS = '''import json, multiprocessing, os

def n(prompts, completions, **columns):
    with open(__file__ + ".pids", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(),
                            "spawned": multiprocessing.parent_process() is not None}) + "\\n")
    return [float(len(c)) for c in completions]
'''


def test_one_device_runs_in_the_program_process_without_a_worker(tmp_path):
    """`--devices 1`: the reward function (run by rank 0) sees the process `rlhfc run`
    started, not a worker spawned below it."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(tmp_path), "--rows", "8"],
                   check=True, capture_output=True)
    (tmp_path / "rewards.py").write_text(WHO_RUNS)
    program = tmp_path / "one.rlhf"
    program.write_text((ROOT / "programs" / "grpo_math.rlhf").read_text().replace("../data/math/", "")
                       .replace('python("rewards.py", exact_match = 1.0, format_ok = 0.2)', 'python("rewards.py:n")')
                       .replace("devices_per_node = 1", "devices_per_node = 2"))
    cli = subprocess.Popen([str(Path(sys.executable).parent / "rlhfc"), "run", str(program), "--devices", "1",
                            "--steps", "2", "--out", str(tmp_path / "out")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _, err = cli.communicate(timeout=240)
    assert cli.returncode == 0, err
    seen = [json.loads(ln) for ln in (tmp_path / "rewards.py.pids").read_text().splitlines()]
    assert len(seen) == 2 and {s["ppid"] for s in seen} == {cli.pid}  # the program, the CLI's own child
    assert not any(s["spawned"] for s in seen) and len({s["pid"] for s in seen}) == 1
