"""Who writes, reads and exports which interval of which tensor: pure functions over
the parameter table and layouts (no torch, no processes), so a 128-rank 70B layout can
be planned, and its bytes per rank counted, in a test.

An interval (`Box`) is a ((start, stop), ...) per dimension of a full tensor, as JSON
holds it; `layout.shard_slices` defines every rank's box. Checkpoints are written as
shards: each distinct box a layout holds is written once, by the holder with the fewest
elements assigned so far. A resume under any layout reads, for each of its own boxes,
the intersection with every box on disk (the same arithmetic as reallocation, from
files). The HF export gives each full tensor (a family's fused tensor: the concatenation
of its parts) to one writer of the mesh, spread by size; the holders of its pieces send
them there, and the writer streams it into its file.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc_runtime.contract.family import fused
from rlhfc_runtime.contract.layout import Layout, shard_slices

Box = tuple[tuple[int, int], ...]


def box_of(sl: tuple[slice, ...]) -> Box:
    return tuple((s.start, s.stop) for s in sl)


def slices_of(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def volume(box: Box) -> int:
    n = 1
    for a, b in box:
        n *= b - a
    return n


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes of one tensor, None when empty."""
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def relative(box: Box, to: Box) -> Box:
    """`box` (inside `to`) in the coordinates of the tensor that holds `to`."""
    return tuple((lo - o, hi - o) for (lo, hi), (o, _) in zip(box, to, strict=True))


def shifted(box: Box, dim: int, by: int) -> Box:
    return tuple((lo + by, hi + by) if d == dim else (lo, hi) for d, (lo, hi) in enumerate(box))


def rank_box(table: dict, n_layers: int, layout: Layout, rank: int, name: str) -> Box | None:
    p = table[name]
    sl = shard_slices(name, p.shape, n_layers, layout, rank, p.split)
    return None if sl is None else box_of(sl)


def holders(table: dict, n_layers: int, layout: Layout) -> dict[str, dict[Box, list[int]]]:
    """Parameter -> each distinct box the layout holds -> the ranks holding it (mesh order)."""
    out: dict[str, dict[Box, list[int]]] = {}
    for name in table:
        boxes: dict[Box, list[int]] = {}
        for rank in layout.ranks:
            box = rank_box(table, n_layers, layout, rank, name)
            if box is not None:
                boxes.setdefault(box, []).append(rank)
        out[name] = boxes
    return out


@dataclass(frozen=True)
class Piece:
    """One interval of one parameter, as written in a checkpoint shard file."""

    name: str
    box: Box


def write_plan(table: dict, n_layers: int, layout: Layout) -> dict[int, list[Piece]]:
    """Rank -> the pieces it writes: every distinct box once, by the holder with the
    fewest elements assigned so far (ties: mesh order), so replicated tensors and data
    parallel replicas spread the writing."""
    load = dict.fromkeys(layout.ranks, 0)
    plan: dict[int, list[Piece]] = {r: [] for r in layout.ranks}
    for name, boxes in holders(table, n_layers, layout).items():
        for box, ranks in boxes.items():
            rank = min(ranks, key=lambda r: (load[r], layout.ranks.index(r)))
            plan[rank].append(Piece(name, box))
            load[rank] += volume(box)
    return plan


@dataclass(frozen=True)
class Read:
    """Copy `src` of the tensor `key` in `file` into `dst` of this rank's shard of `name`."""

    name: str
    file: str
    key: str
    src: Box
    dst: Box


class MissingInterval(ValueError):
    """A checkpoint that does not hold every element a rank needs."""


def read_plan(on_disk: list[dict], table: dict, n_layers: int, layout: Layout, rank: int,
              prefix: str = "") -> list[Read]:
    """The reads that fill every shard `rank` holds under `layout` from the pieces on
    disk (`on_disk`: {"file", "key", "name", "box"} each, keys with `prefix`): each
    intersection of its box with a box on disk, once. MissingInterval when they do not
    cover it."""
    by_name: dict[str, list[dict]] = {}
    for entry in on_disk:
        if entry["key"].startswith(prefix):
            by_name.setdefault(entry["name"], []).append(entry)
    reads = []
    for name in table:
        need = rank_box(table, n_layers, layout, rank, name)
        if need is None:
            continue
        covered = 0
        for entry in by_name.get(name, ()):
            held = tuple(tuple(d) for d in entry["box"])
            common = overlap(need, held)
            if common is not None:
                reads.append(Read(name, entry["file"], entry["key"], relative(common, held), relative(common, need)))
                covered += volume(common)
        if covered != volume(need):
            raise MissingInterval(f"{name}: the checkpoint holds {covered} of the {volume(need)} elements "
                                  f"rank {rank} needs")
    return reads


@dataclass(frozen=True)
class Source:
    """A piece of an export tensor: `box` of parameter `name` held by `rank`, landing at
    `dst` of the exported tensor."""

    name: str
    rank: int
    box: Box
    dst: Box


@dataclass(frozen=True)
class ExportTensor:
    key: str  # the checkpoint's name (fused ones fused)
    shape: tuple[int, ...]
    writer: int
    file: str
    sources: tuple[Source, ...]


def export_units(shape, table: dict) -> list[tuple[str, tuple[int, ...], list[tuple[str, int, int]]]]:
    """(checkpoint name, full shape, [(parameter, fuse dim, offset)]) in table order: a
    family's fused tensors take the place of their parts, a tied lm_head is left out."""
    rules = {f"model.layers.{n}.{part}": (n, rule) for n in range(shape.n_layers) for rule in fused(shape)
             for part in rule.parts}
    out, done = [], set()
    for name, p in table.items():
        if name == "lm_head.weight" and shape.tied_embeddings:
            continue
        if name not in rules:
            out.append((name, tuple(p.shape), [(name, 0, 0)]))
            continue
        n, rule = rules[name]
        whole = f"model.layers.{n}.{rule.name}"
        if whole in done:
            continue
        done.add(whole)
        parts, offset = [], 0
        for part in rule.parts:
            part_name = f"model.layers.{n}.{part}"
            parts.append((part_name, rule.dim, offset))
            offset += table[part_name].shape[rule.dim]
        full = list(table[parts[0][0]].shape)
        full[rule.dim] = offset
        out.append((whole, tuple(full), parts))
    return out


def export_plan(shape, table: dict, layout: Layout, itemsize: int, max_file_bytes: int) -> list[ExportTensor]:
    """Every exported tensor with its writer (the mesh rank with the fewest bytes so far),
    its file (a writer's tensors in order, cut at `max_file_bytes`; `model.safetensors`
    when there is one file) and the holders that send it its pieces (the writer itself
    where it holds one)."""
    hold = holders(table, shape.n_layers, layout)
    load = dict.fromkeys(layout.ranks, 0)
    placed = []
    for key, full, parts in export_units(shape, table):
        size = volume(tuple((0, n) for n in full)) * itemsize
        writer = min(layout.ranks, key=lambda r: (load[r], layout.ranks.index(r)))
        load[writer] += size
        sources = []
        for name, dim, offset in parts:
            for box, ranks in hold[name].items():
                src = writer if writer in ranks else ranks[0]
                sources.append(Source(name, src, box, shifted(box, dim, offset)))
        placed.append((key, full, writer, size, tuple(sources)))
    files: dict[int, list[list[str]]] = {}
    sizes: dict[int, int] = {}
    for key, _, writer, size, _ in placed:
        chunks = files.setdefault(writer, [])
        if not chunks or (sizes[writer] + size > max_file_bytes and sizes[writer] > 0):
            chunks.append([])
            sizes[writer] = 0
        chunks[-1].append(key)
        sizes[writer] += size
    ordered = [chunk for r in layout.ranks for chunk in files.get(r, [])]
    count = len(ordered)
    name_of = {}
    for i, chunk in enumerate(ordered, 1):
        file = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        name_of.update(dict.fromkeys(chunk, file))
    return [ExportTensor(key, full, writer, name_of[key], sources) for key, full, writer, _, sources in placed]
