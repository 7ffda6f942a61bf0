"""Parameter reallocation between two layouts of one model: minimal bytes and time.

A destination device needs the shard `layout.shard_slices` assigns it; it already holds
the part that overlaps its own shard in the source layout (same device). The bytes that
must move are exactly what destinations need and do not hold (HybridFlow's 3D-
HybridEngine analysis, Sheng et al. 2025 §5). Each parameter class of a LLaMA decoder
(per-layer split matrices, replicated norms, vocab-split embedding and LM head) has a
closed-form overlap: layers shared by the two pipeline stages times the overlap of the
two tensor-parallel intervals [t/tp, (t+1)/tp). Devices outside the source mesh hold
nothing, so disjoint meshes cost dp_dst full copies with no per-device work.

Time: destinations receive in parallel, so it is the largest per-device volume over the
slowest link crossed (NVLink when both meshes lie in one node, the NIC otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections import Counter
from functools import lru_cache

from rlhfc.cost.coefficients import Coefficients
from rlhfc.cost.model import layer_params, stage_params
from rlhfc.hardware import Device
from rlhfc.ir import Head, ModelShape, Strategy
from rlhfc_runtime.layout import stage_layers


@dataclass(frozen=True)
class ReallocCost:
    """Bytes moved in total and the seconds the move takes."""

    bytes: int
    seconds: float


def _overlap(lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> int:
    return max(0, min(hi_a, hi_b) - max(lo_a, lo_b))


@lru_cache(maxsize=1 << 16)
def held_params(shape: ModelShape, head: Head, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Parameters a device with coordinates b = (pp_rank, pp, tp_rank, tp) in the
    destination already holds, given its coordinates a in the source layout."""
    p_a, pp_a, t_a, tp_a = a
    p_b, pp_b, t_b, tp_b = b
    split, replicated = layer_params(shape)
    unit = math.lcm(tp_a, tp_b)  # tensor-parallel intervals in units of 1/unit
    tp_num = _overlap(t_a * unit // tp_a, (t_a + 1) * unit // tp_a, t_b * unit // tp_b, (t_b + 1) * unit // tp_b)
    la, lb = stage_layers(shape.n_layers, pp_a, p_a), stage_layers(shape.n_layers, pp_b, p_b)
    shared_layers = _overlap(la.start, la.stop, lb.start, lb.stop)
    held = shared_layers * (split * tp_num // unit + replicated)
    vocab_part = shape.vocab * shape.hidden * tp_num // unit
    if p_a == 0 and p_b == 0:
        held += vocab_part
    if p_a == pp_a - 1 and p_b == pp_b - 1:
        held += shape.hidden  # final norm
        if head is Head.VALUE:
            held += shape.hidden
        elif not shape.tied_embeddings:
            held += vocab_part
    return held


def _stage_tp_coords(s: Strategy, devices_per_node: int) -> dict[int, tuple[int, int]]:
    """Global rank -> (pp_rank, tp_rank), in the rank order of `rlhfc_runtime.layout.Layout`."""
    return {
        r: (i // (s.dp * s.tp), i % s.tp) for i, r in enumerate(s.mesh.ranks(devices_per_node))
    }


def _meshes_overlap(a, b) -> bool:
    """Whether two meshes share a device (node ranges and device ranges both intersect)."""
    return (a.first_node < b.first_node + b.n_nodes and b.first_node < a.first_node + a.n_nodes
            and a.first_device < b.first_device + b.n_devices and b.first_device < a.first_device + a.n_devices)


@lru_cache(maxsize=1 << 20)
def realloc_cost(
    shape: ModelShape, head: Head, src: Strategy, dst: Strategy, devices_per_node: int,
    device: Device, c: Coefficients,
) -> ReallocCost:
    """Minimal bytes and time to build layout `dst` from layout `src` (closed form per device)."""
    need = {p: stage_params(shape, head, dst.tp, dst.pp, p) for p in range(dst.pp)}
    missing_total = dst.dp * dst.tp * sum(need.values())  # as if nothing were held
    missing_max = max(need.values())
    if _meshes_overlap(src.mesh, dst.mesh):
        src_coords = _stage_tp_coords(src, devices_per_node)
        dst_coords = _stage_tp_coords(dst, devices_per_node)
        pairs = Counter((src_coords.get(r), b) for r, b in dst_coords.items())
        missing = {
            (a, b): need[b[0]] - (held_params(shape, head, (a[0], src.pp, a[1], src.tp), (b[0], dst.pp, b[1], dst.tp)) if a else 0)
            for a, b in pairs
        }
        missing_total = sum(missing[k] * n for k, n in pairs.items())
        missing_max = max(missing.values())
    one_node = src.mesh.n_nodes == dst.mesh.n_nodes == 1 and src.mesh.first_node == dst.mesh.first_node
    link = device.intra_bandwidth if one_node else device.inter_bandwidth
    nbytes = c.weight_bytes_per_param * missing_total
    seconds = c.weight_bytes_per_param * missing_max / (link * c.link_efficiency)
    return ReallocCost(nbytes, seconds)
