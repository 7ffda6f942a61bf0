"""`rlhfc profile` measures the device a worker computes on. Without a GPU: CUDA timing
is checked against fake CUDA events (record, run, record, wait, read); the measurements
and the collective workers make every tensor on a fake device (`FakeTensorMode`, as in
test_runtime_fake_cuda), so no CPU tensor reaches NCCL; the GPU checks of the command
(processes per GPU, the catalog device) run with CUDA's queries stubbed; and the whole
command runs for real on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from typer.testing import CliRunner

from rlhfc import hardware
from rlhfc.cli import app
from rlhfc.planner.profile import catalog_entry, derive
from rlhfc_runtime import dist as rdist
from rlhfc_runtime import profile
from rlhfc_runtime.profile import Measurement

FAKE = torch.device("cuda", 0) if torch.backends.cuda.is_built() else torch.device("meta")
BIN = Path(sys.executable).parent


class FakeEvent:
    """A CUDA event that logs what is done with it; the end event reads 250 ms after the start."""

    log: list = []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.id = len([e for e in self.log if e[0] == "new"])
        self.log.append(("new", self.id))

    def record(self):
        self.log.append(("record", self.id))

    def synchronize(self):
        self.log.append(("synchronize", self.id))

    def elapsed_time(self, end):
        assert ("synchronize", end.id) in self.log  # read only once the end event completed
        return 250.0


def test_cuda_timing_brackets_the_op_with_events_and_waits_for_the_end(monkeypatch):
    FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    seconds = profile.time_once(lambda: FakeEvent.log.append(("op",)), torch.device("cuda", 0))
    assert seconds == 0.25
    assert FakeEvent.log == [("new", 0), ("new", 1), ("record", 0), ("op",), ("record", 1), ("synchronize", 1)]


def test_cpu_timing_uses_the_host_clock_and_no_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched on the CPU path")

    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    clock = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])
    monkeypatch.setattr(profile.time, "perf_counter", lambda: next(clock))
    calls = []
    # one warm-up call, then three timed: the fastest of 0.5, 0.25 and 1.0 (a slower
    # repeat on a CPU is one the scheduler preempted)
    assert profile.repeat_time(lambda: calls.append(1), torch.device("cpu"), 3) == 0.25
    assert len(calls) == 4


def _on_device(monkeypatch, dtype):
    """time_once replaced by a check that the timed op's result is on FAKE in `dtype`."""
    timed = []

    def check(fn, device):
        out = fn()
        assert device == FAKE and out.device == FAKE and out.dtype == dtype, (out.device, out.dtype)
        timed.append(out.shape)
        return 1e-3

    monkeypatch.setattr(profile, "time_once", check)
    return timed


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_matmul_and_decode_run_on_the_device_in_their_precision(monkeypatch, precision, dtype):
    timed = _on_device(monkeypatch, dtype)
    with FakeTensorMode():
        m = profile.measure_matmul((64, 32, 16), precision, FAKE, repeats=2)
        d = profile.measure_decode(4, 32, 256, precision, FAKE, repeats=2)
    assert (m.what, m.precision, d.what, d.case, d.precision) == ("matmul", precision, "decode", (4, 32, 256), precision)
    assert timed == [(64, 16), (64, 16), (4, 1, 256), (4, 1, 256)]


def test_copies_run_on_the_device(monkeypatch):
    timed = _on_device(monkeypatch, torch.float32)
    with FakeTensorMode():
        copy = profile.measure_copy(1 << 12, FAKE, repeats=1)
    assert copy.case == (1 << 12,) and timed == [(1 << 10,)]


def test_collective_workers_send_device_tensors_only(monkeypatch):
    seen = []
    monkeypatch.setattr(rdist, "device_for_rank", lambda: FAKE)
    monkeypatch.setattr(dist, "all_reduce", lambda t: seen.append(("all_reduce", t.device)))
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(rdist, "exchange", lambda sends=(), recvs=(): seen.extend(("p2p", t.device) for t, _ in sends))
    monkeypatch.setattr(profile, "time_once", lambda fn, device: (fn(), 1e-3)[1])
    with FakeTensorMode():
        assert profile._allreduce_worker((4, 1 << 12), 2) == [1e-3, 1e-3]
        assert profile._p2p_worker((1 << 12,), 2) == [1e-3]
    assert seen == [("all_reduce", FAKE)] * 6 + [("p2p", FAKE)] * 3  # warm-up and two repeats a size


def test_the_cuda_cases_measure_bf16_and_fp32_host_copies_and_links():
    cases = profile.plan_cases(8, torch.device("cuda", 0))
    kinds = {(what, precision) for what, _, precision in cases}
    assert {("matmul", "bf16"), ("matmul", "fp32"), ("host", "fp32"), ("decode", "bf16"), ("p2p", "fp32")} <= kinds
    assert [case[0] for what, case, _ in cases if what == "allreduce"] == [2, 4, 8]
    cpu = profile.plan_cases(1, torch.device("cpu"))
    # one process: no collectives, no host copy; the reference model's layers only on the CPU
    assert {what for what, _, _ in cpu} == {"matmul", "copy", "decode", "layer_train", "layer_forward", "head_train",
                                            "head_forward", "decode_step"}
    assert not {what for what, _, _ in cases} & {"layer_train", "head_train", "decode_step"}


@pytest.mark.parametrize("what, case", [("layer_train", (2, 8)), ("layer_forward", (2, 8)), ("head_train", (4,)),
                                        ("head_forward", (4,)), ("decode_step", (2, 8, 1))])
def test_the_reference_layers_run_as_the_runtime_computes_them(what, case):
    (m,) = profile.run_case(what, case, "fp32", torch.device("cpu"))
    assert (m.what, m.case) == (what, case) and m.seconds > 0


def _gpu_here(monkeypatch, count: int, name: str, memory: int = 141 * 2**30):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"total_memory": memory}))


def test_profile_on_a_gpu_refuses_more_processes_than_gpus(monkeypatch, tmp_path):
    _gpu_here(monkeypatch, 1, "NVIDIA H200")
    done = CliRunner().invoke(app, ["profile", "--devices", "2", "--out", str(tmp_path / "hw.json")])
    assert done.exit_code == 1 and "--devices 2 but 1 GPU(s) here" in done.output and "Traceback" not in done.output
    _gpu_here(monkeypatch, 1, "Tesla T4")
    done = CliRunner().invoke(app, ["profile", "--out", str(tmp_path / "hw.json")])
    assert done.exit_code == 1 and "no catalog device for GPU `Tesla T4`: name one with --base" in done.output
    assert not (tmp_path / "hw.json").exists()


def test_gpu_names_map_to_the_catalog():
    assert catalog_entry("NVIDIA H200", 141 * 2**30) == "H200"
    assert catalog_entry("NVIDIA H100 80GB HBM3", 80 * 2**30) == "H100-80GB"
    assert catalog_entry("NVIDIA A100-SXM4-40GB", 40 * 2**30) == "A100-40GB"
    assert catalog_entry("NVIDIA A100-SXM4-80GB", 80 * 2**30) == "A100-80GB"
    assert catalog_entry("Tesla T4", 16 * 2**30) is None


def test_a_gpu_profile_takes_bf16_peaks_the_slower_host_direction_and_catalog_links_on_one_device():
    ms = [Measurement("matmul", (1024, 1024, 1024), 2e-5, "bf16"), Measurement("matmul", (1024, 1024, 1024), 1e-4),
          Measurement("copy", (1 << 30,), 1e-3), Measurement("h2d", (1 << 30,), 0.05), Measurement("d2h", (1 << 30,), 0.1),
          Measurement("decode", (1, 512, 4096), 1e-4, "bf16"), Measurement("decode", (64, 2048, 4096), 1e-3, "bf16")]
    doc = derive(ms, base="H200")
    assert doc["device"]["flops"] == pytest.approx(2 * 1024**3 / 2e-5) and doc["device"]["achievable"] == 1.0
    assert doc["device"]["host_bandwidth"] == pytest.approx((1 << 30) / 0.1)
    catalog = hardware.CATALOG["H200"].intra_bandwidth
    assert doc["device"]["intra_bandwidth"] == pytest.approx(catalog)  # nothing measured: the catalog's
    assert derive(ms, base="cpu")["device"]["flops"] == pytest.approx(2 * 1024**3 / 1e-4)  # the CPU computes in fp32


def test_profile_command_measures_this_cpu(tmp_path):
    out = tmp_path / "hw.json"
    done = subprocess.run([str(BIN / "rlhfc"), "profile", "--out", str(out)], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    base, figures = hardware.load_profile(out)
    doc = json.loads(out.read_text())
    kinds = {(m["what"], m["precision"]) for m in doc["measurements"]}
    layers = {(what, "fp32") for what in ("layer_train", "layer_forward", "head_train", "head_forward", "decode_step")}
    assert base == "cpu" and kinds == {("matmul", "fp32"), ("copy", "fp32"), ("decode", "fp32"), ("allreduce", "fp32"),
                                       ("p2p", "fp32")} | layers
    assert doc["coefficients"]["compute_efficiency"] != 1.0  # priced at the reference layers' rate
    assert doc["coefficients"]["decode_step_overhead"] > 0  # sampling over the reference vocabulary
    assert all(m["seconds"] > 0 for m in doc["measurements"]) and dict(figures)["intra_bandwidth"] > 0
