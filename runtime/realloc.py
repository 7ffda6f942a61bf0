"""Parameter reallocation: move a model's shards from one parallel layout to another.

Two halves. The *plan* (`plan_reallocation`, `minimum_bytes`, `bytes_moved`) is pure
Python without torch, so the compiler's cost model and lowering import it. The
*execution* (`reallocate`) runs the plan with bucketed point-to-point messages and
imports torch lazily.

Every shard is an interval along one dimension of the full tensor (the tensor-parallel
split dimension, or dimension 0 for replicated parameters), so planning is interval
arithmetic: a destination rank needs one interval, already holds at most one, and
receives the rest from source ranks that hold it (dp replicas hold identical shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

from rlhfc_runtime.contract.layout import Layout, param_stages, shard_slices
from rlhfc_runtime.contract.shapes import Param

DEFAULT_BUCKET_BYTES = 64 * 2**20
# Pieces at least this large that are contiguous on one side at least travel as their own
# message, read from the source shard / written into the destination shard in place
# where that side is contiguous (no packing copy); smaller ones share buckets.
SINGLE_MIN_BYTES = 64 * 2**10
DEFAULT_DEVICES_PER_NODE = 8

Index = tuple[tuple[int, int], ...]  # (start, stop) per dimension


@dataclass(frozen=True)
class Transfer:
    """One piece of one parameter going from `src` rank's old shard to `dst` rank's new
    shard. `src_index` / `dst_index` are (start, stop) per dimension, local to the
    shards; `src == dst` means a local copy (no bytes on the wire)."""

    src: int
    dst: int
    name: str
    src_index: Index
    dst_index: Index
    numel: int
    bytes: int
    src_contiguous: bool = False  # the source region is one run of memory in its shard
    dst_contiguous: bool = False  # the destination region is one run in its shard

    @property
    def is_local(self) -> bool:
        return self.src == self.dst

    def src_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.src_index)

    def dst_slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.dst_index)


@dataclass(frozen=True)
class ReallocPlan:
    """All transfers of one layout change, in the deterministic order every rank uses.

    `dst_shapes` gives, per rank of the destination layout, the local shape of every
    parameter it will hold (so ranks that held nothing can allocate)."""

    src: Layout
    dst: Layout
    transfers: tuple[Transfer, ...]
    dst_shapes: tuple[tuple[int, tuple[tuple[str, tuple[int, ...]], ...]], ...]

    def shapes_for(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Local shape of each parameter `rank` holds under dst ({} outside dst)."""
        return dict(dict(self.dst_shapes).get(rank, ()))

    def for_rank(self, rank: int) -> list[Transfer]:
        """The transfers `rank` takes part in, in plan order."""
        return [t for t in self.transfers if rank in (t.src, t.dst)]


def bytes_moved(plan: ReallocPlan) -> int:
    """Bytes that cross between ranks (local copies are free)."""
    return sum(t.bytes for t in plan.transfers if not t.is_local)


def node_of(rank: int, devices_per_node: int) -> int:
    """The node of a global rank (ranks fill nodes in order, as torchrun assigns them)."""
    return rank // devices_per_node


def subtract_interval(lo: int, hi: int, held: tuple[int, int] | None) -> list[tuple[int, int]]:
    """[lo, hi) minus `held`: zero, one or two intervals, in order."""
    if held is None or held[1] <= lo or held[0] >= hi:
        return [(lo, hi)] if hi > lo else []
    parts = [(lo, held[0]), (held[1], hi)]
    return [(a, b) for a, b in parts if b > a]


def choose_holder(holders: Iterable[int], dst: int, load: dict[int, int], devices_per_node: int) -> int:
    """The source for a piece: same node as `dst` first, then the least loaded sender
    so far (spreads work over dp replicas), then the lowest rank (deterministic)."""
    node = node_of(dst, devices_per_node)
    return min(holders, key=lambda h: (node_of(h, devices_per_node) != node, load.get(h, 0), h))


def cover_intervals(
    need: tuple[int, int],
    held: tuple[int, int] | None,
    pieces: list[tuple[int, int, tuple[int, ...]]],
    dst: int,
    load: dict[int, int],
    unit_bytes: int,
    devices_per_node: int,
) -> list[tuple[int, int, int]]:
    """Which source sends which part of `need` to `dst`: (src, lo, hi) triples.

    `held` is what `dst` already has (becomes a local copy), `pieces` are the intervals
    of the source layout with the ranks holding each. Updates `load` (bytes per sender).
    Shared by parameter reallocation and batch redistribution."""
    out = []
    if held is not None:
        lo, hi = max(need[0], held[0]), min(need[1], held[1])
        if hi > lo:
            out.append((dst, lo, hi))
    for lo, hi in subtract_interval(need[0], need[1], held):
        for plo, phi, holders in pieces:
            a, b = max(lo, plo), min(hi, phi)
            if b <= a:
                continue
            src = choose_holder(holders, dst, load, devices_per_node)
            load[src] = load.get(src, 0) + (b - a) * unit_bytes
            out.append((src, a, b))
    return out


def _split_dim(name: str, p: Param) -> int:
    """The dimension intervals are taken along: the tp split, or 0 for a replicated one."""
    if not p.shape:
        raise ValueError(f"{name}: scalar parameters cannot be sharded")
    return 0 if p.split is None else p.split


def _interval(sl: tuple[slice, ...] | None, dim: int) -> tuple[int, int] | None:
    return None if sl is None else (sl[dim].start, sl[dim].stop)


def _local_index(shape: tuple[int, ...], dim: int, lo: int, hi: int, offset: int) -> Index:
    return tuple((lo - offset, hi - offset) if d == dim else (0, n) for d, n in enumerate(shape))


def _is_contiguous(index: Index, shape: tuple[int, ...]) -> bool:
    """Whether box `index` of a C-contiguous tensor of `shape` is one run of memory:
    only leading dimensions may be partial, and at most one of them not of size 1."""
    partial = [d for d, ((a, b), n) in enumerate(zip(index, shape)) if (a, b) != (0, n)]
    return not partial or all(index[d][1] - index[d][0] == 1 for d in range(partial[-1]))


def plan_reallocation(
    param_shapes: Mapping[str, Param],
    n_layers: int,
    src: Layout,
    dst: Layout,
    itemsize: int = 2,
    devices_per_node: int = DEFAULT_DEVICES_PER_NODE,
) -> ReallocPlan:
    """The transfers that turn `src` shards into `dst` shards with the fewest bytes.

    Per parameter and destination rank: keep what the rank already holds (local copy),
    take the rest from a holder on the same node if there is one, balancing senders
    among dp replicas. Same inputs give the same plan on every rank."""
    transfers: list[Transfer] = []
    dst_shapes: dict[int, list[tuple[str, tuple[int, ...]]]] = {r: [] for r in dst.ranks}
    load: dict[int, int] = {}
    for name in sorted(param_shapes):
        p = param_shapes[name]
        shape, split, dim = p.shape, p.split, _split_dim(name, p)
        unit = itemsize
        for d, n in enumerate(shape):
            if d != dim:
                unit *= n
        src_slices = {r: shard_slices(name, shape, n_layers, src, r, split) for r in src.ranks}
        grouped: dict[tuple[int, int], list[int]] = {}
        for r, sl in src_slices.items():
            if sl is not None:
                grouped.setdefault(_interval(sl, dim), []).append(r)
        pieces = sorted((lo, hi, tuple(rs)) for (lo, hi), rs in grouped.items())
        for r in dst.ranks:
            need_sl = shard_slices(name, shape, n_layers, dst, r, split)
            if need_sl is None:
                continue
            need = _interval(need_sl, dim)
            dst_shapes[r].append((name, _local_shape(need_sl)))
            held = _interval(src_slices.get(r), dim)
            dst_shape = _local_shape(need_sl)
            for s, lo, hi in cover_intervals(need, held, pieces, r, load, unit, devices_per_node):
                src_index = _local_index(shape, dim, lo, hi, src_slices[s][dim].start)
                dst_index = _local_index(shape, dim, lo, hi, need[0])
                transfers.append(
                    Transfer(
                        src=s,
                        dst=r,
                        name=name,
                        src_index=src_index,
                        dst_index=dst_index,
                        numel=(hi - lo) * unit // itemsize,
                        bytes=(hi - lo) * unit,
                        src_contiguous=_is_contiguous(src_index, _local_shape(src_slices[s])),
                        dst_contiguous=_is_contiguous(dst_index, dst_shape),
                    )
                )
    return ReallocPlan(
        src=src,
        dst=dst,
        transfers=tuple(transfers),
        dst_shapes=tuple((r, tuple(v)) for r, v in dst_shapes.items()),
    )


def _local_shape(sl: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in sl)


def _volume(sl: tuple[slice, ...] | None) -> int:
    if sl is None:
        return 0
    v = 1
    for s in sl:
        v *= max(0, s.stop - s.start)
    return v


def _box_intersection(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> int:
    if a is None or b is None:
        return 0
    return _volume(tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b)))


def minimum_bytes(
    param_shapes: Mapping[str, Param],
    n_layers: int,
    src: Layout,
    dst: Layout,
    itemsize: int = 2,
) -> int:
    """The least bytes any reallocation must move: for each destination rank, the
    elements it needs under `dst` and does not hold under `src`, by box arithmetic.

    Parameters that behave alike (same shape, split dimension and stages in both
    layouts — e.g. the same weight of layers in the same stage pair) are counted once
    and multiplied, so a 70B shape costs a few hundred evaluations. The cost model
    calls this; tests compare it with `bytes_moved` of the plan."""
    kinds: dict[tuple, tuple[str, int]] = {}
    for name, p in param_shapes.items():
        key = (
            p.shape,
            p.split,
            param_stages(name, n_layers, src.pp),
            param_stages(name, n_layers, dst.pp),
        )
        rep, count = kinds.get(key, (name, 0))
        kinds[key] = (rep, count + 1)
    total = 0
    for (shape, split, _, _), (name, count) in kinds.items():
        per_param = 0
        for r in dst.ranks:
            need = shard_slices(name, shape, n_layers, dst, r, split)
            held = shard_slices(name, shape, n_layers, src, r, split)
            per_param += _volume(need) - _box_intersection(need, held)
        total += per_param * count
    return total * itemsize


@dataclass(frozen=True)
class Message:
    """One send/recv between two ranks: a single large transfer (`single`), read or
    written in place on the sides where it is contiguous, or a bucket of transfers
    packed into one flat buffer."""

    src: int
    dst: int
    transfers: tuple[Transfer, ...]
    single: bool

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.transfers)

    @property
    def send_in_place(self) -> bool:
        return self.single and self.transfers[0].src_contiguous

    @property
    def recv_in_place(self) -> bool:
        return self.single and self.transfers[0].dst_contiguous


def messages(
    transfers: Iterable[Transfer],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    single_min_bytes: int = SINGLE_MIN_BYTES,
) -> list[Message]:
    """The messages of the non-local transfers, sorted by (src, dst) so every rank
    posts its sends and receives in the same order: transfers of at least
    `single_min_bytes` contiguous on either side alone, the rest packed into buckets of at most
    `bucket_bytes` (a larger single transfer gets a bucket of its own)."""
    by_pair: dict[tuple[int, int], list[Transfer]] = {}
    for t in transfers:
        if not t.is_local:
            by_pair.setdefault((t.src, t.dst), []).append(t)
    out = []
    for (s, d), ts in sorted(by_pair.items()):
        current: list[Transfer] = []
        size = 0
        for t in ts:
            if (t.src_contiguous or t.dst_contiguous) and t.bytes >= single_min_bytes:
                out.append(Message(s, d, (t,), True))
                continue
            if current and size + t.bytes > bucket_bytes:
                out.append(Message(s, d, tuple(current), False))
                current, size = [], 0
            current.append(t)
            size += t.bytes
        if current:
            out.append(Message(s, d, tuple(current), False))
    return out


def reallocate(
    shards: dict,
    param_shapes: Mapping[str, Param],
    n_layers: int,
    src: Layout,
    dst: Layout,
    rank: int,
    *,
    dtype=None,
    device=None,
    devices_per_node: int = DEFAULT_DEVICES_PER_NODE,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    single_min_bytes: int = SINGLE_MIN_BYTES,
    plan: ReallocPlan | None = None,
    copy: bool = False,
) -> dict:
    """The shards `rank` holds under `dst`, built from `shards` (what it holds under
    `src`) and point-to-point messages; {} if `rank` is not in `dst`.

    Calling convention: every rank in `src.ranks` ∪ `dst.ranks` must call it with the
    same arguments (bar `shards`/`rank`); other ranks may call it (no-op) or not. No
    group or collective is used, only point-to-point messages between the ranks that
    exchange data, posted in `messages` order as one `batch_isend_irecv` (one NCCL
    group call; the world is initialised eagerly with its device, so no collective
    warm-up over ranks outside the layouts is needed): same code on gloo and NCCL.
    `dtype` / `device` default to those of the local shards; `dtype` is required on
    ranks that held nothing before, and is the wire's dtype (senders cast to it). A
    shard kept whole is returned as the same tensor (no copy) unless `copy` is set.
    """
    import torch
    import torch.distributed as dist

    if rank not in src.ranks and rank not in dst.ranks:
        return {}
    sample = next(iter(shards.values()), None)
    device = device if device is not None else default_device(sample)
    if dtype is None:
        if sample is None and rank in dst.ranks:
            raise ValueError(f"rank {rank} holds no shard under the source layout: pass dtype= to reallocate()")
        dtype = sample.dtype if sample is not None else None
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 2
    if plan is None:
        key = tuple(sorted(param_shapes.items()))
        plan = _cached_plan(key, n_layers, src, dst, itemsize, devices_per_node)
    mine = plan.for_rank(rank)
    shapes = plan.shapes_for(rank)
    out = {}
    for t in mine:  # shards kept whole need no new memory
        if (t.is_local and not copy and shards[t.name].dtype == dtype
                and tuple(shards[t.name].shape) == shapes[t.name] == _index_shape(t.dst_index)):
            out[t.name] = shards[t.name]
    for name, shape in shapes.items():
        if name not in out:
            out[name] = torch.empty(shape, dtype=dtype, device=device)
    ops, pending = [], []  # P2P ops; (buffer kept alive until complete, transfers to unpack or None)
    for m in messages(mine, bucket_bytes, single_min_bytes):
        if m.src == rank:
            if m.send_in_place:
                t = m.transfers[0]
                # a view unless the caller's shard is strided or of another dtype than the wire's
                buf = shards[t.name][t.src_slices()].to(dtype).contiguous()
            else:
                buf = torch.cat([shards[t.name][t.src_slices()].reshape(-1).to(dtype) for t in m.transfers])
            ops.append(dist.P2POp(dist.isend, buf, m.dst))
            pending.append((buf, None))
        elif m.recv_in_place:
            t = m.transfers[0]
            buf = out[t.name][t.dst_slices()]
            ops.append(dist.P2POp(dist.irecv, buf, m.src))
            pending.append((buf, None))
        else:
            buf = torch.empty(m.numel, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, m.src))
            pending.append((buf, m.transfers))
    requests = dist.batch_isend_irecv(ops) if ops else []
    for t in mine:  # local copies overlap with the messages in flight
        if t.is_local and out[t.name] is not shards[t.name]:
            out[t.name][t.dst_slices()] = shards[t.name][t.src_slices()]
    for req, (buf, to_unpack) in zip(requests, pending):
        req.wait()
        offset = 0
        for t in to_unpack or ():
            view = out[t.name][t.dst_slices()]
            view.copy_(buf[offset : offset + t.numel].view(view.shape))
            offset += t.numel
    return out


@lru_cache(maxsize=64)
def _cached_plan(shapes: tuple, n_layers: int, src: Layout, dst: Layout, itemsize: int, devices_per_node: int) -> ReallocPlan:
    """Plans repeat every iteration (same model, same layouts): compute each once."""
    return plan_reallocation(dict(shapes), n_layers, src, dst, itemsize, devices_per_node)


def default_device(sample=None):
    """Where new shards go when the caller does not say: beside `sample`, else this
    process's GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if sample is not None:
        return sample.device
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _index_shape(index: Index) -> tuple[int, ...]:
    return tuple(b - a for a, b in index)
