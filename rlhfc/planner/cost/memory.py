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
- train: the larger of two phases: the optimizer step (`optimizer_params`·(stage
  parameters): gradients and Adam's temporaries) and the backward pass:
  `params`·(stage parameters) for gradients and bf16 weight casts; activations of the micro-batches 1F1B keeps in flight, min(pp − s, n_mbs)
  (n_mbs: what the plan's token budget makes at the priced lengths, `Call.n_mbs`),
  each `layer_hidden`·tokens·hidden + `layer_inter`·tokens·intermediate/tp +
  `layer_attn`·tokens·(attention width: (heads + 2·kv heads)·head_dim/tp) +
  `layer_tokens`·tokens (masks, positions, RoPE tables) per layer (no sequence parallelism: the residual stream is whole
  on every tp rank); the last stage's head: `head_hidden`·(head tokens)·hidden +
  `head_vocab`·(tile tokens)·vocab/tp (`head_units`: an LM head runs only at the response
  positions, in tiles of `logit_tile_tokens` tokens, so its vocabulary-wide bytes are one
  tile's whatever the batch; a value head covers every token, width 1).
  With recompute a layer keeps `recompute_boundary`·tokens·hidden (its input) and one
  layer's full set lives while it is recomputed (`recompute_layer`·tokens·(inter/tp +
  attention width)).
- inference: one micro-batch's forward transient (one layer at a time: hidden,
  intermediate and attention widths) plus the head (`forward_vocab`·(tile tokens)·vocab/tp),
  plus `forward_tokens` per token of the replica's whole batch (inputs, masks, outputs).
- generate: the KV cache of one micro-batch (exact: 2·layers·kv_heads/tp·head_dim·
  rows·(prompt+gen) in the precision's width; micro-batches generate one after another,
  each with its own cache), the prefill's transient over its prompts, the last stage's
  logits of one decode step, and `generate_tokens` per token of the replica's sequences.

The per-term bytes are fitted to the runtime's measured peaks by `bench/memory_fit.py`
at real vocabularies (32k-256k) and head dims (64-256), with q/k norms and soft-capping
(`bench/results/memory_fit.md` gives each fit's errors). They are measured on CPU; on CUDA the same tensors are
allocated, with kernels' workspaces on top, which the cluster's `memory_reserve` covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhfc.ir import Call, CallKind, Head, ModelShape, Strategy
from rlhfc_runtime.contract.interfaces import PRECISION_BYTES
from rlhfc_runtime.contract.layout import stage_layers
from rlhfc_runtime.contract.shapes import logit_tile_tokens

MASTER_BYTES_PER_PARAM = 12  # fp32 weights + Adam's m and v


@dataclass(frozen=True)
class MemoryCoefficients:
    """Bytes per unit of every transient term (see the module doc), for one precision."""

    params: float
    layer_hidden: float
    layer_inter: float
    layer_attn: float
    layer_tokens: float
    head_hidden: float
    head_vocab: float
    optimizer_params: float
    recompute_params: float
    recompute_boundary: float
    recompute_layer: float
    recompute_head_hidden: float
    recompute_head_vocab: float
    forward_hidden: float
    forward_inter: float
    forward_attn: float
    forward_vocab: float
    forward_tokens: float
    prefill_hidden: float
    prefill_inter: float
    prefill_attn: float
    decode_vocab: float
    generate_tokens: float


# Fitted by `bench/memory_fit.py` (bench/results/memory_fit.md).
MEMORY_COEFFICIENTS: dict[str, MemoryCoefficients] = {
    "fp32": MemoryCoefficients(
        params=5.88, layer_hidden=20.42, layer_inter=17.14, layer_attn=7.86, layer_tokens=464.4, head_hidden=1.36,
        head_vocab=11.55, optimizer_params=10.56, recompute_params=6.38, recompute_boundary=4.0,
        recompute_layer=19.08, recompute_head_hidden=5.12, recompute_head_vocab=8.97, forward_hidden=3.44,
        forward_inter=11.16, forward_attn=7.15, forward_vocab=10.84, forward_tokens=97.2, prefill_hidden=7.71,
        prefill_inter=8.69, prefill_attn=8.24, decode_vocab=16.88, generate_tokens=56.8,
    ),
    "bf16": MemoryCoefficients(
        params=6.84, layer_hidden=23.31, layer_inter=7.89, layer_attn=5.21, layer_tokens=412.05, head_hidden=6.12,
        head_vocab=11.37, optimizer_params=11.38, recompute_params=7.88, recompute_boundary=4.0,
        recompute_layer=11.38, recompute_head_hidden=8.53, recompute_head_vocab=8.52, forward_hidden=3.46,
        forward_inter=5.15, forward_attn=3.79, forward_vocab=11.14, forward_tokens=28.84, prefill_hidden=2.73,
        prefill_inter=4.89, prefill_attn=4.28, decode_vocab=17.95, generate_tokens=27.93,
    ),
}


def precision_of(call: Call, default: str) -> str:
    """The call's resolved precision (`default`, the device's, for calls built by hand)."""
    return str(dict(call.settings).get("precision", default))


def resident_bytes(params: int, trainable_home: bool, precision: str) -> int:
    """What one device of a model copy holds between calls (see the module doc)."""
    return params * (MASTER_BYTES_PER_PARAM if trainable_home else PRECISION_BYTES[precision])


def response_tokens(call: Call, tokens: int) -> int:
    """Of a call's `tokens` (per micro-batch), those at the response, where the LM head
    runs (`rlhfc_runtime.calls.head_outputs`): the generated share of a sequence."""
    return math.ceil(tokens * call.gen_len / call.seq_len) if call.gen_len and call.seq_len else tokens


def attention_width(shape: ModelShape, tp: int) -> float:
    """Per token and layer, the q, k and v widths one tp rank computes (and the attention
    output's): what a larger head_dim or more heads add to the activations."""
    return (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim / tp


def head_units(shape: ModelShape, head: Head, tp: int, tokens: int, response: int) -> tuple[float, float]:
    """(tokens whose hidden states the head keeps, tile tokens × vocabulary width): an LM
    head runs at the `response` positions in tiles of `logit_tile_tokens(vocab / tp)`
    tokens (`rlhfc_runtime.logits`), a value head at every token with width 1."""
    if head is not Head.LM:
        return float(tokens), float(tokens)
    width = shape.vocab / tp
    return float(response), min(logit_tile_tokens(int(width)), response) * width


def train_transient(shape: ModelShape, head: Head, s: Strategy, tokens_mb: int, n_mbs: int, stage: int,
                    stage_params: int, precision: str, response_mb: int) -> float:
    """A train call's transient bytes on a device of pipeline stage `stage`, with
    micro-batches of `tokens_mb` tokens, `n_mbs` of them."""
    m = MEMORY_COEFFICIENTS[precision]
    layers = len(stage_layers(shape.n_layers, s.pp, stage))
    in_flight = min(s.pp - stage, n_mbs)
    last = stage == s.pp - 1
    inter = shape.intermediate / s.tp
    attn = attention_width(shape, s.tp)
    kept, tile = head_units(shape, head, s.tp, tokens_mb, response_mb)
    if s.recompute:
        acts = in_flight * tokens_mb * layers * m.recompute_boundary * shape.hidden
        acts += tokens_mb * m.recompute_layer * (inter + attn) if layers else 0.0
        head_bytes = m.recompute_head_hidden * kept * shape.hidden + m.recompute_head_vocab * tile
        backward = m.recompute_params * stage_params + acts + (head_bytes if last else 0.0)
        return max(backward, m.optimizer_params * stage_params)
    acts = in_flight * tokens_mb * layers * (m.layer_hidden * shape.hidden + m.layer_inter * inter + m.layer_attn * attn
                                                 + m.layer_tokens)
    head_bytes = m.head_hidden * kept * shape.hidden + m.head_vocab * tile
    backward = m.params * stage_params + acts + (head_bytes if last else 0.0)
    return max(backward, m.optimizer_params * stage_params)


def inference_transient(shape: ModelShape, head: Head, s: Strategy, tokens_mb: int, replica_tokens: int,
                        stage: int, precision: str, response_mb: int) -> float:
    """An inference call's transient bytes on a device of pipeline stage `stage`."""
    m = MEMORY_COEFFICIENTS[precision]
    out = tokens_mb * (m.forward_hidden * shape.hidden + m.forward_inter * shape.intermediate / s.tp
                       + m.forward_attn * attention_width(shape, s.tp))
    if stage == s.pp - 1:
        out += m.forward_vocab * head_units(shape, head, s.tp, tokens_mb, response_mb)[1]
    return out + m.forward_tokens * replica_tokens


def kv_cache_bytes(shape: ModelShape, s: Strategy, rows: int, seq_len: int, stage: int, precision: str) -> int:
    """Keys and values of `rows` sequences of `seq_len` tokens on one device of `stage`."""
    layers = len(stage_layers(shape.n_layers, s.pp, stage))
    return 2 * layers * (shape.n_kv_heads // s.tp) * shape.head_dim * rows * seq_len * PRECISION_BYTES[precision]


def generate_transient(shape: ModelShape, head: Head, call: Call, s: Strategy, stage: int, precision: str) -> float:
    """A generate call's transient bytes on a device of pipeline stage `stage`."""
    m = MEMORY_COEFFICIENTS[precision]
    rows = math.ceil(call.batch / s.dp)
    rows_mb = math.ceil(rows / call.n_mbs(s))
    out = kv_cache_bytes(shape, s, rows_mb, call.seq_len, stage, precision)
    out += rows_mb * call.prompt_len * (m.prefill_hidden * shape.hidden + m.prefill_inter * shape.intermediate / s.tp
                                        + m.prefill_attn * attention_width(shape, s.tp))
    if stage == s.pp - 1:
        out += rows_mb * m.decode_vocab * (shape.vocab / s.tp if head is Head.LM else 1.0)
    return out + m.generate_tokens * rows * call.seq_len


def call_transient(call: Call, shape: ModelShape, head: Head, s: Strategy, tokens_mb: int, stage: int,
                   stage_params: int, precision: str) -> float:
    """Transient bytes of `call` on a device of pipeline stage `stage` (any kind)."""
    if call.kind is CallKind.TRAIN:
        return train_transient(shape, head, s, tokens_mb, call.n_mbs(s), stage, stage_params, precision,
                               response_tokens(call, tokens_mb))
    if call.kind is CallKind.INFERENCE:
        replica_tokens = math.ceil(call.batch / s.dp) * call.seq_len
        return inference_transient(shape, head, s, tokens_mb, replica_tokens, stage, precision,
                                   response_tokens(call, tokens_mb))
    return generate_transient(shape, head, call, s, stage, precision)
