"""`rlhfc profile`: measure this machine's figures the cost model prices with, and write
them as a versioned hardware profile for `rlhfc plan --hardware` and `cluster { hardware = … }`.

What it measures, per worker process (one thread each, as `rlhfc run` workers are):
- matmul throughput by (m, k, n) shape: `flops` is the best, `achievable` the geometric
  mean over the shapes divided by it;
- memory bandwidth: a large tensor copy (bytes read + written);
- collectives: all-reduce time by group size and message size over gloo (CUDA: NCCL) in
  processes from `rlhfc_runtime.dist.spawn`; a least-squares line t = latency +
  2(n−1)/n·bytes/bandwidth gives `collective_latency` and the link bandwidth;
- decode steps by batch and context: one attention-plus-MLP step over a KV cache; the
  intercept of time against bytes read gives `decode_step_overhead`;
- `cores`: the cores it ran on (`os.sched_getaffinity`), so that the cost model knows
  when `cpu` processes outnumber them and share cores.

Bandwidths are stored as the achieved figure divided by the model's default efficiency,
so that the default coefficients reproduce the measurement; `rlhfc calibrate` refines both.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import asdict, replace

from rlhfc.hardware import CATALOG, PROFILE_SCHEMA_VERSION
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.fit import COEFFICIENTS_SCHEMA_VERSION
from rlhfc_runtime.profile import Measurement, decode_bytes


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, both clamped to be ≥ 0."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx) if sxx else 0.0
    return max(0.0, my - slope * mx), slope


def physical_cores() -> int:
    """The cores this process may run on (its CPU affinity; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def derive(ms: list[Measurement], base: str = "cpu", cores: int | None = None) -> dict:
    """The profile document (schema `PROFILE_SCHEMA_VERSION`) from the measurements;
    `cores`: the cores they were measured on (a `cpu` device figure; None: left out)."""
    c = DEFAULT_COEFFICIENTS
    rates = [2 * math.prod(m.case) / m.seconds for m in ms if m.what == "matmul"]
    peak = max(rates)
    copy = next(m for m in ms if m.what == "copy")
    mem_bw = 2 * copy.case[0] / copy.seconds
    ar = [m for m in ms if m.what == "allreduce"]
    latency, per_byte = fit_line([2 * (m.case[0] - 1) / m.case[0] * m.case[1] for m in ar], [m.seconds for m in ar])
    link = 1 / per_byte if per_byte else CATALOG[base].intra_bandwidth * c.link_efficiency
    dec = [m for m in ms if m.what == "decode"]
    overhead, _ = fit_line([decode_bytes(*m.case) for m in dec], [m.seconds for m in dec])
    device = {
        "flops": peak, "achievable": math.exp(statistics.fmean(math.log(r / peak) for r in rates)),
        "mem_bandwidth": mem_bw / c.mem_bandwidth_efficiency,
        "intra_bandwidth": link / c.link_efficiency, "inter_bandwidth": link / c.link_efficiency,
    }
    if cores and base == "cpu":
        device["cores"] = cores  # processes beyond it share cores (`rlhfc.hardware.core_share`)
    coefficients = asdict(replace(c, collective_latency=latency or c.collective_latency,
                                  decode_step_overhead=overhead or c.decode_step_overhead))
    return {
        "schema_version": PROFILE_SCHEMA_VERSION, "base": base, "device": device,
        "coefficients_schema_version": COEFFICIENTS_SCHEMA_VERSION, "coefficients": coefficients,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        "measurements": [{"what": m.what, "case": list(m.case), "seconds": m.seconds} for m in ms],
    }
