"""Shared fixtures of the reallocation tests: a tiny LLaMA-shaped parameter set, every
layout of a 4-rank world, and a spawned gloo world that returns each rank's result."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile

from rlhfc_runtime.layout import Layout

N_LAYERS = 4
MESHES = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]


def tiny_llama_shapes(hidden: int = 32, inter: int = 64, vocab: int = 64, kv: int = 16, n_layers: int = N_LAYERS):
    """Full shapes of a LLaMA checkpoint (GQA: k/v smaller than q) with a value head."""
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
        "score.weight": (1, hidden),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    return shapes


def all_layouts() -> list[Layout]:
    """Every (mesh, dp, tp, pp) with dp*tp*pp = mesh size on the aligned meshes of 4 ranks."""
    out = []
    for mesh in MESHES:
        n = len(mesh)
        for dp in range(1, n + 1):
            for tp in range(1, n // dp + 1):
                if n % (dp * tp) == 0:
                    out.append(Layout(mesh, dp, tp, n // (dp * tp)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args):
    import datetime

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_world(fn, world: int, *args) -> list:
    """Run `fn(rank, *args)` on `world` spawned gloo processes; their return values."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
