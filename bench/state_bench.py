"""What a checkpoint save (weights, Adam moments, RNG) plus the HF export costs each rank:
a ~143M-parameter Llama (SmolLM2-135M's widths, 8 heads / 4 kv heads so tp = 4 divides
them, intermediate 1728) on 4 gloo processes at tp = 4, with Adam state, saved through
`ckpt_store.save` as a run does.

Each rank resets its peak resident memory (/proc/self/clear_refs) just before the save
and reads it after: the save's extra memory, per rank, beside the full training state
(12 bytes per parameter: weights and both moments, fp32). Also the save's seconds. Rounds alternate with the code of a
given git commit (`--base`, put first on PYTHONPATH) when one is named.

    flock /tmp/rlhfc-bench.lock python bench/state_bench.py [--rounds 3] [--base-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(vocab=49152, hidden=576, intermediate=1728, n_layers=30, n_heads=8, n_kv_heads=4,
             max_positions=2048, tied_embeddings=True)
ROOT = Path(__file__).resolve().parents[1]


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def state_bytes(shape: dict) -> int:
    """12 bytes (fp32 weights, both Adam moments) per parameter of an inline shape, once
    each (a tied lm_head is the embedding)."""
    from rlhfc_runtime.calls import hf_config
    from rlhfc_runtime.contract.family import shape_from_hf
    from rlhfc_runtime.contract.shapes import param_table

    full = shape_from_hf(hf_config({"shape": shape}))
    return 12 * sum(math.prod(p.shape) for n, p in param_table(full).items()
                    if not (full.tied_embeddings and n == "lm_head.weight"))


def _worker(out: str):
    import inspect
    from types import SimpleNamespace

    import torch

    from rlhfc_runtime import ckpt_store
    from rlhfc_runtime.calls import build_model
    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.dist import ensure_groups

    layout = Layout((0, 1, 2, 3), 1, 4, 1)
    ensure_groups([layout])
    from rlhfc_runtime.contract.program import ModelSpec
    from rlhfc_runtime.contract.shapes import ModelShape

    spec = ModelSpec("llama", shape=ModelShape(**SHAPE), trainable=True, optimizer={"name": "adam", "lr": 1e-4},
                     home="L")
    m = build_model(spec, layout)
    for p in m.module.parameters():
        p.grad = torch.full_like(p, 1e-3)
    m.optimizer.step()
    for p in m.module.parameters():
        p.grad = None
    rank = torch.distributed.get_rank()
    engine = SimpleNamespace(out=Path(out), step=1, rank=rank, world=4, layouts={"L": layout},
                             program={"models": {"actor": spec}, "run": {}, "datasets": {}, "estimates": {}},
                             models={("actor", "L"): m}, loaders={}, specials={}, seed=0)
    if inspect.signature(ckpt_store.save).parameters["export"].default is None:
        from rlhfc_runtime.export import stage  # the gathering code before sharded checkpoints

        export = lambda name, s, weights: stage(Path(out), name, s, weights, None, {})  # noqa: E731
    else:
        export = True
    params = state_bytes(SHAPE) // 12
    results = []
    for step in (1, 2):
        engine.step = step
        gc.collect()
        torch.distributed.barrier()
        Path("/proc/self/clear_refs").write_text("5")
        base = _kib("VmRSS")
        t0 = time.perf_counter()
        ckpt_store.save(engine, keep=1, export=export)
        seconds = time.perf_counter() - t0
        results.append({"rank": rank, "extra": _kib("VmHWM") - base, "seconds": seconds, "params": params})
    return results


def one_round(pythonpath: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, RLHFC_THREADS="1")
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        code = ("import json, sys; sys.path.insert(0, %r); import state_bench; from rlhfc_runtime.dist import spawn; "
                "print(json.dumps(spawn(state_bench._worker, 4, %r)))") % (str(ROOT / "bench"), tmp)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        ranks = json.loads(done.stdout.strip().splitlines()[-1])
    last = [r[-1] for r in ranks]  # the second save (the first also creates the files' directories)
    total = last[0]["params"]  # the model's parameters, once (a tied lm_head is the embedding)
    extras = [r["extra"] for r in last]
    return {"state_bytes": 12 * total, "params": total, "extra_per_rank": extras,
            "above_others": max(extras) - min(extras), "seconds": max(r["seconds"] for r in last)}


def alternate(one_round, rounds: int) -> dict[str, list[dict]]:
    """`one_round(pythonpath)` for this code and, with --base-dir, the older runtime in
    that directory, alternating, --rounds times each."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--base-dir", help="a directory holding the old rlhfc_runtime package, to compare against")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"sharded": [], "base": []}
    for _ in range(args.rounds):
        runs["sharded"].append(one_round(None))
        if args.base_dir:
            runs["base"].append(one_round(args.base_dir))
    return runs


def main() -> None:
    runs = alternate(one_round, 3)
    summary = {}
    for name, rs in runs.items():
        if not rs:
            continue
        state = rs[0]["state_bytes"]
        summary[name] = {
            "params": rs[0]["params"], "state_bytes": state,
            "max_extra_bytes": statistics.median(max(r["extra_per_rank"]) for r in rs),
            "above_others_bytes": statistics.median(r["above_others"] for r in rs),
            "above_others_fraction": statistics.median(r["above_others"] for r in rs) / state,
            "max_extra_fraction": statistics.median(max(r["extra_per_rank"]) for r in rs) / state,
            "save_seconds": statistics.median(r["seconds"] for r in rs), "rounds": rs,
        }
    if runs["base"]:
        summary["save_seconds_ratio_per_round"] = [a["seconds"] / b["seconds"] for a, b in zip(runs["sharded"], runs["base"])]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
