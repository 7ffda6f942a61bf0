"""Parameter reallocation between two layouts of one model: minimal bytes and time.

A destination device needs the shard `layout.shard_slices` assigns it; it already holds
the part that overlaps its own shard in the source layout (same device). The bytes that
must move are exactly what destinations need and do not hold (HybridFlow's 3D-
HybridEngine analysis, Sheng et al. 2025 §5). Each parameter class of the parameter table
(`shapes.inventory`: per-layer split and replicated, vocab-split embedding and LM head) has a
closed-form overlap: layers shared by the two pipeline stages times the overlap of the
two tensor-parallel intervals [t/tp, (t+1)/tp). Devices outside the source mesh hold
nothing, so disjoint meshes cost dp_dst full copies with no per-device work.

Time: destinations receive in parallel, so it is the largest per-device volume over the
slowest link crossed (NVLink when both meshes lie in one node, the NIC otherwise), plus
a fixed cost per bucket of `Coefficients.realloc_bucket_bytes` that device receives
(measured weight syncs sit far above the bandwidth floor: HybridFlow, verl).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections import Counter
from functools import lru_cache

from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.model import stage_params
from rlhfc.hardware import Device
from rlhfc.ir import Head, ModelShape, Strategy
from rlhfc_runtime.contract.layout import stage_layers
from rlhfc_runtime.contract.shapes import Inventory, inventory


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
    unit = math.lcm(tp_a, tp_b)  # tensor-parallel intervals in units of 1/unit
    tp_num = _overlap(t_a * unit // tp_a, (t_a + 1) * unit // tp_a, t_b * unit // tp_b, (t_b + 1) * unit // tp_b)
    la, lb = stage_layers(shape.n_layers, pp_a, p_a), stage_layers(shape.n_layers, pp_b, p_b)
    shared_layers = _overlap(la.start, la.stop, lb.start, lb.stop)
    return _held(inventory(shape, head), shared_layers, tp_num, unit, p_a == 0 and p_b == 0,
                 p_a == pp_a - 1 and p_b == pp_b - 1)


def _held(inv: Inventory, shared_layers: int, tp_num: int, unit: int, first: bool, last: bool) -> int:
    """Parameters a device keeps across a reallocation: its layers' overlap times the
    overlap (tp_num/unit) of its tp intervals for split classes, whole for replicated
    ones; the embedding if first in both layouts, final norm and head if last in both
    (the LM head is a copy of its own even when tied)."""
    held = shared_layers * (inv.layer_split * tp_num // unit + inv.layer_replicated)
    if first:
        held += inv.embed * tp_num // unit
    if last:
        held += inv.final + (inv.head * tp_num // unit if inv.head_split else inv.head)
    return held


def _stage_tp_coords(s: Strategy, devices_per_node: int) -> dict[int, tuple[int, int]]:
    """Global rank -> (pp_rank, tp_rank), in the rank order of `rlhfc_runtime.contract.layout.Layout`."""
    return {
        r: (i // (s.dp * s.tp), i % s.tp) for i, r in enumerate(s.mesh.ranks(devices_per_node))
    }


def meshes_overlap(a, b) -> bool:
    """Whether two meshes share a device (node ranges and device ranges both intersect)."""
    return (a.first_node < b.first_node + b.n_nodes and b.first_node < a.first_node + a.n_nodes
            and a.first_device < b.first_device + b.n_devices and b.first_device < a.first_device + a.n_devices)


def realloc_cost(
    shape: ModelShape, head: Head, src: Strategy, dst: Strategy, devices_per_node: int,
    device: Device, c: Coefficients, width: int,
) -> ReallocCost:
    """Minimal bytes and time to build layout `dst` from layout `src` (closed form per
    device), `width` bytes per parameter on the wire (the destination calls' precision)."""
    sm, dm = src.mesh, dst.mesh
    if not meshes_overlap(sm, dm):  # devices outside the source mesh hold nothing
        missing_total, missing_max = _missing_disjoint(shape, head, dst.dp, dst.tp, dst.pp)
    elif _contiguous(sm, devices_per_node) and _contiguous(dm, devices_per_node):
        # Only the offset between the two rank ranges matters (not where they lie), so
        # the many mesh pairs at different nodes share one computation.
        offset = (dm.first_node - sm.first_node) * devices_per_node + dm.first_device - sm.first_device
        missing_total, missing_max = _missing_overlapping(
            shape, head, (src.dp, src.tp, src.pp, sm.size), (dst.dp, dst.tp, dst.pp, dm.size), offset,
        )
    else:
        missing_total, missing_max = _missing_by_rank(shape, head, src, dst, devices_per_node)
    one_node = sm.n_nodes == dm.n_nodes == 1 and sm.first_node == dm.first_node
    link = device.intra_bandwidth if one_node else device.inter_bandwidth
    nbytes = width * missing_total
    per_device = width * missing_max
    buckets = -(-per_device // c.realloc_bucket_bytes)
    seconds = per_device / (link * c.link_efficiency) + buckets * c.realloc_bucket_latency
    return ReallocCost(nbytes, seconds)


def _contiguous(mesh, devices_per_node: int) -> bool:
    """Whether the mesh's ranks are one run `base .. base + size - 1` (one node, or whole nodes)."""
    return mesh.n_nodes == 1 or mesh.n_devices == devices_per_node


@lru_cache(maxsize=1 << 12)
def _need(shape: ModelShape, head: Head, tp: int, pp: int) -> tuple[int, ...]:
    """Parameters one device of each pipeline stage of a (tp, pp) layout needs."""
    return tuple(stage_params(shape, head, tp, pp, p) for p in range(pp))


@lru_cache(maxsize=1 << 12)
def _missing_disjoint(shape: ModelShape, head: Head, dp: int, tp: int, pp: int) -> tuple[int, int]:
    """(total, largest per device) parameters to send when the destination holds nothing."""
    need = _need(shape, head, tp, pp)
    return dp * tp * sum(need), max(need)


@lru_cache(maxsize=1 << 18)
def _missing_overlapping(
    shape: ModelShape, head: Head, src: tuple[int, int, int, int], dst: tuple[int, int, int, int], offset: int,
) -> tuple[int, int]:
    """(total, largest per device) parameters to send between two layouts (dp, tp, pp,
    size) on contiguous rank ranges, the destination's starting `offset` ranks after the
    source's: `held_params` summed over the destination devices, counted run by run.

    Destination index i sits at source index i + offset. Within a run of indices where
    both pipeline ranks are constant, what a device holds depends only on how much its
    two tensor-parallel intervals overlap, and that overlap repeats with period
    max(tp_src, tp_dst) along the run."""
    dp_s, tp_s, pp_s, size_s = src
    dp_d, tp_d, pp_d, size_d = dst
    need = _need(shape, head, tp_d, pp_d)
    block_s, block_d = dp_s * tp_s, dp_d * tp_d
    period = max(tp_s, tp_d)
    unit = math.lcm(tp_s, tp_d)  # tensor-parallel intervals in units of 1/unit
    pattern, per_period = _tp_pattern(tp_s, tp_d, offset % period)
    inv, n_layers = inventory(shape, head), shape.n_layers
    lo, hi = max(0, -offset), min(size_d, size_s - offset)  # destination indices the source covers
    held_total, missing_max = 0, 0
    i = lo
    while i < hi:
        p_d, p_s = i // block_d, (i + offset) // block_s
        end = min(hi, (p_d + 1) * block_d, (p_s + 1) * block_s - offset)
        full, rem = divmod(end - i, period)
        counts = {ov: n * full for ov, n in per_period.items()} if full else {}
        for u in range(i + full * period, end):
            ov = pattern[u % period]
            counts[ov] = counts.get(ov, 0) + 1
        # `held_params` for this pair of pipeline ranks, as a function of the tp overlap
        shared_layers = _overlap(n_layers * p_s // pp_s, n_layers * (p_s + 1) // pp_s,
                                 n_layers * p_d // pp_d, n_layers * (p_d + 1) // pp_d)
        first = p_s == 0 and p_d == 0
        last = p_s == pp_s - 1 and p_d == pp_d - 1
        for ov, n in counts.items():
            held = _held(inv, shared_layers, ov, unit, first, last)
            held_total += held * n
            if need[p_d] - held > missing_max:
                missing_max = need[p_d] - held
        i = end
    if lo > 0:  # destination devices before the source's range hold nothing
        missing_max = max([missing_max, *need[:(lo - 1) // block_d + 1]])
    if hi < size_d:  # nor those after it
        missing_max = max([missing_max, *need[hi // block_d:]])
    return dp_d * tp_d * sum(need) - held_total, missing_max


@lru_cache(maxsize=1 << 10)
def _tp_pattern(tp_s: int, tp_d: int, phase: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """Overlap (in units of 1/lcm(tp_s, tp_d)) of the source and destination tensor-parallel
    intervals of destination index u, for u = 0 .. max(tp_s, tp_d) - 1 when the source
    index is u + phase; and how many indices of that period have each overlap."""
    unit = math.lcm(tp_s, tp_d)
    step_s, step_d = unit // tp_s, unit // tp_d
    pattern = []
    for u in range(max(tp_s, tp_d)):
        t_s, t_d = (u + phase) % tp_s, u % tp_d
        pattern.append(_overlap(t_s * step_s, (t_s + 1) * step_s, t_d * step_d, (t_d + 1) * step_d))
    return tuple(pattern), dict(Counter(pattern))


def _missing_by_rank(
    shape: ModelShape, head: Head, src: Strategy, dst: Strategy, devices_per_node: int,
) -> tuple[int, int]:
    """(total, largest per device) parameters to send, device by device (any meshes)."""
    need = _need(shape, head, dst.tp, dst.pp)
    src_coords = _stage_tp_coords(src, devices_per_node)
    dst_coords = _stage_tp_coords(dst, devices_per_node)
    pairs = Counter((src_coords.get(r), b) for r, b in dst_coords.items())
    missing = {
        (a, b): need[b[0]] - (held_params(shape, head, (a[0], src.pp, a[1], src.tp), (b[0], dst.pp, b[1], dst.tp)) if a else 0)
        for a, b in pairs
    }
    return sum(missing[k] * n for k, n in pairs.items()), max(missing.values())
