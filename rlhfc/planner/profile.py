"""`rlhfc profile`: measure this machine's figures the cost model prices with, and write
them as a versioned hardware profile for `rlhfc plan --hardware` and `cluster { hardware = … }`.

What it measures (`rlhfc_runtime.profile`), on the device a worker computes on (the GPU
under CUDA, timed with CUDA events; else the CPU threads one worker of a `--devices`-process
`rlhfc run` computes with, `rlhfc_runtime.contract.cores`):
- matmul throughput by (m, k, n) shape and precision: `flops` is the best rate in the
  precision the device computes in (bf16 on a GPU, as the catalog's peaks; fp32 on the
  CPU), `achievable` the geometric mean over its shapes divided by it;
- memory bandwidth: a large copy within device memory (bytes read + written);
- on a GPU, pinned host↔device copies: `host_bandwidth`, the slower direction;
- collectives: all-reduce time by group size and message size, and one-way
  point-to-point time by message size, over NCCL (CPU: gloo) in processes from
  `rlhfc_runtime.dist.spawn`; a least-squares line t = latency + bytes/bandwidth (for an
  all-reduce, bytes = 2(n−1)/n·size) gives the link bandwidth, and the all-reduces' own
  line `collective_latency`; with one device nothing is measured and both keep defaults;
- decode steps by batch and context: one attention-plus-MLP step over a KV cache; the
  intercept of time against bytes read gives `decode_step_overhead`;
- on the CPU, whole layers of a real model (`rlhfc_runtime.profile.REFERENCE`, SmolLM2-135M's
  shape) as the runtime computes them: a decoder layer's train and forward pass, the
  tiled LM head's, and a layer's decode step. Bare matmuls miss what attention, norms,
  activations and allocation cost (2.7-4.3x optimistic at that shape, issue 22), so
  `compute_efficiency` and `inference_efficiency` are set to reproduce the whole
  model's measured train and forward rates, and `decode_layer_overhead` to what a layer's
  decode step takes beyond its roofline (`layer_coefficients`);
- `cores`: the cores it ran on (`rlhfc_runtime.contract.cores.physical_cores`), so that the cost model knows
  when `cpu` processes outnumber them and share cores.

Bandwidths are stored as the achieved figure divided by the model's default efficiency,
so that the default coefficients reproduce the measurement; `rlhfc calibrate` refines both.
"""

from __future__ import annotations

import math
import platform
import statistics
from dataclasses import asdict, replace

from rlhfc.hardware import CATALOG, PROFILE_SCHEMA_VERSION
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.cost.fit import COEFFICIENTS_SCHEMA_VERSION
from rlhfc_runtime.contract.family import shape_from_hf
from rlhfc_runtime.contract.kinds import Head
from rlhfc_runtime.contract.shapes import inventory
from rlhfc_runtime.profile import ELEMENT_BYTES, REFERENCE, Measurement, decode_bytes


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line, both clamped to be ≥ 0."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx) if sxx else 0.0
    return max(0.0, my - slope * mx), slope


def catalog_entry(gpu_name: str, memory_bytes: int) -> str | None:
    """The catalog device a GPU's name (`torch.cuda.get_device_name`) stands for, or None."""
    for key, entry in (("H200", "H200"), ("H100", "H100-80GB")):
        if key in gpu_name:
            return entry
    if "A100" in gpu_name:
        return "A100-80GB" if memory_bytes > 60 * 2**30 else "A100-40GB"
    return None


def _link(ms: list[Measurement]) -> tuple[float, float]:
    """(all-reduce latency, link bytes/s) from the collective measurements; 0 where none were made."""
    ar = [(2 * (m.case[0] - 1) / m.case[0] * m.case[1], m.seconds) for m in ms if m.what == "allreduce"]
    moved = ar + [(m.case[0], m.seconds) for m in ms if m.what == "p2p"]
    latency = fit_line([x for x, _ in ar], [t for _, t in ar])[0] if ar else 0.0
    per_byte = fit_line([x for x, _ in moved], [t for _, t in moved])[1] if moved else 0.0
    return latency, (1 / per_byte if per_byte else 0.0)


def layer_coefficients(ms: list[Measurement], device: dict) -> dict[str, float]:
    """The coefficients that price `REFERENCE` as its measured layers run on `device`
    (the profile's figures), or {} where no layer was measured (a GPU profile):
    - `compute_efficiency`: 6·N per token at the whole model's measured train rate (its
      layers' and its LM head's seconds per token), over flops × achievable;
    - `inference_efficiency`: the forward rate (2·N per token) over the train rate;
    - `decode_layer_overhead` and `decode_step_overhead`: from the runtime's decode loop
      timed at two layer counts (`decode_step`), a layer's share of a step beyond its
      roofline (the larger of its FLOPs at the forward rate and its weights' and KV
      cache's bytes at the measured bandwidth), and the step's own beyond its LM head's
      roofline: sampling over the vocabulary and the loop's work, so the fixed costs of
      small-batch decoding are priced."""
    got = {m.what: m for m in ms if m.what.startswith(("layer_", "head_"))}
    steps = sorted((m for m in ms if m.what == "decode_step"), key=lambda m: m.case[2])
    if not {"layer_train", "layer_forward", "head_train", "head_forward"} <= got.keys() or len(steps) < 2:
        return {}
    shape = shape_from_hf(REFERENCE)
    n, layers = shape.param_count(Head.LM), shape.n_layers
    per_token = {what: m.seconds / math.prod(m.case) for what, m in got.items()}
    train_rate = 6 * n / (layers * per_token["layer_train"] + per_token["head_train"])
    forward_rate = 2 * n / (layers * per_token["layer_forward"] + per_token["head_forward"])
    inv = inventory(shape, Head.LM)
    layer_params = inv.layer_split + inv.layer_replicated
    few, many = steps[0], steps[-1]
    batch, context, _ = many.case
    per_layer = max(0.0, (many.seconds - few.seconds) / (many.case[2] - few.case[2]))
    step_own = max(0.0, few.seconds - few.case[2] * per_layer)
    kv = 2 * shape.n_kv_heads * shape.head_dim * batch * (context + 1)
    bandwidth = device["mem_bandwidth"] * DEFAULT_COEFFICIENTS.mem_bandwidth_efficiency
    roofline = max(2 * layer_params * batch / forward_rate, 4 * (layer_params + kv) / bandwidth)
    head = shape.vocab * shape.hidden  # tied: the embedding's weights
    head_roofline = max(2 * head * batch / forward_rate, 4 * head / bandwidth)
    return {"compute_efficiency": train_rate / (device["flops"] * device["achievable"]),
            "inference_efficiency": forward_rate / train_rate,
            "decode_layer_overhead": max(0.0, per_layer - roofline),
            "decode_step_overhead": max(DEFAULT_COEFFICIENTS.decode_step_overhead, step_own - head_roofline)}


def derive(ms: list[Measurement], base: str = "cpu", cores: int | None = None) -> dict:
    """The profile document (schema `PROFILE_SCHEMA_VERSION`) from the measurements;
    `cores`: the cores they were measured on (a `cpu` device figure; None: left out)."""
    c = DEFAULT_COEFFICIENTS
    matmuls = [m for m in ms if m.what == "matmul"]
    compute = "fp32" if base == "cpu" else "bf16"
    rates = [2 * math.prod(m.case) / m.seconds for m in matmuls if m.precision == compute]
    rates = rates or [2 * math.prod(m.case) / m.seconds for m in matmuls]
    peak = max(rates)
    copy = next(m for m in ms if m.what == "copy")
    latency, link = _link(ms)
    link = link or CATALOG[base].intra_bandwidth * c.link_efficiency
    dec = [m for m in ms if m.what == "decode"]
    overhead, _ = fit_line([decode_bytes(*m.case, element=ELEMENT_BYTES[m.precision]) for m in dec],
                           [m.seconds for m in dec])
    device = {
        "flops": peak, "achievable": math.exp(statistics.fmean(math.log(r / peak) for r in rates)),
        "mem_bandwidth": 2 * copy.case[0] / copy.seconds / c.mem_bandwidth_efficiency,
        "intra_bandwidth": link / c.link_efficiency, "inter_bandwidth": link / c.link_efficiency,
    }
    host = [m.case[0] / m.seconds for m in ms if m.what in ("h2d", "d2h")]
    if host:
        device["host_bandwidth"] = min(host)
    if cores and base == "cpu":
        device["cores"] = cores  # processes beyond it share cores (`rlhfc.hardware.core_share`)
    coefficients = asdict(replace(c, **{"collective_latency": latency or c.collective_latency,
                                        "decode_step_overhead": overhead or c.decode_step_overhead,
                                        **layer_coefficients(ms, device)}))
    return {
        "schema_version": PROFILE_SCHEMA_VERSION, "base": base, "device": device,
        "coefficients_schema_version": COEFFICIENTS_SCHEMA_VERSION, "coefficients": coefficients,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()},
        "measurements": [{"what": m.what, "case": list(m.case), "seconds": m.seconds, "precision": m.precision}
                         for m in ms],
    }
