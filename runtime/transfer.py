"""Batch data redistribution between the data-parallel splits of two layouts.

Convention: a batch of `batch_size` rows is split over the dp groups of a layout;
dp rank i holds the contiguous rows `dp_rows(batch_size, dp, i)`, and every rank of
that dp group (all its tp and pp ranks) holds the same chunk. Moving a batch from a
producer call's layout to a consumer's sends only rows a destination rank does not
already hold, point-to-point, chosen like parameter pieces (`realloc.cover_intervals`).

Planning is pure; `redistribute_batch` imports torch lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.realloc import DEFAULT_DEVICES_PER_NODE, cover_intervals, default_device


def dp_rows(batch_size: int, dp: int, dp_rank: int) -> tuple[int, int]:
    """Rows [start, stop) of the batch that dp rank `dp_rank` of `dp` holds (even
    contiguous split; earlier ranks one row shorter when it does not divide)."""
    return batch_size * dp_rank // dp, batch_size * (dp_rank + 1) // dp


def rows_of(batch_size: int, layout: Layout, rank: int) -> tuple[int, int] | None:
    """The rows `rank` holds under `layout`, or None if it is not in the mesh."""
    c = layout.coord(rank)
    return None if c is None else dp_rows(batch_size, layout.dp, c[1])


@dataclass(frozen=True)
class RowTransfer:
    """Rows [lo, hi) of the global batch go from rank `src` to rank `dst` (src == dst:
    local copy)."""

    src: int
    dst: int
    lo: int
    hi: int


@dataclass(frozen=True)
class BatchSpec:
    """What a receiver must know to allocate: the global row count and, per key, the
    trailing shape and dtype name (e.g. 'float32'). Build it with `batch_spec`."""

    batch_size: int
    keys: tuple[tuple[str, tuple[int, ...], str], ...]


def plan_batch(
    batch_size: int, src: Layout, dst: Layout, row_bytes: int = 1, devices_per_node: int = DEFAULT_DEVICES_PER_NODE
) -> tuple[RowTransfer, ...]:
    """Row transfers that give every rank of `dst` its chunk, moving only rows it does
    not hold under `src`; senders among dp-group replicas are balanced."""
    pieces: dict[tuple[int, int], list[int]] = {}
    for r in src.ranks:
        pieces.setdefault(rows_of(batch_size, src, r), []).append(r)
    ordered = sorted((lo, hi, tuple(rs)) for (lo, hi), rs in pieces.items() if hi > lo)
    load: dict[int, int] = {}
    out = []
    for r in dst.ranks:
        need = rows_of(batch_size, dst, r)
        held = rows_of(batch_size, src, r)
        for s, lo, hi in cover_intervals(need, held, ordered, r, load, row_bytes, devices_per_node):
            out.append(RowTransfer(s, r, lo, hi))
    return tuple(out)


def batch_spec(batch: dict, batch_size: int) -> BatchSpec:
    """The spec of a local chunk `batch` of a global batch of `batch_size` rows."""
    return BatchSpec(
        batch_size,
        tuple((k, tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in sorted(batch.items())),
    )


def redistribute_batch(
    local: dict | None,
    spec: BatchSpec,
    src: Layout,
    dst: Layout,
    rank: int,
    *,
    device=None,
    devices_per_node: int = DEFAULT_DEVICES_PER_NODE,
) -> dict:
    """This rank's chunk of the batch under `dst` (dict key -> tensor), from its chunk
    under `src` (`local`, rows `rows_of(spec.batch_size, src, rank)`) and messages.

    Calling convention as `realloc.reallocate`: every rank in src ∪ dst calls it with
    the same `spec`, layouts and devices_per_node; one isend/irecv per (sender,
    receiver, key) in a fixed order, posted as one `batch_isend_irecv`. Returns {} on
    ranks outside `dst`."""
    import torch

    from rlhfc_runtime.dist import exchange

    if rank not in src.ranks and rank not in dst.ranks:
        return {}
    local = local or {}
    if device is None:
        device = default_device(next(iter(local.values()), None))
    row_bytes = sum(
        torch.empty((), dtype=getattr(torch, dt)).element_size() * _numel(shape) for _, shape, dt in spec.keys
    )
    plan = [t for t in plan_batch(spec.batch_size, src, dst, row_bytes, devices_per_node) if rank in (t.src, t.dst)]
    held = rows_of(spec.batch_size, src, rank)
    need = rows_of(spec.batch_size, dst, rank)
    out = {}
    if need is not None:
        out = {
            k: torch.empty((need[1] - need[0], *shape), dtype=getattr(torch, dt), device=device)
            for k, shape, dt in spec.keys
        }
    sends, recvs = [], []
    for t in sorted(plan, key=lambda t: (t.src, t.dst, t.lo)):
        for k, _, _ in spec.keys:
            if t.src == t.dst:
                out[k][t.lo - need[0] : t.hi - need[0]] = local[k][t.lo - held[0] : t.hi - held[0]]
            elif t.src == rank:
                sends.append((local[k][t.lo - held[0] : t.hi - held[0]].to(device).contiguous(), t.dst))
            else:
                recvs.append((out[k][t.lo - need[0] : t.hi - need[0]], t.src))
    exchange(sends, recvs)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
