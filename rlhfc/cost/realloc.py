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

from dataclasses import dataclass
from fractions import Fraction
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


def _tp_overlap(t_a: int, tp_a: int, t_b: int, tp_b: int) -> Fraction:
    """Length of [t_a/tp_a, (t_a+1)/tp_a) ∩ [t_b/tp_b, (t_b+1)/tp_b)."""
    lo = max(Fraction(t_a, tp_a), Fraction(t_b, tp_b))
    hi = min(Fraction(t_a + 1, tp_a), Fraction(t_b + 1, tp_b))
    return max(Fraction(0), hi - lo)


def held_params(shape: ModelShape, head: Head, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Parameters a device with coordinates b = (pp_rank, pp, tp_rank, tp) in the
    destination already holds, given its coordinates a in the source layout."""
    p_a, pp_a, t_a, tp_a = a
    p_b, pp_b, t_b, tp_b = b
    split, replicated = layer_params(shape)
    tp_frac = _tp_overlap(t_a, tp_a, t_b, tp_b)
    shared_layers = len(set(stage_layers(shape.n_layers, pp_a, p_a)) & set(stage_layers(shape.n_layers, pp_b, p_b)))
    held = shared_layers * (split * tp_frac + replicated)
    vocab_h = shape.vocab * shape.hidden
    if p_a == 0 and p_b == 0:
        held += vocab_h * tp_frac
    if p_a == pp_a - 1 and p_b == pp_b - 1:
        held += shape.hidden  # final norm
        if head is Head.VALUE:
            held += shape.hidden
        elif not shape.tied_embeddings:
            held += vocab_h * tp_frac
    return int(held)


def _stage_tp_coords(s: Strategy, devices_per_node: int) -> dict[int, tuple[int, int]]:
    """Global rank -> (pp_rank, tp_rank), in the rank order of `rlhfc_runtime.layout.Layout`."""
    return {
        r: (i // (s.dp * s.tp), i % s.tp) for i, r in enumerate(s.mesh.ranks(devices_per_node))
    }


@lru_cache(maxsize=1 << 20)
def realloc_cost(
    shape: ModelShape, head: Head, src: Strategy, dst: Strategy, devices_per_node: int,
    device: Device, c: Coefficients,
) -> ReallocCost:
    """Minimal bytes and time to build layout `dst` from layout `src` (closed form per device)."""
    need = {p: stage_params(shape, head, dst.tp, dst.pp, p) for p in range(dst.pp)}
    missing_total = dst.dp * dst.tp * sum(need.values())  # as if nothing were held
    missing_max = max(need.values())
    src_coords = _stage_tp_coords(src, devices_per_node)
    dst_coords = _stage_tp_coords(dst, devices_per_node)
    if src_coords.keys() & dst_coords.keys():
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
