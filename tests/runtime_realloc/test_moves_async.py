"""Data on a real 2-process gloo world without pickled collectives: a move's sender posts
its rows and goes on before any receiver has asked (what the planner prices: a move costs
the producer nothing), a receiver with an empty chunk still gets the keys' shapes and
dtypes; a train call's batch is gathered over dp with uneven chunks, and the metrics
reach rank 0 as JSON."""

from __future__ import annotations

from datetime import timedelta

from rlhfc_runtime.dist import spawn


def _worker() -> list[str]:
    import torch
    import torch.distributed as dist

    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.transfer import receive_batch, rows_of, send_batch

    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    failures = []
    full = {"seq": torch.arange(12).reshape(4, 3), "score": torch.tensor([0.5, 1.5, 2.5, 3.5]).to(torch.bfloat16)}
    src, dst = Layout((0,), 1, 1, 1), Layout((1,), 1, 1, 1)
    if rank == 0:
        sent = send_batch(full, 4, src, dst, rank)
        store.set("posted", "1")  # only reachable if posting did not wait for the receiver
        for work in sent:
            work.wait()
    else:
        store.wait(["posted"], timedelta(seconds=60))
        got = receive_batch(None, 4, src, dst, rank)
        if set(got) != set(full) or any(not torch.equal(got[k], v) or got[k].dtype != v.dtype for k, v in full.items()):
            failures.append("rank 1 got other rows than rank 0 sent")

    # One row over dp = 2: rank 0 holds nothing of the source and gets an empty chunk.
    one = {k: v[:1] for k, v in full.items()}
    src, dst = Layout((1,), 1, 1, 1), Layout((0, 1), 2, 1, 1)
    sent = send_batch(one if rank == 1 else None, 1, src, dst, rank) if rank in src.ranks else []
    got = receive_batch(one if rank == 1 else None, 1, src, dst, rank)
    for work in sent:
        work.wait()
    lo, hi = rows_of(1, dst, rank)
    for k, v in one.items():
        if k not in got or got[k].dtype != v.dtype or not torch.equal(got[k], v[lo:hi]):
            failures.append(f"rank {rank}: wrong chunk of {k} for rows {lo}:{hi}")

    from rlhfc_runtime.dist import all_gather_rows, gather_json

    whole = {"ids": torch.arange(9).reshape(3, 3), "w": torch.tensor([0.5, 1.0, 2.0]).to(torch.bfloat16)}
    lo, hi = (0, 1) if rank == 0 else (1, 3)  # one row on rank 0, two on rank 1
    got = all_gather_rows({k: v[lo:hi] for k, v in whole.items()}, dist.group.WORLD, 2)
    if list(got) != list(whole) or any(got[k].dtype != v.dtype or not torch.equal(got[k], v) for k, v in whole.items()):
        failures.append(f"rank {rank}: all_gather_rows did not rebuild the batch")
    parts = gather_json({"rank": rank, "loss": float("nan") if rank else 1.5, "span": [0.25, 0.5]}, 2)
    if rank == 0:
        if parts is None or [p["rank"] for p in parts] != [0, 1] or parts[0]["loss"] != 1.5 \
                or parts[1]["loss"] == parts[1]["loss"] or parts[1]["span"] != [0.25, 0.5]:
            failures.append(f"rank 0 gathered {parts}")
    elif parts is not None:
        failures.append("gather_json returned values off rank 0")
    return failures


def test_moves_dp_gathers_and_metrics_without_pickle():
    results = spawn(_worker, 2)
    assert [f for per_rank in results for f in per_rank] == []
