"""A sharded model written as a Hugging Face checkpoint without gathering it: every
exported tensor has one writer in the model's mesh (`shard_plan.export_plan`, spread by
size), the holders of its pieces send them there, and the writer streams it into its
file (`tensor_file.TensorFile`) before the next one. So a process holds its own shards
plus one full tensor (and the piece it is receiving), whatever the model's size.

All ranks of the mesh walk the plan in the same order (blocking send / recv), so the
exchange cannot deadlock; a writer whose file fails keeps receiving (and drops the
data), so one full disk never leaves a peer waiting. The index is the plan's, written
by the caller once every file is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rlhfc_runtime.contract.atomic import write_atomic
from rlhfc_runtime.dist import group
from rlhfc_runtime.shard_plan import ExportTensor, export_plan, slices_of, volume
from rlhfc_runtime.tensor_file import TensorFile


MAX_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained


def plan_of(module, max_file_bytes: int = MAX_SHARD_BYTES) -> list[ExportTensor]:
    itemsize = torch.empty((), dtype=module.dtype).element_size()
    return export_plan(module.cfg.shape, module.table, module.groups.layout, itemsize, max_file_bytes)


def prepare_dir(module, directory: Path, fresh: bool) -> None:
    """`directory` (emptied first when `fresh`), made by the mesh's first rank before any
    rank writes in it (collective over the mesh)."""
    layout = module.groups.layout
    if module.groups.rank == layout.ranks[0]:
        if fresh:
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
    if len(layout.ranks) > 1:
        dist.barrier(group=group(layout.ranks))


def stream(module, directory: Path, plan: list[ExportTensor], write: bool = True) -> OSError | None:
    """Write this rank's files of `plan` into `directory` (collective over the mesh);
    returns the OSError that stopped its writing, if any. `write=False`: take part in
    the exchange only (this rank already failed)."""
    me = module.groups.rank
    shards = module.shards()
    problem: OSError | None = None
    current: tuple[str, TensorFile | None] | None = None
    mine = [t for t in plan if t.writer == me]
    for t in plan:
        if t.writer != me:
            for s in t.sources:
                if s.rank == me:
                    dist.send(shards[s.name].contiguous(), t.writer)
            continue
        if current is None or current[0] != t.file:
            if current is not None and current[1] is not None:
                problem = problem or _close(current[1])
            out = None
            if write and problem is None:
                try:
                    out = TensorFile(directory / t.file, [(x.key, module.dtype, x.shape) for x in mine if x.file == t.file])
                except OSError as err:
                    problem = err
            current = (t.file, out)
        full = torch.empty(t.shape, dtype=module.dtype)
        for s in t.sources:
            view = full[slices_of(s.dst)]
            if s.rank == me:
                view.copy_(shards[s.name])
            else:
                buf = torch.empty(tuple(b - a for a, b in s.box), dtype=module.dtype, device=module.device)
                dist.recv(buf, s.rank)
                view.copy_(buf)
        if current[1] is not None:
            try:
                current[1].write(t.key, full)
            except OSError as err:
                problem, current = err, (t.file, None)
        del full
    if current is not None and current[1] is not None:
        problem = problem or _close(current[1])
    return problem


def _close(out: TensorFile) -> OSError | None:
    try:
        out.close()
    except OSError as err:
        return err
    return None


def write_index(directory: Path, plan: list[ExportTensor], itemsize: int) -> None:
    """model.safetensors.index.json when the plan has more than one file (written last,
    once every file is complete)."""
    files = {t.file for t in plan}
    if len(files) <= 1:
        return
    total = sum(volume(tuple((0, n) for n in t.shape)) for t in plan) * itemsize
    index = {"metadata": {"total_size": total}, "weight_map": {t.key: t.file for t in plan}}
    write_atomic(directory / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())


def agree(module, problem: OSError | None) -> OSError | None:
    """The first problem of any rank of the mesh, on every rank of it."""
    ranks = module.groups.layout.ranks
    if len(ranks) == 1:
        return problem
    box = [None] * len(ranks)
    dist.all_gather_object(box, None if problem is None else (problem.errno, problem.strerror, problem.filename),
                           group=group(ranks))
    first = next((b for b in box if b is not None), None)
    return None if first is None else OSError(*first)

