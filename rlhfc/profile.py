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

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rlhfc.cli import app
from rlhfc.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.cost.fit import COEFFICIENTS_SCHEMA_VERSION
from rlhfc.hardware import CATALOG, PROFILE_SCHEMA_VERSION

MATMUL_SHAPES: tuple[tuple[int, int, int], ...] = (
    (64, 64, 64), (256, 64, 128), (512, 128, 128), (512, 256, 256), (1024, 512, 512),
)
MESSAGE_BYTES: tuple[int, ...] = (4, 64 << 10, 1 << 20, 4 << 20)
DECODE_CASES: tuple[tuple[int, int], ...] = ((1, 32), (8, 32), (8, 256), (32, 256))  # (batch, context)
DECODE_HIDDEN = 256
COPY_BYTES = 64 << 20


@dataclass(frozen=True)
class Measurement:
    """One measured case: what was run and its median seconds."""

    what: str
    case: tuple[int, ...]
    seconds: float


def _median_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call (the machine is shared and noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_matmul(shape: tuple[int, int, int], repeats: int = 10) -> Measurement:
    import torch

    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    return Measurement("matmul", shape, _median_time(lambda: a @ b, repeats))


def measure_copy(nbytes: int = COPY_BYTES, repeats: int = 5) -> Measurement:
    import torch

    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    return Measurement("copy", (nbytes,), _median_time(lambda: dst.copy_(src), repeats))


def measure_decode(batch: int, context: int, hidden: int = DECODE_HIDDEN, repeats: int = 10) -> Measurement:
    """One decoder-layer step of `batch` sequences over a `context`-token KV cache."""
    import torch

    heads = 4
    x = torch.randn(batch, 1, hidden)
    wqkv, wo = torch.randn(hidden, 3 * hidden), torch.randn(hidden, hidden)
    w_up, w_down = torch.randn(hidden, 4 * hidden), torch.randn(4 * hidden, hidden)
    kv = torch.randn(2, batch, heads, context, hidden // heads)

    def step():
        q, _, _ = (x @ wqkv).split(hidden, dim=-1)
        q = q.view(batch, 1, heads, -1).transpose(1, 2)
        att = torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])
        h = x + att.transpose(1, 2).reshape(batch, 1, hidden) @ wo
        return h + torch.relu(h @ w_up) @ w_down

    return Measurement("decode", (batch, context), _median_time(step, repeats))


def decode_bytes(batch: int, context: int, hidden: int = DECODE_HIDDEN) -> int:
    """fp32 bytes one `measure_decode` step reads: its weights and the KV cache."""
    return 4 * (3 * hidden * hidden + hidden * hidden + 8 * hidden * hidden + 2 * batch * context * hidden)


def _allreduce_worker(sizes: tuple[int, ...], repeats: int) -> list[float]:
    import torch
    import torch.distributed as dist

    out = []
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // 4))
        dist.all_reduce(t)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    return out


def measure_allreduce(n: int, sizes: tuple[int, ...] = MESSAGE_BYTES, repeats: int = 10) -> list[Measurement]:
    """All-reduce medians over `n` spawned processes (the slowest rank's median per size)."""
    from rlhfc_runtime.dist import spawn

    per_rank = spawn(_allreduce_worker, n, sizes, repeats)
    return [Measurement("allreduce", (n, b), max(r[i] for r in per_rank)) for i, b in enumerate(sizes)]


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


def plan_cases(devices: int) -> list[tuple[str, tuple]]:
    """What to measure, in order: every case is one step of the progress bar."""
    groups = [n for n in (2, 4, 8, 16) if n <= devices]
    return ([("matmul", s) for s in MATMUL_SHAPES] + [("copy", (COPY_BYTES,))]
            + [("decode", d) for d in DECODE_CASES] + [("allreduce", (n,)) for n in groups])


def run_case(what: str, case: tuple) -> list[Measurement]:
    if what == "matmul":
        return [measure_matmul(case)]
    if what == "copy":
        return [measure_copy(*case)]
    if what == "decode":
        return [measure_decode(*case)]
    return measure_allreduce(case[0])


@app.command("profile")
def profile_command(
    devices: int = typer.Option(2, "--devices", help="largest process group to measure collectives over (≥ 2)"),
    out: Path = typer.Option(Path("hw.json"), "--out", help="where to write the hardware profile (JSON)"),
) -> None:
    """Measure matmul, memory, collective and decode-step speed here; write a hardware profile."""
    import torch

    err = Console(stderr=True)
    if devices < 2:
        err.print("error: --devices must be at least 2 (collectives need two processes)")
        raise typer.Exit(1)
    torch.set_num_threads(1)  # as one `rlhfc run` worker
    cases = plan_cases(devices)
    measured: list[Measurement] = []
    columns = [TextColumn("[bold]profile"), BarColumn(bar_width=24), TextColumn("{task.description}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("", total=len(cases))
        for what, case in cases:
            bar.update(task, description=f"{what} {'x'.join(map(str, case))}")
            measured += run_case(what, case)
            bar.advance(task)
    doc = derive(measured, cores=physical_cores())
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    d, c = doc["device"], doc["coefficients"]
    err.print(f"matmul {d['flops'] / 1e9:.1f} GFLOP/s peak ({d['achievable']:.0%} on average), "
              f"memory {d['mem_bandwidth'] * DEFAULT_COEFFICIENTS.mem_bandwidth_efficiency / 1e9:.1f} GB/s, "
              f"all-reduce {c['collective_latency'] * 1e6:.0f} µs + "
              f"{d['intra_bandwidth'] * DEFAULT_COEFFICIENTS.link_efficiency / 1e9:.2f} GB/s, "
              f"decode step overhead {c['decode_step_overhead'] * 1e6:.0f} µs, "
              f"{d.get('cores', '?')} cores")
    err.print(f"wrote {out}; use it with `rlhfc plan --hardware {out}` or `cluster {{ hardware = \"{out}\" }}`")
