"""Bring your own task, end to end on gloo processes: an HF Qwen2 checkpoint directory as
actor, its tokenizer's chat template, a dataset with an `answer` column and a Python
reward that reads it; the reward runs once per row under tensor parallelism; a failing
reward stops the run with its FILE:LINE, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from codegen_fixtures import plan, strategy  # noqa: E402

from rlhfc.backend.emit import emit  # noqa: E402
from rlhfc.backend.lower import lower  # noqa: E402
from rlhfc.driver import compile_program  # noqa: E402
from rlhfc.frontend.check import load_program  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECORDING = '''import json

def exact_match(prompts, completions, answer, **columns):
    with open(__file__ + ".calls", "a") as f:
        f.write(json.dumps({"prompts": prompts, "answer": answer, "a": columns["a"], "n": len(completions)}) + "\\n")
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

def boom(prompts, completions, **columns):
    scores = []
    return [1 / len(scores) for _ in completions]
'''


def math_program(tmp: Path, reward: str, devices: int = 1) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(tmp), "--rows", "20"],
                   check=True, capture_output=True)
    (tmp / "rewards.py").write_text(RECORDING)
    path = tmp / "mine.rlhf"
    path.write_text(f"""import grpo from "stdlib/grpo.rlhf"
cluster {{ nodes = 1  devices_per_node = {devices}  device = "cpu" }}
model actor  = llama("ckpt") {{ trainable  optimizer = adam(lr = 1e-3) }}
model ref    = llama("ckpt")
model reward = {reward}
dataset prompts = jsonl("train.jsonl", field = "question", max_len = 24, chat = true)
run grpo(actor, ref, reward, prompts) {{ batch = 4  group_size = 2  max_new_tokens = 3  steps = 2  seed = 3 }}
""")
    return path


def run(script: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                          timeout=240, env={**os.environ})


def test_python_reward_with_the_answer_column_and_templated_samples(tmp_path):
    path = math_program(tmp_path, 'python("rewards.py:exact_match")')
    _, text = compile_program(path, output=tmp_path / "mine.py")
    (tmp_path / "mine.py").write_text(text)
    done = run(tmp_path / "mine.py", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = {r["question"]: r for r in map(json.loads, (tmp_path / "train.jsonl").read_text().splitlines())}
    calls = [json.loads(ln) for ln in (tmp_path / "rewards.py.calls").read_text().splitlines()]
    assert [c["n"] for c in calls] == [8, 8]  # once per row: 4 prompts x 2 samples per step
    for call in calls:  # columns aligned with the completions, group samples repeated
        assert call["prompts"][0] == call["prompts"][1]
        assert call["answer"] == [rows[p]["answer"] for p in call["prompts"]]
        assert call["a"] == [rows[p]["a"] for p in call["prompts"]]
    samples = [json.loads(ln) for ln in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}
    question = samples[0]["prompt"].split("user\n")[1].split("<|im_end|>")[0]
    assert samples[0]["prompt"] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert samples[0]["answer"] == rows[question]["answer"] and "reward/exact_match" in samples[0]
    metrics = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert "score/reward/exact_match" in metrics[-1]


def test_reward_runs_once_per_row_under_tensor_parallelism(tmp_path):
    path = math_program(tmp_path, 'python("rewards.py:exact_match")', devices=2)
    df = load_program(path)
    tp2, dp2 = strategy(0, 2, dp=1, tp=2), strategy(0, 2, dp=2)
    prog = lower(df, plan(df, {"gen": tp2, "score": tp2, "refl": dp2, "a_tr": tp2}))
    script = tmp_path / "mine.py"
    script.write_text(emit(prog, str(script)))
    done = run(script, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(ln) for ln in (tmp_path / "rewards.py.calls").read_text().splitlines()]
    assert [c["n"] for c in calls] == [8, 8]  # not once per tp rank


def test_failing_reward_stops_with_its_line_not_a_traceback(tmp_path):
    path = math_program(tmp_path, 'python("rewards.py:boom")')
    _, text = compile_program(path, output=tmp_path / "mine.py")
    (tmp_path / "mine.py").write_text(text)
    done = run(tmp_path / "mine.py", tmp_path / "out")
    assert done.returncode != 0
    assert "rewards.py:10: reward `boom` raised ZeroDivisionError: division by zero" in done.stderr
    assert "Traceback" not in done.stderr
