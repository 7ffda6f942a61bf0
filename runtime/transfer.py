"""Batch data redistribution between the data-parallel splits of two layouts.

Convention: a batch of `batch_size` rows is split over the dp groups of a layout;
dp rank i holds the contiguous rows `dp_rows(batch_size, dp, i)`, and every rank of
that dp group (all its tp and pp ranks) holds the same chunk. Moving a batch from a
producer call's layout to a consumer's sends only rows a destination rank does not
already hold, point-to-point, chosen like parameter pieces (`realloc.cover_intervals`).

A move is asynchronous for its senders (`send_batch` posts and returns) and blocking for
its receivers (`receive_batch`): the planner charges a move to the consumer's devices.
Planning is pure; the two imports torch lazily.
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


def _row_transfers(batch_size: int, src: Layout, dst: Layout, devices_per_node: int) -> list[RowTransfer]:
    """`plan_batch` in the one order both ends of every pair post their messages in."""
    return sorted(plan_batch(batch_size, src, dst, 1, devices_per_node), key=lambda t: (t.src, t.dst, t.lo))


# A chunk's spec (key -> trailing shape and dtype) travels as JSON in a fixed-size byte
# tensor ahead of the rows, so that a receiver can allocate without a pickled collective.
SPEC_BYTES = 4096


def _spec(local: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Key -> trailing shape and dtype name of a chunk, in key order."""
    return [(k, tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in sorted(local.items())]


def _spec_tensor(local: dict, device):
    from rlhfc_runtime.dist import json_tensor

    return json_tensor(_spec(local), SPEC_BYTES).to(device)


def _spec_of(header) -> list[tuple[str, tuple[int, ...], str]]:
    from rlhfc_runtime.dist import json_of

    return [(k, tuple(shape), dtype) for k, shape, dtype in json_of(header)]


def _spec_pairs(transfers: list[RowTransfer], src: Layout, dst: Layout) -> list[tuple[int, int]]:
    """(sender, receiver) pairs a spec goes over: every pair that moves rows, and for a rank
    of `dst` that gets no rows and holds none under `src` (an empty chunk), src's first rank."""
    pairs = {(t.src, t.dst) for t in transfers if t.src != t.dst}
    fed = {t.dst for t in transfers}
    pairs |= {(min(src.ranks), r) for r in dst.ranks if r not in fed and r not in src.ranks}
    return sorted(pairs)


def send_batch(local: dict | None, batch_size: int, src: Layout, dst: Layout, rank: int, *, device=None,
               devices_per_node: int = DEFAULT_DEVICES_PER_NODE) -> list:
    """Post, without waiting, this rank's part of moving a batch of `batch_size` rows
    from `src`'s dp shards (`local`: this rank's chunk) to `dst`'s: to every other rank
    it serves, the chunk's spec and then its rows of every key. Returns the pending sends
    (torch Work objects): wait for them before the iteration ends. The sender goes on at
    once; only receivers wait (`receive_batch`), which is how the planner prices a move."""
    import torch.distributed as dist

    transfers = _row_transfers(batch_size, src, dst, devices_per_node)
    receivers = [r for s, r in _spec_pairs(transfers, src, dst) if s == rank]
    if not receivers:
        return []
    held = rows_of(batch_size, src, rank)
    device = default_device(next(iter(local.values()), None)) if device is None else device
    pending = []
    for r in receivers:  # per pair: the spec, then the rows in `_row_transfers` order
        pending.append(dist.isend(_spec_tensor(local, device), r))
        for t in transfers:
            if t.src == rank and t.dst == r:
                pending += [dist.isend(local[k][t.lo - held[0] : t.hi - held[0]].to(device).contiguous(), r)
                            for k in sorted(local)]
    return pending


def receive_batch(local: dict | None, batch_size: int, src: Layout, dst: Layout, rank: int, *, device=None,
                  devices_per_node: int = DEFAULT_DEVICES_PER_NODE) -> dict:
    """This rank's chunk of the batch under `dst` (key -> tensor): the rows it holds under
    `src` (`local`) copied, the others received from the ranks `send_batch` posted them
    on. Every rank of src ∪ dst computes the same transfers; {} outside `dst`."""
    import torch
    import torch.distributed as dist

    need = rows_of(batch_size, dst, rank)
    if need is None:
        return {}
    transfers = _row_transfers(batch_size, src, dst, devices_per_node)
    plan = [t for t in transfers if t.dst == rank]
    senders = [s for s, r in _spec_pairs(transfers, src, dst) if r == rank]
    if device is None:
        device = default_device(next(iter((local or {}).values()), None))
    headers = [torch.empty(SPEC_BYTES, dtype=torch.uint8, device=device) for _ in senders]
    for work in [dist.irecv(h, s) for h, s in zip(headers, senders)]:
        work.wait()
    spec = _spec_of(headers[0]) if headers else _spec(local)
    out = {k: torch.empty((need[1] - need[0], *shape), dtype=getattr(torch, dt), device=device)
           for k, shape, dt in spec}
    held = rows_of(batch_size, src, rank)
    works = []
    for t in plan:
        for k, _, _ in spec:
            if t.src == rank:
                out[k][t.lo - need[0] : t.hi - need[0]] = local[k][t.lo - held[0] : t.hi - held[0]]
            else:
                works.append(dist.irecv(out[k][t.lo - need[0] : t.hi - need[0]], t.src))
    for work in works:
        work.wait()
    return out
