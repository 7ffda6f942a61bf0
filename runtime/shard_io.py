"""A trainable model's checkpoint shards on disk: each rank streams the pieces
`shard_plan.write_plan` gives it (weights and both Adam moments) into its own
safetensors file, one tensor at a time, and each file's header and the manifest record
which interval of which full tensor every key holds. A resume reads, from whichever
files hold them, exactly the intersections `shard_plan.read_plan` lists: no rank ever
holds more than its own shards plus the one piece it is copying.

    MODEL.rank{R}.safetensors    keys `weight/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME`

An entry of the manifest: {"file", "key", "name", "box": [[start, stop], ...]}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from rlhfc_runtime.shard_plan import Box, read_plan, slices_of, volume, write_plan
from rlhfc_runtime.tensor_file import TensorFile

KINDS = ("weight", "exp_avg", "exp_avg_sq")


def shard_file(model: str, rank: int) -> str:
    return f"{model}.rank{rank}.safetensors"


def _moment(optimizer, param: torch.Tensor, kind: str) -> torch.Tensor:
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    return state[kind] if kind in state else torch.zeros_like(param.detach())


def write_shards(directory: Path, model: str, module, optimizer) -> tuple[str | None, list[dict]]:
    """Write this rank's pieces of `module` (and its optimizer's moments) to
    DIRECTORY/MODEL.rank{R}.safetensors; returns (the file's name or None when it writes
    nothing, the manifest entries). OSError (naming the file and the bytes) on failure."""
    g = module.groups
    plan = write_plan(module.table, module.cfg.shape.n_layers, g.layout)[g.rank]
    if not plan:
        return None, []
    params = dict(module.named_parameters())
    file = shard_file(model, g.rank)
    kinds = KINDS if optimizer is not None else KINDS[:1]
    order, entries = [], []
    for piece in plan:
        p = params[piece.name]
        for kind in kinds:
            key = f"{kind}/{piece.name}"
            dtype = p.dtype if kind == "weight" else _moment(optimizer, p, kind).dtype
            order.append((key, dtype, tuple(p.shape)))
            entries.append({"file": file, "key": key, "name": piece.name, "box": [list(d) for d in piece.box]})
    intervals = json.dumps({e["key"]: [e["name"], e["box"]] for e in entries}, separators=(",", ":"))
    out = TensorFile(directory / file, order, {"rlhfc_intervals": intervals})
    for piece in plan:
        p = params[piece.name]
        for kind in kinds:
            out.write(f"{kind}/{piece.name}", p.detach() if kind == "weight" else _moment(optimizer, p, kind))
    out.close()
    return file, entries


@torch.no_grad()
def read_shards(directory: Path, entries: list[dict], module, kind: str) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter of `module` for `kind` ("weight": copied into
    the parameters in place, returned as they are; a moment: new tensors), filled from
    the intervals on disk that intersect it."""
    g = module.groups
    reads = read_plan(entries, module.table, module.cfg.shape.n_layers, g.layout, g.rank, prefix=f"{kind}/")
    params = dict(module.named_parameters())
    out = {n: (p if kind == "weight" else torch.zeros_like(p)) for n, p in params.items()}
    by_file: dict[str, list] = {}
    for r in reads:
        by_file.setdefault(r.file, []).append(r)
    for file, group in by_file.items():
        with safe_open(str(directory / file), "pt") as f:
            for r in group:
                piece = f.get_slice(r.key)[slices_of(r.src)]
                out[r.name][slices_of(r.dst)].copy_(piece)
    return out


def read_full(directory: Path, entries: list[dict], kind: str = "weight") -> dict[str, torch.Tensor]:
    """Whole tensors assembled from every shard of one model (tests and tools, not the
    run: it holds a whole model)."""
    shapes: dict[str, list[int]] = {}
    for e in entries:
        if e["key"].startswith(f"{kind}/"):
            stops = [b for _, b in e["box"]]
            shapes[e["name"]] = [max(a, b) for a, b in zip(shapes.get(e["name"], stops), stops)]
    out, filled = {}, dict.fromkeys(shapes, 0)
    for e in entries:
        if not e["key"].startswith(f"{kind}/"):
            continue
        with safe_open(str(Path(directory) / e["file"]), "pt") as f:
            t = f.get_tensor(e["key"])
        full = out.setdefault(e["name"], torch.empty(shapes[e["name"]], dtype=t.dtype))
        box: Box = tuple(tuple(d) for d in e["box"])
        full[slices_of(box)] = t
        filled[e["name"]] += volume(box)
    short = [n for n, t in out.items() if filled[n] != t.numel()]
    if short:
        raise ValueError(f"{directory}: the shards do not cover {short[:3]}")
    return out
