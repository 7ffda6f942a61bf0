"""Reallocation benchmark: a ~100M-parameter LLaMA-shaped model moved between common
layouts on 4 local gloo processes, against raw gloo send/recv of the same messages.

    python bench/realloc_bench.py [--repeats 3] [--dtype float32]

Writes bench/results/realloc_bench.json and .md. For each layout change: bytes moved
(checked equal to `minimum_bytes`), median seconds of `reallocate` after one untimed
warm-up call (planning and the cold warm-up call excluded, both reported apart),
effective bandwidth, and the median seconds of posting exactly the same (src, dst, size) messages from preallocated buffers ("raw") and into freshly
allocated ones ("raw fresh"); their ratio to reallocation (median of per-repeat ratios)
is the fraction of raw gloo bandwidth reallocation reaches (copies included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rlhfc_runtime.contract.layout import Layout, shard_slices
from rlhfc_runtime.realloc import bytes_moved, messages, minimum_bytes, plan_reallocation

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 4
R = (0, 1, 2, 3)
CASES = [
    ("tp4 -> dp4", Layout(R, 1, 4, 1), Layout(R, 4, 1, 1)),
    ("tp2pp2 -> tp4", Layout(R, 1, 2, 2), Layout(R, 1, 4, 1)),
    ("dp4 -> tp2dp2", Layout(R, 4, 1, 1), Layout(R, 2, 2, 1)),
    ("pp4 -> tp4", Layout(R, 1, 1, 4), Layout(R, 1, 4, 1)),
    ("tp4 -> pp4", Layout(R, 1, 4, 1), Layout(R, 1, 1, 4)),
    ("dp2tp2 -> tp2pp2", Layout(R, 2, 2, 1), Layout(R, 1, 2, 2)),
    ("tp2@0:2 -> tp2@2:4", Layout((0, 1), 1, 2, 1), Layout((2, 3), 1, 2, 1)),
]


def llama_shapes(hidden=768, inter=2048, vocab=16000, n_layers=12, heads=12):
    """The parameter table of a LLaMA-style causal LM (~110M parameters by default)."""
    from rlhfc_runtime.contract.kinds import Head
    from rlhfc_runtime.contract.shapes import param_table
    from rlhfc_runtime.model import ModelConfig

    cfg = ModelConfig.from_hf(dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=n_layers, num_attention_heads=heads))
    return param_table(cfg.shape, Head.LM)


def _timed(fn) -> float:
    """Seconds between two barriers around `fn` (the slowest rank's time)."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _raw(plan, rank, dtype, bucket_bytes, fresh: bool):
    """Post the plan's messages with nothing else: the gloo floor. Receive buffers are
    preallocated (and reused) unless `fresh`, where they are allocated per run like the
    destination shards reallocation must create."""
    import torch
    import torch.distributed as dist

    msgs = [(m.src, m.dst, m.numel) for m in messages(plan.for_rank(rank), bucket_bytes)]
    kept = [torch.zeros(n, dtype=dtype) for _, _, n in msgs]

    def run():
        bufs = [torch.empty(n, dtype=dtype) if fresh and d == rank else b for (_, d, n), b in zip(msgs, kept)]
        reqs = [dist.isend(b, d) if s == rank else dist.irecv(b, s) for (s, d, _), b in zip(msgs, bufs)]
        for q in reqs:
            q.wait()

    return run


def _worker(shapes, n_layers, dtype_name, repeats, bucket_bytes):
    import torch
    import torch.distributed as dist

    from rlhfc_runtime.realloc import reallocate

    rank = dist.get_rank()
    dtype = getattr(torch, dtype_name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(p.shape, generator=g).to(dtype) for n, p in sorted(shapes.items())}

    def local(layout):
        return {n: t[sl].clone() for n, t in full.items() if (sl := shard_slices(n, shapes[n].shape, n_layers, layout, rank, shapes[n].split)) is not None}

    rows = []
    for label, src, dst in CASES:
        t0 = time.perf_counter()
        plan = plan_reallocation(shapes, n_layers, src, dst, itemsize, devices_per_node=WORLD)
        plan_s = time.perf_counter() - t0
        mine = local(src)
        result = {}

        def run_realloc():
            result["out"] = reallocate(mine, shapes, n_layers, src, dst, rank, dtype=dtype, device="cpu",
                                       plan=plan, bucket_bytes=bucket_bytes)

        raw, raw_fresh = _raw(plan, rank, dtype, bucket_bytes, False), _raw(plan, rank, dtype, bucket_bytes, True)
        # One untimed warm-up of each: the first call that needs this much new memory
        # pays the first touch of pages the process never had (up to 2x slower here,
        # whichever case comes first); it is reported apart as "first s".
        _timed(raw)
        _timed(raw_fresh)
        first_s = _timed(run_realloc)
        realloc_s, raw_s, fresh_s = [], [], []
        for _ in range(repeats):  # interleaved so all three see the same machine state
            result.clear()  # drop the previous output, as a training loop would (untimed)
            raw_s.append(_timed(raw))
            fresh_s.append(_timed(raw_fresh))
            realloc_s.append(_timed(run_realloc))
        want = local(dst)
        correct = set(want) == set(result["out"]) and all(torch.equal(result["out"][n], want[n]) for n in want)
        rows.append(dict(
            case=label, src=repr(src), dst=repr(dst), bytes=bytes_moved(plan),
            minimum=minimum_bytes(shapes, n_layers, src, dst, itemsize), plan_seconds=plan_s,
            seconds=statistics.median(realloc_s), first_seconds=first_s, raw_seconds=statistics.median(raw_s),
            raw_fresh_seconds=statistics.median(fresh_s),
            # per-repeat ratios (raw and realloc measured back to back), then the median:
            # robust to the machine's load drifting between repeats
            fraction_of_raw=statistics.median(r / a for r, a in zip(raw_s, realloc_s)),
            fraction_of_raw_fresh=statistics.median(f / a for f, a in zip(fresh_s, realloc_s)),
            messages=len(messages(plan.transfers, bucket_bytes)), correct=correct,
        ))
    ok = torch.tensor([all(r["correct"] for r in rows)], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    for r in rows:
        r["correct"] = bool(ok.item())
    return rows


def main() -> None:
    """Run the cases on 4 spawned gloo ranks and write the JSON and Markdown tables."""
    from rlhfc_runtime.dist import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--bucket-mib", type=int, default=64)
    args = ap.parse_args()
    shapes = llama_shapes()
    n_params = sum(_numel(p.shape) for p in shapes.values())
    rows = spawn(_worker, WORLD, shapes, 12, args.dtype, args.repeats, args.bucket_mib * 2**20)[0]
    for r in rows:
        r["bandwidth_gbs"] = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] else 0.0
        r["raw_bandwidth_gbs"] = r["bytes"] / r["raw_seconds"] / 1e9 if r["raw_seconds"] else 0.0
    meta = dict(params=n_params, dtype=args.dtype, world=WORLD, backend="gloo", repeats=args.repeats,
                bucket_mib=args.bucket_mib, statistic="median")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "realloc_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [
        f"Reallocation of a {n_params / 1e6:.0f}M-parameter LLaMA-shaped model ({args.dtype}), "
        f"{WORLD} local gloo processes, median of {args.repeats}, buckets of {args.bucket_mib} MiB.",
        "",
        "| layout change | bytes moved (= minimum) | messages | plan s | first s | realloc s | GB/s | raw s | raw GB/s "
        "| of raw | raw fresh s | of raw fresh |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = "yes" if r["bytes"] == r["minimum"] else f"NO ({r['minimum']})"
        lines.append(
            f"| {r['case']} | {r['bytes'] / 1e6:.1f} MB ({same}) | {r['messages']} | {r['plan_seconds']:.3f} | "
            f"{r['first_seconds']:.3f} | "
            f"{r['seconds']:.3f} | {r['bandwidth_gbs']:.2f} | {r['raw_seconds']:.3f} | {r['raw_bandwidth_gbs']:.2f} | "
            f"{_pct(r, 'fraction_of_raw')} | {r['raw_fresh_seconds']:.3f} | {_pct(r, 'fraction_of_raw_fresh')} |"
        )
    lines.append("")
    lines.append("raw: the same messages from preallocated buffers; raw fresh: receive buffers allocated per run, "
                 "as the new shards must be. first s: the untimed warm-up reallocation (cold memory; plans are computed "
                 "before it and never timed). Zero-byte rows are local copies or aliasing only (no wire, so no ratio).")
    lines.append(f"All destination shards bitwise equal to slices of the full tensors: {all(r['correct'] for r in rows)}.")
    (RESULTS / "realloc_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pct(row: dict, key: str) -> str:
    """A ratio as a percentage; a dash where nothing crosses the wire (no raw to compare)."""
    return f"{row[key]:.0%}" if row["bytes"] else "—"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
