"""Shared fixtures of the reallocation tests: a tiny LLaMA-shaped parameter set and
every layout of a 4-rank world."""

from __future__ import annotations

from rlhfc_runtime.contract.kinds import Head
from rlhfc_runtime.contract.layout import Layout, shard_slices
from rlhfc_runtime.contract.shapes import Param, param_table
from rlhfc_runtime.model import ModelConfig

N_LAYERS = 4
MESHES = [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]


def llama_shapes(hidden: int = 32, inter: int = 64, vocab: int = 64, heads: int = 4, kv_heads: int = 2,
                 n_layers: int = N_LAYERS) -> dict[str, Param]:
    """The parameter table of a LLaMA checkpoint (GQA) with both an LM head and a value
    head, so every parameter kind the runtime shards appears."""
    cfg = ModelConfig.from_hf(dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
    ))
    return {**param_table(cfg.shape, Head.LM), **param_table(cfg.shape, Head.VALUE)}


def slices_of(params: dict[str, Param], name: str, layout: Layout, rank: int, n_layers: int = N_LAYERS):
    """`shard_slices` of parameter `name` of the table `params`."""
    return shard_slices(name, params[name].shape, n_layers, layout, rank, params[name].split)


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
