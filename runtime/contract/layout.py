"""How a model's parameters are spread over the ranks of a layout: the one convention
that the sharded model, checkpoint loading, reallocation and the cost model share.

Pure Python, no torch: the compiler imports it too.

Rank order inside a mesh: index = (pp_rank * dp + dp_rank) * tp + tp_rank, so tensor
parallel groups are consecutive devices (inside one node) and pipeline stages are the
slowest-varying coordinate. Parameters are named as in Hugging Face checkpoints, and
which dimension tensor parallelism splits comes from the parameter table (`shapes.TABLE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhfc_runtime.contract.shapes import TABLE

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

# name suffix -> the tp split dimensions the table gives it (one, except for q/k norms,
# which are per head (replicated) in Qwen3 and Gemma 3 and over all heads (split) in OLMo 2)
_SPLITS: dict[str, set] = {}
for _row in TABLE:
    _SPLITS.setdefault(_row.name, set()).add(_row.split)
UNSET = object()


@dataclass(frozen=True)
class Layout:
    """A model's placement at run time: the global ranks of its mesh and its degrees."""

    ranks: tuple[int, ...]
    dp: int
    tp: int
    pp: int

    def __post_init__(self):
        if self.dp * self.tp * self.pp != len(self.ranks):
            raise ValueError(f"dp*tp*pp = {self.dp * self.tp * self.pp} != mesh size {len(self.ranks)}")

    def coord(self, rank: int) -> tuple[int, int, int] | None:
        """(pp_rank, dp_rank, tp_rank) of a global rank, or None if it is not in the mesh."""
        if rank not in self.ranks:
            return None
        i = self.ranks.index(rank)
        return i // (self.dp * self.tp), (i // self.tp) % self.dp, i % self.tp

    def rank_at(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return self.ranks[(pp_rank * self.dp + dp_rank) * self.tp + tp_rank]

    def tp_group(self, pp_rank: int, dp_rank: int) -> tuple[int, ...]:
        return tuple(self.rank_at(pp_rank, dp_rank, t) for t in range(self.tp))

    def dp_group(self, pp_rank: int, tp_rank: int) -> tuple[int, ...]:
        return tuple(self.rank_at(pp_rank, d, tp_rank) for d in range(self.dp))

    def pp_group(self, dp_rank: int, tp_rank: int) -> tuple[int, ...]:
        return tuple(self.rank_at(p, dp_rank, tp_rank) for p in range(self.pp))


def stage_layers(n_layers: int, pp: int, stage: int) -> range:
    """The decoder layers pipeline stage `stage` of `pp` holds (even split, earlier
    stages one shorter when it does not divide)."""
    return range(n_layers * stage // pp, n_layers * (stage + 1) // pp)


def param_stages(name: str, n_layers: int, pp: int) -> tuple[int, ...]:
    """The pipeline stages that hold parameter `name`."""
    m = _LAYER.match(name)
    if m:
        layer = int(m.group(1))
        return tuple(s for s in range(pp) if layer in stage_layers(n_layers, pp, s))
    if name.startswith("model.embed_tokens."):
        return (0,)
    return (pp - 1,)  # final norm, lm_head, value head (score.*)


def tp_split_dim(name: str) -> int | None:
    """The dimension tensor parallelism splits for `name` (None: replicated), from the
    table. ValueError for a name whose split depends on the family (q/k norms): callers
    that hold the model's `param_table` pass its `split` instead."""
    m = _LAYER.match(name)
    splits = _SPLITS.get(name[m.end():] if m else name, {None})
    if len(splits) > 1:
        raise ValueError(f"{name}: its tp split depends on the model family; pass the param_table's split")
    return next(iter(splits))


def shard_slices(
    name: str, full_shape: tuple[int, ...], n_layers: int, layout: Layout, rank: int, split=UNSET,
) -> tuple[slice, ...] | None:
    """The slice of the full tensor `name` that `rank` holds under `layout`, or None.

    This is the definition of a shard: loading, saving and reallocation all go through
    it, so a test that compares against `full[shard_slices(...)]` checks all of them.
    """
    c = layout.coord(rank)
    if c is None:
        return None
    pp_rank, _, tp_rank = c
    if pp_rank not in param_stages(name, n_layers, layout.pp):
        return None
    dim = tp_split_dim(name) if split is UNSET else split
    out = [slice(0, n) for n in full_shape]
    if dim is not None and layout.tp > 1:
        size = full_shape[dim]
        if size % layout.tp:
            raise ValueError(f"{name}: dim {dim} of size {size} is not divisible by tp={layout.tp}")
        part = size // layout.tp
        out[dim] = slice(tp_rank * part, (tp_rank + 1) * part)
    return tuple(out)
