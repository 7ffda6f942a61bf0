"""Device measurements for `rlhfc profile` (and `bench/gpu_bench.py`): matmul by shape
and precision, memory bandwidth, pinned host<->device copies, a decode step, and
all-reduce and point-to-point time by message size, on this worker's device
(`device_for_rank()`: its GPU under CUDA, else the CPU). The compiler turns them into a
hardware profile (`rlhfc.planner.profile.derive`); only this module touches the device.

Timing: on CUDA every repeat is bracketed by two CUDA events on the current stream and
read once the end event has completed, so asynchronous kernels are timed where they run
(a host clock would see only the launch); on the CPU, `time.perf_counter`. Every tensor
is made on the measured device, so under the "cpu:gloo,cuda:nccl" world a collective of
CUDA tensors goes over NCCL and a CPU run's over gloo; no CPU tensor meets NCCL.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

# element sizes and torch dtype names of the precisions measured
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Sizes:
    """What one kind of device is measured with: large enough that a GPU is not timed
    on launch overhead, small enough that a CPU finishes in seconds."""

    matmul: tuple[tuple[int, int, int], ...]
    precisions: tuple[str, ...]  # matmul precisions; the first is what the device computes in
    copy_bytes: int
    decode: tuple[tuple[int, int], ...]  # (batch, context)
    decode_hidden: int
    messages: tuple[int, ...]  # collective and p2p bytes
    # Whole layers of `REFERENCE`, as the runtime computes them (CPU only: there bare
    # matmuls miss what attention, norms, activations and allocation cost):
    layer: tuple[int, int] = ()  # (rows, positions) of a train and a forward pass
    head_tokens: int = 0  # positions of the tiled LM head (log-prob and entropy)
    decode_step: tuple[int, int] = ()  # (batch, context) of the decode loop's steps
    decode_step_layers: tuple[int, ...] = ()  # the layer counts its steps are timed at


SIZES = {
    # CPU matmuls at the sizes a model's layers run (tokens x hidden x width): tiny ones
    # measure thread wake-ups, which put the achievable rate an order of magnitude low
    "cpu": Sizes(matmul=((256, 512, 512), (512, 512, 1024), (512, 1024, 512), (1024, 1024, 1024)),
                 precisions=("fp32",), copy_bytes=64 << 20, decode=((1, 32), (8, 32), (8, 256), (32, 256)),
                 decode_hidden=256, messages=(4, 64 << 10, 1 << 20, 4 << 20),
                 layer=(16, 64), head_tokens=256, decode_step=(32, 48), decode_step_layers=(2, 8)),
    "cuda": Sizes(matmul=((1024, 1024, 1024), (4096, 4096, 4096), (8192, 8192, 8192), (4096, 8192, 28672)),
                  precisions=("bf16", "fp32"), copy_bytes=1 << 30,
                  decode=((1, 512), (16, 512), (64, 2048), (128, 4096)), decode_hidden=4096,
                  messages=(4, 1 << 20, 16 << 20, 256 << 20)),
}


DECODE_STEPS = 6  # tokens of the longer of `measure_decode_step`'s two runs

# The real model whose layers a CPU profile times: SmolLM2-135M's shape (llama, GQA,
# SiLU MLP, vocabulary 49,152), a small model of the size CPU runs train.
REFERENCE = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
)


@dataclass(frozen=True)
class Measurement:
    """One measured case: what was run, at which precision, and its seconds (`repeat_time`)."""

    what: str
    case: tuple[int, ...]
    seconds: float
    precision: str = "fp32"


def sizes_for(device) -> Sizes:
    return SIZES["cuda" if device.type == "cuda" else "cpu"]


def synchronize(device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, device) -> float:
    """Seconds one `fn()` takes on `device`: CUDA events around it on CUDA, else the host clock."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # milliseconds
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat_time(fn, device, repeats: int) -> float:
    """Seconds of `fn()` after one warm-up call: the median of `repeats` on a GPU (timed by
    its own events), the fastest on the CPU, where a repeat the scheduler preempted (other
    processes on the same cores) measures the neighbours, not the machine."""
    fn()
    synchronize(device)
    times = [time_once(fn, device) for _ in range(repeats)]
    return statistics.median(times) if device.type == "cuda" else min(times)


def _dtype(precision: str):
    import torch

    return getattr(torch, _DTYPES[precision])


def measure_matmul(shape: tuple[int, int, int], precision: str, device, repeats: int = 10) -> Measurement:
    import torch

    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=_dtype(precision))
    b = torch.randn(k, n, device=device, dtype=_dtype(precision))
    return Measurement("matmul", shape, repeat_time(lambda: a @ b, device, repeats), precision)


def measure_copy(nbytes: int, device, repeats: int = 5) -> Measurement:
    """A copy within device memory: `nbytes` read and `nbytes` written."""
    import torch

    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return Measurement("copy", (nbytes,), repeat_time(lambda: dst.copy_(src), device, repeats))


def measure_host_copy(nbytes: int, device, repeats: int = 5) -> list[Measurement]:
    """Host to device ("h2d") and back ("d2h") through pinned host memory (pinned only
    where there is a device to pin for: on the CPU both ends are host memory)."""
    import torch

    host = torch.empty(nbytes // 4, pin_memory=device.type == "cuda")
    dev = torch.empty(nbytes // 4, device=device)
    return [Measurement("h2d", (nbytes,), repeat_time(lambda: dev.copy_(host, non_blocking=True), device, repeats)),
            Measurement("d2h", (nbytes,), repeat_time(lambda: host.copy_(dev, non_blocking=True), device, repeats))]


def measure_decode(batch: int, context: int, hidden: int, precision: str, device, repeats: int = 10) -> Measurement:
    """One decoder-layer step of `batch` sequences over a `context`-token KV cache."""
    import torch

    heads, dtype = max(4, hidden // 128), _dtype(precision)
    x = torch.randn(batch, 1, hidden, device=device, dtype=dtype)
    wqkv, wo = (torch.randn(hidden, 3 * hidden, device=device, dtype=dtype),
                torch.randn(hidden, hidden, device=device, dtype=dtype))
    w_up, w_down = (torch.randn(hidden, 4 * hidden, device=device, dtype=dtype),
                    torch.randn(4 * hidden, hidden, device=device, dtype=dtype))
    kv = torch.randn(2, batch, heads, context, hidden // heads, device=device, dtype=dtype)

    def step():
        q, _, _ = (x @ wqkv).split(hidden, dim=-1)
        q = q.view(batch, 1, heads, -1).transpose(1, 2)
        att = torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])
        h = x + att.transpose(1, 2).reshape(batch, 1, hidden) @ wo
        return h + torch.relu(h @ w_up) @ w_down

    return Measurement("decode", (batch, context, hidden), repeat_time(step, device, repeats), precision)


def _small_weights(module):
    """`module` with norms at 1 and small random weights: uninitialised memory may hold
    denormals, which CPUs compute slowly."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    return module


def _reference_layer(device):
    """Layer 0 of `REFERENCE` as the runtime builds it (tp = pp = 1), `_small_weights`."""
    import torch

    from rlhfc_runtime.contract.family import shape_from_hf
    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.dist import rank_groups
    from rlhfc_runtime.layers import DecoderLayer
    from rlhfc_runtime.rope import RopeTables, layer_type

    shape = shape_from_hf(REFERENCE)
    layer = _small_weights(DecoderLayer(shape, rank_groups(Layout((0,), 1, 1, 1), 0), 0, device, torch.float32))
    ropes = RopeTables(shape, REFERENCE)
    return layer, lambda positions: ropes.tables(positions, torch.float32)[layer_type(shape, 0)]


def measure_layer(rows: int, positions: int, train: bool, device, repeats: int = 3) -> Measurement:
    """A train (forward + backward) or forward pass of one real decoder layer over `rows`
    sequences of `positions` tokens, under the dense mask packed rows attend with."""
    import torch

    from rlhfc_runtime.layers import attention_mask_4d

    layer, rope = _reference_layer(device)
    x = torch.randn(rows, positions, layer.shape.hidden, device=device, requires_grad=train)
    cos_sin = rope(torch.arange(positions, device=device).expand(rows, -1))
    mask = attention_mask_4d(torch.ones(rows, positions, dtype=torch.bool, device=device), 0, positions)

    def step():
        if train:
            layer(x, cos_sin, lambda window: mask).sum().backward()
        else:
            with torch.no_grad():
                layer(x, cos_sin, lambda window: mask)

    return Measurement("layer_train" if train else "layer_forward", (rows, positions),
                       repeat_time(step, device, repeats))


def measure_head(tokens: int, train: bool, device, repeats: int = 3) -> Measurement:
    """The tiled LM head of `REFERENCE` (`rlhfc_runtime.logits`: log-prob and entropy of
    `tokens` positions over the whole vocabulary), forward or forward + backward."""
    import torch

    from rlhfc_runtime.logits import token_stats

    vocab, hidden = REFERENCE["vocab_size"], REFERENCE["hidden_size"]
    weight = (0.02 * torch.randn(vocab, hidden, device=device)).requires_grad_(train)
    h = torch.randn(tokens, hidden, device=device, requires_grad=train)
    ids = torch.randint(vocab, (tokens,), device=device)

    def step():
        if train:
            logp, entropy = token_stats(h, weight, ids, 0.0)
            (logp.sum() + entropy.sum()).backward()
        else:
            with torch.no_grad():
                token_stats(h, weight, ids, 0.0)

    return Measurement("head_train" if train else "head_forward", (tokens,), repeat_time(step, device, repeats))


def measure_decode_step(batch: int, context: int, layers: int, device, repeats: int = 3) -> Measurement:
    """One step of the runtime's own decode loop (`generate`) on `REFERENCE` cut to
    `layers` layers: `batch` rows over a `context`-token prompt, sampled over the whole
    vocabulary, no EOS. A step is the difference of 1 and `DECODE_STEPS` generated tokens
    (the prefill cancels): its layers, its LM head and sampling, and the loop's own work
    (positions, masks, RoPE tables, the cache's bookkeeping), which no single kernel
    shows. Steps at two layer counts part a layer's share from the step's own: a layer
    timed alone keeps its weights in cache, a model's layers stream theirs from memory."""
    import torch

    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.dist import rank_groups
    from rlhfc_runtime.generate import SamplingParams, generate
    from rlhfc_runtime.model import ModelConfig, ShardedDecoder

    cfg = ModelConfig.from_hf(dict(REFERENCE, num_hidden_layers=layers))
    model = _small_weights(ShardedDecoder(cfg, rank_groups(Layout((0,), 1, 1, 1), 0), "lm", device, torch.float32))
    ids = torch.randint(3, REFERENCE["vocab_size"], (batch, context), device=device)
    mask = torch.ones_like(ids)

    def run(tokens: int) -> float:
        params = SamplingParams(max_new_tokens=tokens, greedy=False, eos_token_id=None)
        return repeat_time(lambda: generate(model, ids, mask, params), device, repeats)

    return Measurement("decode_step", (batch, context, layers), (run(DECODE_STEPS) - run(1)) / (DECODE_STEPS - 1))


def decode_bytes(batch: int, context: int, hidden: int = SIZES["cpu"].decode_hidden, element: int = 4) -> int:
    """Bytes one `measure_decode` step reads: its weights and the KV cache."""
    return element * (3 * hidden * hidden + hidden * hidden + 8 * hidden * hidden + 2 * batch * context * hidden)


def _allreduce_worker(sizes: tuple[int, ...], repeats: int) -> list[float]:
    import torch
    import torch.distributed as dist

    from rlhfc_runtime.dist import device_for_rank

    device = device_for_rank()
    out = []
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // 4), device=device)
        dist.all_reduce(t)  # warm-up (and NCCL's communicator)
        times = []
        for _ in range(repeats):
            dist.barrier()
            times.append(time_once(lambda: dist.all_reduce(t), device))
        out.append(statistics.median(times))
    return out


def _p2p_worker(sizes: tuple[int, ...], repeats: int) -> list[float]:
    """Rank 0 sends each message to rank 1 (one batched isend / irecv, as the runtime's
    data moves and reallocations do); both ranks time it, the slower counts."""
    import torch
    import torch.distributed as dist

    from rlhfc_runtime.dist import device_for_rank, exchange

    device, rank = device_for_rank(), dist.get_rank()
    out = []
    for nbytes in sizes:
        t = torch.zeros(max(1, nbytes // 4), device=device)

        def move():
            if rank == 0:
                exchange(sends=[(t, 1)])
            else:
                exchange(recvs=[(t, 0)])

        move()  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier()
            times.append(time_once(move, device))
        out.append(statistics.median(times))
    return out


def measure_allreduce(n: int, sizes: tuple[int, ...], repeats: int = 10) -> list[Measurement]:
    """All-reduce medians over `n` spawned processes (the slowest rank's median per size)."""
    from rlhfc_runtime.dist import spawn

    per_rank = spawn(_allreduce_worker, n, sizes, repeats)
    return [Measurement("allreduce", (n, b), max(r[i] for r in per_rank)) for i, b in enumerate(sizes)]


def measure_p2p(sizes: tuple[int, ...], repeats: int = 10) -> list[Measurement]:
    """One-way point-to-point medians between two spawned processes."""
    from rlhfc_runtime.dist import spawn

    per_rank = spawn(_p2p_worker, 2, sizes, repeats)
    return [Measurement("p2p", (b,), max(r[i] for r in per_rank)) for i, b in enumerate(sizes)]


def plan_cases(devices: int, device) -> list[tuple[str, tuple, str]]:
    """What to measure on `device`, in order, as (what, case, precision): every case is
    one step of the progress bar. Collectives need `devices` ≥ 2 processes."""
    s = sizes_for(device)
    groups = [n for n in (2, 4, 8, 16) if n <= devices]
    compute = s.precisions[0]
    return ([("matmul", shape, p) for p in s.precisions for shape in s.matmul] + [("copy", (s.copy_bytes,), "fp32")]
            + ([("host", (s.copy_bytes,), "fp32")] if device.type == "cuda" else [])
            + [("decode", (b, c, s.decode_hidden), compute) for b, c in s.decode]
            + ([(what, s.layer, "fp32") for what in ("layer_train", "layer_forward")]
               + [(what, (s.head_tokens,), "fp32") for what in ("head_train", "head_forward")]
               + [("decode_step", (*s.decode_step, n), "fp32") for n in s.decode_step_layers] if s.layer else [])
            + [("allreduce", (n, *s.messages), "fp32") for n in groups]
            + ([("p2p", s.messages, "fp32")] if devices >= 2 else []))


def run_case(what: str, case: tuple, precision: str, device) -> list[Measurement]:
    if what == "matmul":
        return [measure_matmul(case, precision, device)]
    if what == "copy":
        return [measure_copy(case[0], device)]
    if what == "host":
        return measure_host_copy(case[0], device)
    if what == "decode":
        return [measure_decode(*case, precision, device)]
    if what in ("layer_train", "layer_forward"):
        return [measure_layer(*case, what == "layer_train", device)]
    if what in ("head_train", "head_forward"):
        return [measure_head(case[0], what == "head_train", device)]
    if what == "decode_step":
        return [measure_decode_step(*case, device)]
    if what == "allreduce":
        return measure_allreduce(case[0], case[1:])
    return measure_p2p(case)
