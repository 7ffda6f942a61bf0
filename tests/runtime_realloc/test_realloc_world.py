"""Reallocation and batch redistribution executed on one spawned 4-process gloo world,
for every pair of layouts of up to 4 ranks; results compared bitwise with slices of
full tensors generated identically on every rank."""

from __future__ import annotations

from realloc_cases import N_LAYERS, all_layouts, llama_shapes, slices_of

from rlhfc_runtime.dist import spawn

SHAPES = llama_shapes()


def _full_params(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in sorted(SHAPES.items())}


def _local(full, layout, rank):

    out = {}
    for n, t in full.items():
        sl = slices_of(SHAPES, n, layout, rank)
        if sl is not None:
            out[n] = t[sl].clone()
    return out


def _params_worker(rank: int) -> list[str]:
    """Every layout pair; returns the failures this rank saw (empty when all good)."""
    import torch

    from rlhfc_runtime.realloc import bytes_moved, minimum_bytes, plan_reallocation, reallocate

    full = _full_params(1)
    failures = []
    layouts = all_layouts()
    for i, src in enumerate(layouts):
        for j, dst in enumerate(layouts):
            case = f"{src} -> {dst}"
            mine = _local(full, src, rank)
            plan = plan_reallocation(SHAPES, N_LAYERS, src, dst, itemsize=4, devices_per_node=2)
            if bytes_moved(plan) != minimum_bytes(SHAPES, N_LAYERS, src, dst, 4):
                failures.append(f"{case}: bytes {bytes_moved(plan)} != minimum")
            # odd pairs: small buckets and single (in place) messages; even: all packed
            small = (i + j) % 2 == 1
            got = reallocate(
                mine, SHAPES, N_LAYERS, src, dst, rank,
                dtype=torch.float32, devices_per_node=2,
                bucket_bytes=2048 if small else 64 * 2**20,
                single_min_bytes=1024 if small else 2**20,
                copy=(i + j) % 3 == 0,
            )
            want = _local(full, dst, rank)
            if set(got) != set(want):
                failures.append(f"{case}: rank {rank} holds {sorted(set(got) ^ set(want))} wrongly")
                continue
            for n in want:
                if got[n].shape != want[n].shape or not torch.equal(got[n], want[n]):
                    failures.append(f"{case}: rank {rank} {n} differs")
    return failures


def _batch_worker(rank: int) -> list[str]:
    import torch

    from rlhfc_runtime.transfer import receive_batch, rows_of, send_batch

    failures = []
    for batch_size in (8, 6):
        g = torch.Generator().manual_seed(batch_size)
        batch = {
            "seq": torch.randint(0, 100, (batch_size, 5), generator=g),
            "logp": torch.randn(batch_size, 5, generator=g),
            "score": torch.randn(batch_size, generator=g).to(torch.bfloat16),
        }
        for src in all_layouts():
            for dst in all_layouts():
                held = rows_of(batch_size, src, rank)
                local = None if held is None else {k: v[held[0] : held[1]].clone() for k, v in batch.items()}
                sent = send_batch(local, batch_size, src, dst, rank) if rank in src.ranks else []
                got = receive_batch(local, batch_size, src, dst, rank)
                for work in sent:
                    work.wait()
                need = rows_of(batch_size, dst, rank)
                want = {} if need is None else {k: v[need[0] : need[1]] for k, v in batch.items()}
                if set(got) != set(want) or any(
                    got[k].dtype != v.dtype or not torch.equal(got[k], v) for k, v in want.items()
                ):
                    failures.append(f"batch {batch_size} {src} -> {dst}: rank {rank} wrong rows")
    return failures


def _world_worker() -> list[str]:
    import torch.distributed as dist

    rank = dist.get_rank()
    return _params_worker(rank) + _batch_worker(rank)


def test_every_layout_pair_on_four_gloo_ranks():
    results = spawn(_world_worker, 4)
    failures = [f for per_rank in results for f in per_rank]
    assert failures == []
