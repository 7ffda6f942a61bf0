"""Device measurements for `rlhfc profile`: matmul, memory copy, decode step and
all-reduce timings on this worker's device. The compiler turns them into a hardware
profile (`rlhfc.planner.profile.derive`); only this module touches the device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

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
