"""Analytical time and memory of one call under one strategy: every formula in one place.

Sources:
- FLOPs: 6·N per trained token, 2·N per forward token (Kaplan et al. 2020, "Scaling
  Laws", §2.1), N the exact parameter count of `ModelShape.param_count`.
- Pipeline bubble: a 1F1B pipeline of `pp` stages and `m` micro-batches takes
  (m + pp − 1)/m of the bubble-free time, bubble fraction (pp−1)/(m+pp−1) (Narayanan et
  al. 2021, "Efficient Large-Scale LM Training on GPU Clusters", §2.2). `m` is what the
  plan's token budget makes of the sequences a call really sees (`seen_micro_batches`):
  the budget is the decision memory is priced at, the micro-batch count its consequence.
- Tensor parallel: 2 all-reduces per layer forward, 2 more backward, of the activations
  (Shoeybi et al. 2019, Megatron-LM §3); ring all-reduce moves 2(n−1)/n of the buffer
  per device (Patarasuk & Yuan 2009).
- Data parallel: one ring all-reduce of the fp32 gradients per optimizer step.
- Memory: what the runtime allocates in the call's precision (`rlhfc.planner.cost.memory`,
  fitted to the runtime's measured peaks); 1F1B keeps min(pp − s, m) micro-batches in
  flight on stage s.
- Precision: activations move over tp and reallocated weights in the call's precision
  (2 bytes bf16, 4 fp32); gradients are fp32 (master weights) in either.
- Generation: prefill is compute-bound like inference; each decode step is memory-bound,
  reading the stage's weights and KV cache once per micro-batch (roofline: max of
  compute and bytes/bandwidth; Pope et al. 2022, "Efficiently Scaling Transformer
  Inference"); the runtime decodes its `m` micro-batches one after another through
  the `pp` stages, so a step takes m·pp stage times, as it runs (ReaL pipelines them at
  max(m, pp); this runtime does not). KV cache: 2·layers·kv_heads·
  head_dim·2 bytes per token.
- Another engine (vLLM): its prefill and continuous-batching decode (in place of the
  own loop's), its weight sync, the trainer's recomputation of the log-probs and the
  engine's own memory (weights, KV pool) are `rlhfc.planner.cost.engine`'s.
- Rule rewards (`Model.kind == ModelKind.RULE`) cost nothing and hold no device: they run in the
  driver process between the calls they connect.
- Shared cores: on a local `cpu` cluster with more processes per node than physical
  cores (`cores`, from the profile or the cluster block), each process gets
  cores/devices_per_node of a core, so every term of a call (FLOPs, memory traffic,
  fixed overheads, collectives) takes `core_share` = max(1, devices_per_node/cores)
  times longer (`rlhfc.hardware.core_share`).
- Offload: a frozen model offloaded to host memory between iterations pays its device
  weights over the host link before its call (`reload_seconds`).
- Driver work: an iteration also runs the ops between calls that the schedule does not
  price (data loads, data moves between meshes, rule rewards, copies dropped);
  `iteration_seconds` adds `driver_op_overhead` per such op of the lowered program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhfc.hardware import Device, core_share
from rlhfc.ir import Call, CallKind, Cluster, Head, Model, ModelKind, ModelShape, Strategy
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.engine import decode_terms, engine_of, page_tokens, sync_seconds, transient_bytes
from rlhfc.planner.cost.memory import call_transient, precision_of, resident_bytes
from rlhfc_runtime.contract.budget import micro_batches
from rlhfc_runtime.contract.engines import OWN
from rlhfc_runtime.contract.interfaces import (PRECISION_BYTES, default_precision, recomputes_old_logp,
                                              trainer_recomputes_rollout)
from rlhfc_runtime.contract.layout import stage_layers
from rlhfc_runtime.contract.shapes import inventory


@dataclass(frozen=True)
class CallCost:
    """Estimated seconds of a call and its per-device memory on the fullest device.

    `static_bytes` stays on the mesh for the whole iteration when this call is its
    model's home (weights, grads and optimizer state); `transient_bytes` lives only
    while the call runs (activations, KV cache, a reallocated weight copy).
    """

    seconds: float
    static_bytes: int
    transient_bytes: int
    terms: tuple[tuple[str, float], ...] = ()  # named parts of `seconds` (`rlhfc plan --explain`)

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + self.transient_bytes


FREE = CallCost(0.0, 0, 0)


def stage_params(shape: ModelShape, head: Head, tp: int, pp: int, stage: int) -> int:
    """Parameters one device of pipeline stage `stage` holds, exactly as `layout.shard_slices`
    splits them (the parameter table's tp-split classes divided by tp, replicated ones
    whole; the last stage has its own copy of a tied LM head, whose gradients are summed)."""
    inv = inventory(shape, head)
    n = len(stage_layers(shape.n_layers, pp, stage)) * (inv.layer_split // tp + inv.layer_replicated)
    if stage == 0:
        n += inv.embed // tp
    if stage == pp - 1:
        n += inv.final + (inv.head // tp if inv.head_split else inv.head)
    return n


def device_params(shape: ModelShape, head: Head, tp: int, pp: int) -> int:
    """Parameters on the fullest device of a (tp, pp) layout."""
    return max(stage_params(shape, head, tp, pp, s) for s in range(pp))


def allreduce_seconds(nbytes: float, n: int, bandwidth: float, c: Coefficients) -> float:
    """Ring all-reduce of `nbytes` over `n` devices: 2(n−1)/n·bytes over the link, plus latency."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bandwidth * c.link_efficiency) + c.collective_latency


def dp_bandwidth(strategy: Strategy, device: Device) -> float:
    """A dp group stays inside a node when one pipeline block (dp·tp devices) fits a node."""
    inside = strategy.dp * strategy.tp <= strategy.mesh.n_devices
    return device.intra_bandwidth if inside else device.inter_bandwidth


def flop_rate(device: Device, c: Coefficients, kind: CallKind = CallKind.TRAIN) -> float:
    """FLOP/s that kernels reach on one device: peak × achievable × the fitted correction,
    × `inference_efficiency` for forward-only passes (inference, prefill)."""
    phase = 1.0 if kind is CallKind.TRAIN else c.inference_efficiency
    return device.flops * device.achievable * c.compute_efficiency * phase


def optimizer_steps(call: Call) -> tuple[int, int]:
    """(mini-batches, epochs) of a train call: it takes mini_batches·epochs optimizer
    steps over its batch (PPO's `mini_batches` / `ppo_epochs`; 1 and 1 by default, as the
    runtime does); every other call makes one pass."""
    if call.kind is not CallKind.TRAIN:
        return 1, 1
    return call.mini_batches, max(1, int(call.option("ppo_epochs", 1)))


def seen_len(call: Call) -> float:
    """Positions per sequence the call really computes: with packing, the prompt and the
    expected response (`response_len`, default the whole `gen_len`); padded, all of them."""
    settings = dict(call.settings)
    expected = int(settings.get("response_len", 0))
    if settings.get("packing", "packed") != "packed" or not expected:
        return call.seq_len
    return call.prompt_len + min(expected, call.gen_len)


def seen_micro_batches(call: Call, s: Strategy) -> int:
    """Micro-batches per mini-batch that the call's token budget (`Call.token_budget`,
    the plan's choice) makes of the sequences it really sees (`seen_len`): `Call.n_mbs`
    at the priced lengths, fewer where packing drops what the responses do not use."""
    mini = optimizer_steps(call)[0]
    return micro_batches(math.ceil(call.batch / (s.dp * mini)), seen_len(call), call.token_budget(s))


def _forward_backward_terms(
    shape: ModelShape, n_params: int, tokens: int, s: Strategy, device: Device, c: Coefficients,
    kind: CallKind, width: int, m: int, passes: int = 1, mini_batches: int = 1,
) -> dict[str, float]:
    """Compute plus tensor-parallel communication of `passes` passes over `tokens` in
    `mini_batches` pipelined mini-batches of `m` micro-batches each,
    stretched by the 1F1B factor (m + pp − 1)/m per mini-batch (the stretch is the
    bubble), plus per-micro-batch overheads. Train: 6·N per token and 4 tp all-reduces
    per layer, and with recompute one more forward (2·N, 2 all-reduces) as its own term."""
    train = kind is CallKind.TRAIN
    flops_per_token_param, allreduces_per_layer = (6, 4) if train else (2, 2)
    rate = s.mesh.size * flop_rate(device, c, kind)
    compute = passes * flops_per_token_param * n_params * tokens / rate
    layers = math.ceil(shape.n_layers / s.pp)
    act_bytes = tokens / (s.dp * mini_batches * m) * shape.hidden * width  # one micro-batch
    one_allreduce = allreduce_seconds(act_bytes, s.tp, device.intra_bandwidth, c)
    tp_comm = passes * mini_batches * m * layers * allreduces_per_layer * one_allreduce
    terms = {"compute": compute, "tp": tp_comm}
    if train and s.recompute:
        terms["recompute"] = compute / 3 + tp_comm / 2
    work = sum(terms.values())
    steps = passes * mini_batches * (m + s.pp - 1)
    terms["bubble"] = work * (s.pp - 1) / m
    terms["overhead"] = c.micro_batch_overhead * steps
    return terms


def _own_generate_terms(call: Call, shape: ModelShape, n_params: int, p_dev: int, layers: int, s: Strategy,
                        n_mbs: int, device: Device, c: Coefficients, width: int) -> dict[str, float]:
    """The own loop's prefill and decode of a generate call in `n_mbs` micro-batches (what
    the plan's budget makes of it): prefill over the prompts, then gen_len memory-bound
    decode steps."""
    # The runtime decodes its m micro-batches one after another, each through every stage
    # (`runtime/generate.py`): a step takes m·pp stage times, m·(pp − 1) of them waiting.
    terms = _forward_backward_terms(shape, n_params, call.batch * call.prompt_len, s, device, c, call.kind, width,
                                    n_mbs)
    # rows leave the batch when they end: on average response / gen_len of them are live
    live = (seen_len(call) - call.prompt_len) / max(call.gen_len, 1)
    seqs_mb = math.ceil(call.batch / (s.dp * n_mbs)) * live
    kv_per_token = 2 * layers * (shape.n_kv_heads // s.tp) * shape.head_dim * width
    mean_context = call.prompt_len + (seen_len(call) - call.prompt_len) / 2
    stage_flops = 2 * p_dev * seqs_mb / flop_rate(device, c, call.kind)
    stage_bytes = (width * p_dev + kv_per_token * seqs_mb * mean_context) / (device.mem_bandwidth * c.mem_bandwidth_efficiency)
    tp_comm = layers * 2 * allreduce_seconds(seqs_mb * shape.hidden * width, s.tp, device.intra_bandwidth, c)
    fixed = c.decode_step_overhead + c.decode_layer_overhead * layers  # kernel launches, sampling
    stage = max(stage_flops, stage_bytes) + tp_comm + fixed
    steps = call.gen_len * n_mbs
    terms["decode_memory" if stage_bytes >= stage_flops else "decode_compute"] = steps * max(stage_flops, stage_bytes)
    terms["tp"] += steps * tp_comm
    terms["decode_overhead"] = steps * fixed
    terms["bubble"] += call.gen_len * n_mbs * (s.pp - 1) * stage
    return terms


def call_cost(
    call: Call, model: Model, s: Strategy, cluster: Cluster, device: Device, c: Coefficients,
    is_home: bool,
) -> CallCost:
    """Time and memory of `call` under strategy `s`; `is_home` puts the model's resident
    state (train: fp32 master weights + Adam; frozen: weights) in `static_bytes`."""
    if model.kind == ModelKind.RULE or model.shape is None:
        return FREE
    share = core_share(cluster, device)
    shape = model.shape
    n_params = shape.param_count(model.head)
    p_dev = device_params(shape, model.head, s.tp, s.pp)
    layers = math.ceil(shape.n_layers / s.pp)
    precision = precision_of(call, default_precision(device.name))
    width = PRECISION_BYTES[precision]
    tokens = call.batch * seen_len(call)
    mini_batches, epochs = optimizer_steps(call)
    tokens_mb, n_mbs = call.token_budget(s), call.n_mbs(s)  # the plan's budget, its micro-batches
    resident, transient = call_memory(call, model, s, tokens_mb, is_home, precision)

    if call.kind is CallKind.TRAIN:
        terms = _forward_backward_terms(shape, n_params, tokens, s, device, c, call.kind, width,
                                        seen_micro_batches(call, s), epochs, mini_batches)
        updates = epochs * mini_batches
        terms["dp"] = updates * allreduce_seconds(4 * p_dev, s.dp, dp_bandwidth(s, device), c)  # fp32 grads
        # Adam reads and writes weights, grads and both moments (fp32): 2 × 16 bytes per parameter
        terms["optimizer"] = updates * 32 * p_dev / (device.mem_bandwidth * c.mem_bandwidth_efficiency)
        if recomputes_old_logp(dict(call.settings)):  # off_policy: one forward over the batch first
            terms["old_logp"] = sum(_forward_backward_terms(shape, n_params, tokens, s, device, c,
                                                            CallKind.INFERENCE, width, n_mbs).values())
        return _split(terms, resident, transient, is_home, share)

    if call.kind is CallKind.INFERENCE:
        terms = _forward_backward_terms(shape, n_params, tokens, s, device, c, call.kind, width,
                                        seen_micro_batches(call, s))
        return _split(terms, resident, transient, is_home, share)

    if engine_of(call) == OWN:
        terms = _own_generate_terms(call, shape, n_params, p_dev, layers, s, n_mbs, device, c, width)
    else:  # vLLM's prefill and continuous-batching decode (`cost.engine.decode_terms`)
        terms = decode_terms(call, shape, model.head, s, device, c, width, seen_len(call) - call.prompt_len,
                             lambda nbytes: allreduce_seconds(nbytes, s.tp, device.intra_bandwidth, c))
    if engine_of(call) != OWN:  # vLLM: its sync, the trainer's recompute and its memory (`cost.engine`)
        terms["engine_sync"] = sync_seconds(shape, model.head, s, device, c, width,
                                            stage_params(shape, model.head, s.tp, s.pp, 0))
        if trainer_recomputes_rollout(dict(call.settings)):  # else the train call's `old_logp` prices it
            terms["engine_recompute"] = sum(_forward_backward_terms(shape, n_params, call.batch * call.seq_len, s,
                                                                    device, c, CallKind.INFERENCE, width, n_mbs).values())
        transient = transient_bytes(call, shape, model.head, s, precision, page_tokens(device))
    return _split(terms, resident, transient, is_home, share)


def call_memory(call: Call, model: Model, s: Strategy, tokens_mb: int, is_home: bool,
                precision: str) -> tuple[int, int]:
    """(resident, transient) bytes of the fullest device of the layout: the pipeline
    stage whose sum is largest (`rlhfc.planner.cost.memory` prices each stage)."""
    trainable_home = is_home and model.trainable
    best = (0, 0)
    for stage in range(s.pp):
        p = stage_params(model.shape, model.head, s.tp, s.pp, stage)
        resident = resident_bytes(p, trainable_home, precision)
        transient = math.ceil(call_transient(call, model.shape, model.head, s, tokens_mb, stage, p, precision))
        if resident + transient > sum(best):
            best = (resident, transient)
    return best


def _split(terms: dict[str, float], resident: int, transient: int, is_home: bool, share: float = 1.0) -> CallCost:
    """A home call keeps its resident bytes for the iteration; any other call holds a copy.
    Every term is stretched by `share`, the processes per core of an oversubscribed CPU node."""
    named = tuple((k, v * share) for k, v in terms.items())
    seconds = sum(v for _, v in named)
    if is_home:
        return CallCost(seconds, int(resident), int(transient), named)
    return CallCost(seconds, 0, int(resident + transient), named)


def transfer_seconds(call: Call, cluster: Cluster, device: Device, c: Coefficients) -> float:
    """Moving one data key of `call` (a value per token of every sequence) into it from a
    call in another layout, over the slowest link of the cluster (the volume is a few MB);
    with `move_latency`, what the receiving devices spend on it before the call."""
    if cluster.n_devices <= 1:
        return 0.0
    link = device.inter_bandwidth if cluster.nodes > 1 else device.intra_bandwidth
    return call.batch * call.seq_len * c.key_bytes_per_token / (link * c.link_efficiency)


def reload_seconds(weight_bytes: int, device: Device) -> float:
    """Bringing an offloaded model's weights back from host memory: bytes over the host
    link (PCIe share per device; ReaL, Mei et al. 2024, offloads frozen models this way)."""
    return weight_bytes / device.host_bandwidth


def iteration_seconds(scheduled: float, driver_ops: int, c: Coefficients) -> float:
    """An iteration's estimate: the schedule's makespan plus the driver's own work, a fixed
    `driver_op_overhead` per op that the schedule does not price (`driver_ops`)."""
    return scheduled + driver_ops * c.driver_op_overhead
