"""bench/gpu_bench.py: the dry run (the GPU script's own code on the CPU, tiny sizes)
writes the schema the GPU run writes, with finite, positive measurements; a device
section that crashes is recorded and the sections after it still run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_bench  # noqa: E402

SCHEMA = {
    "env": {"torch", "cuda", "device", "device_name"},
    "numerics": {"params", "tokens", "logits_max_abs", "fp32_logits_max_abs_err", "bf16_logits_max_abs_err",
                 "hf_bf16_logits_max_abs_err"},
    "train_mfu": {"params", "tokens", "s_per_step", "model_TFLOPs", "peak_TFLOPs", "peak_source", "mfu", "loss_first",
                  "loss_last", "peak_memory_GB"},
    "decode": {"params", "batch", "prompt", "new_tokens", "ours_tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf",
               "same_tokens_as_hf"},
    "host_copy": {"bytes", "pinned", "h2d_GBps", "d2h_GBps"},
    "ppo": {"program", "precision", "steps", "s_per_step", "metric", "first", "last"},
    "sft": {"program", "precision", "steps", "s_per_step", "metric", "first", "last"},
}
ERRORS = {"fp32_logits_max_abs_err": 1e-4, "bf16_logits_max_abs_err": 0.05, "hf_bf16_logits_max_abs_err": 0.05}
REWARDS = {"first", "last"}  # a reward may be 0 at the start


def test_dry_run_writes_the_gpu_schema_with_finite_positive_values(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert (doc["schema_version"], doc["device"], doc["dry_run"]) == (1, "cpu", True)
    assert {name: set(s.get("result", {})) for name, s in doc["sections"].items()} == SCHEMA, doc
    assert all(s["status"] == "ok" and s["seconds"] > 0 for s in doc["sections"].values())
    for name, section in doc["sections"].items():
        for key, value in section["result"].items() if name != "env" else ():  # env: versions and names
            if isinstance(value, bool) or isinstance(value, str):
                continue
            if key == "peak_memory_GB":  # a CUDA allocator figure
                assert value is None
            elif key in ERRORS:
                assert 0 <= value < ERRORS[key], (name, key, value)
            elif key in REWARDS:
                assert math.isfinite(value) and value >= 0, (name, key, value)
            else:
                assert math.isfinite(value) and value > 0, (name, key, value)
    r = {name: s["result"] for name, s in doc["sections"].items()}
    assert r["decode"]["same_tokens_as_hf"] is True  # greedy, same weights
    assert r["ppo"]["precision"] == r["sft"]["precision"] == "bf16" and r["ppo"]["steps"] == 3
    assert r["sft"]["last"] < r["sft"]["first"]  # the SFT loss falls
    assert "env" in done.stdout and f"wrote {tmp_path / 'gpu_bench.json'}" in done.stdout


def test_a_crashing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    (tmp_path / "sections").mkdir()
    (tmp_path / "logs").mkdir()
    children = []

    def child(cmd, log, limit, env):  # stands in for the child process: numerics kills it
        names = cmd[cmd.index("--child") + 1:cmd.index("--out")]
        children.append(names)
        for n in names:
            if n == "numerics":
                log.write_text("Fatal Python error: Segmentation fault\n")
                return -11, False
            (tmp_path / "sections" / f"{n}.json").write_text(json.dumps({"status": "ok", "result": {}, "seconds": 1}))
        return 0, False

    monkeypatch.setattr(gpu_bench, "_bounded", child)
    done = gpu_bench.device_sections(["env", "numerics", "decode"], tmp_path, True, gpu_bench.time.monotonic() + 600, {})
    assert children == [["env", "numerics", "decode"], ["decode"]]
    assert done["env"]["status"] == done["decode"]["status"] == "ok"
    assert done["numerics"]["status"] == "crashed" and "Segmentation fault" in done["numerics"]["error"]
