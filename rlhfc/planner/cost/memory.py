"""Device memory of one call, priced as the runtime allocates it (the figure
`peak_bytes/CALL` measures), for the call's `precision` setting.

What a model copy holds between calls (`resident_bytes`):
- a trainable model's home: fp32 master weights and Adam's two fp32 moments, 12 bytes
  per parameter in either precision (bf16 training runs under autocast over the fp32
  weights); gradients exist only while its train call runs (the runtime frees them after
  it), so they are part of the train call's transient bytes;
- any other copy (a frozen model, a trainable model's copy on another layout): its
  weights in the call's precision (4 bytes fp32, 2 bf16).

What a call adds while it runs (`transient_bytes`), per device of pipeline stage s:
- train: `params`·(stage parameters) for gradients, bf16 weight casts and optimizer
  temporaries; activations of the micro-batches 1F1B keeps in flight, min(pp − s, n_mbs),
  each `layer_hidden`·tokens·hidden + `layer_inter`·tokens·intermediate/tp per layer (no
  sequence parallelism: the residual stream is whole on every tp rank); the last stage's
  head: `head_hidden`·tokens·hidden + `head_vocab`·tokens·vocab/tp (1 for a value head).
  With recompute a layer keeps `recompute_boundary`·tokens·hidden (its input) and one
  layer's full set lives while it is recomputed (`recompute_layer`·tokens·inter/tp).
- inference: one micro-batch's forward transient (one layer at a time) plus the head,
  plus `forward_tokens` per token of the replica's whole batch (inputs, masks, outputs).
- generate: the KV cache of one micro-batch (exact: 2·layers·kv_heads/tp·head_dim·
  rows·(prompt+gen) in the precision's width; micro-batches generate one after another,
  each with its own cache), the prefill's transient over its prompts, the last stage's
  logits of one decode step, and `generate_tokens` per token of the replica's sequences.

The per-term bytes are fitted to the runtime's measured peaks by `bench/memory_fit.py`
(`bench/results/memory_fit.md`: median error 2-6%, worst 5-22% per fit over 120
(case, rank) measurements). They are measured on CPU; on CUDA the same tensors are
allocated, with kernels' workspaces on top, which the cluster's `memory_reserve` covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhfc.ir import Call, CallKind, Head, ModelShape, Strategy
from rlhfc_runtime.contract.interfaces import PRECISION_BYTES
from rlhfc_runtime.contract.layout import stage_layers

MASTER_BYTES_PER_PARAM = 12  # fp32 weights + Adam's m and v


@dataclass(frozen=True)
class MemoryCoefficients:
    """Bytes per unit of every transient term (see the module doc), for one precision."""

    params: float
    layer_hidden: float
    layer_inter: float
    head_hidden: float
    head_vocab: float
    recompute_params: float
    recompute_boundary: float
    recompute_layer: float
    recompute_head_hidden: float
    recompute_head_vocab: float
    forward_hidden: float
    forward_inter: float
    forward_vocab: float
    forward_tokens: float
    prefill_hidden: float
    prefill_inter: float
    decode_vocab: float
    generate_tokens: float


# Fitted by `bench/memory_fit.py` (bench/results/memory_fit.md).
MEMORY_COEFFICIENTS: dict[str, MemoryCoefficients] = {
    "fp32": MemoryCoefficients(
        params=5.24, layer_hidden=33.41, layer_inter=19.32, head_hidden=5.53, head_vocab=10.06,
        recompute_params=4.67, recompute_boundary=10.86, recompute_layer=28.88, recompute_head_hidden=1.5,
        recompute_head_vocab=0.08,
        forward_hidden=13.98, forward_inter=11.99, forward_vocab=1.21, forward_tokens=119.84,
        prefill_hidden=13.67, prefill_inter=12.01, decode_vocab=10.6, generate_tokens=47.23,
    ),
    "bf16": MemoryCoefficients(
        params=7.15, layer_hidden=32.88, layer_inter=9.08, head_hidden=9.6, head_vocab=10.26,
        recompute_params=7.16, recompute_boundary=10.91, recompute_layer=15.5, recompute_head_hidden=0.37,
        recompute_head_vocab=0.38,
        forward_hidden=8.15, forward_inter=5.63, forward_vocab=5.16, forward_tokens=52.75,
        prefill_hidden=6.85, prefill_inter=5.98, decode_vocab=8.34, generate_tokens=29.74,
    ),
}


def precision_of(call: Call, default: str) -> str:
    """The call's resolved precision (`default`, the device's, for calls built by hand)."""
    return str(dict(call.settings).get("precision", default))


def resident_bytes(params: int, trainable_home: bool, precision: str) -> int:
    """What one device of a model copy holds between calls (see the module doc)."""
    return params * (MASTER_BYTES_PER_PARAM if trainable_home else PRECISION_BYTES[precision])


def _head_width(shape: ModelShape, head: Head, tp: int) -> float:
    return shape.vocab / tp if head is Head.LM else 1.0


def train_transient(shape: ModelShape, head: Head, s: Strategy, tokens_mb: int, stage: int,
                    stage_params: int, precision: str) -> float:
    """A train call's transient bytes on a device of pipeline stage `stage`."""
    m = MEMORY_COEFFICIENTS[precision]
    layers = len(stage_layers(shape.n_layers, s.pp, stage))
    in_flight = min(s.pp - stage, s.n_mbs)
    last = stage == s.pp - 1
    inter = shape.intermediate / s.tp
    vocab = _head_width(shape, head, s.tp)
    if s.recompute:
        acts = in_flight * tokens_mb * layers * m.recompute_boundary * shape.hidden
        acts += tokens_mb * m.recompute_layer * inter if layers else 0.0
        head_bytes = tokens_mb * (m.recompute_head_hidden * shape.hidden + m.recompute_head_vocab * vocab)
        return m.recompute_params * stage_params + acts + (head_bytes if last else 0.0)
    acts = in_flight * tokens_mb * layers * (m.layer_hidden * shape.hidden + m.layer_inter * inter)
    head_bytes = tokens_mb * (m.head_hidden * shape.hidden + m.head_vocab * vocab)
    return m.params * stage_params + acts + (head_bytes if last else 0.0)


def inference_transient(shape: ModelShape, head: Head, s: Strategy, tokens_mb: int, replica_tokens: int,
                        stage: int, precision: str) -> float:
    """An inference call's transient bytes on a device of pipeline stage `stage`."""
    m = MEMORY_COEFFICIENTS[precision]
    out = tokens_mb * (m.forward_hidden * shape.hidden + m.forward_inter * shape.intermediate / s.tp)
    if stage == s.pp - 1:
        out += tokens_mb * m.forward_vocab * _head_width(shape, head, s.tp)
    return out + m.forward_tokens * replica_tokens


def kv_cache_bytes(shape: ModelShape, s: Strategy, rows: int, seq_len: int, stage: int, precision: str) -> int:
    """Keys and values of `rows` sequences of `seq_len` tokens on one device of `stage`."""
    layers = len(stage_layers(shape.n_layers, s.pp, stage))
    return 2 * layers * (shape.n_kv_heads // s.tp) * shape.head_dim * rows * seq_len * PRECISION_BYTES[precision]


def generate_transient(shape: ModelShape, head: Head, call: Call, s: Strategy, stage: int, precision: str) -> float:
    """A generate call's transient bytes on a device of pipeline stage `stage`."""
    m = MEMORY_COEFFICIENTS[precision]
    rows = math.ceil(call.batch / s.dp)
    rows_mb = math.ceil(rows / s.n_mbs)
    out = kv_cache_bytes(shape, s, rows_mb, call.seq_len, stage, precision)
    out += rows_mb * call.prompt_len * (m.prefill_hidden * shape.hidden + m.prefill_inter * shape.intermediate / s.tp)
    if stage == s.pp - 1:
        out += rows_mb * m.decode_vocab * _head_width(shape, head, s.tp)
    return out + m.generate_tokens * rows * call.seq_len


def call_transient(call: Call, shape: ModelShape, head: Head, s: Strategy, tokens_mb: int, stage: int,
                   stage_params: int, precision: str) -> float:
    """Transient bytes of `call` on a device of pipeline stage `stage` (any kind)."""
    if call.kind is CallKind.TRAIN:
        return train_transient(shape, head, s, tokens_mb, stage, stage_params, precision)
    if call.kind is CallKind.INFERENCE:
        replica_tokens = math.ceil(call.batch / s.dp) * call.seq_len
        return inference_transient(shape, head, s, tokens_mb, replica_tokens, stage, precision)
    return generate_transient(shape, head, call, s, stage, precision)
