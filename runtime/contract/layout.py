"""How a model's parameters are spread over the ranks of a layout: the one convention
that the sharded model, checkpoint loading, reallocation and the cost model share.

Pure Python, no torch: the compiler imports it too.

Rank order inside a mesh: index = (pp_rank * dp + dp_rank) * tp + tp_rank, so tensor
parallel groups are consecutive devices (inside one node) and pipeline stages are the
slowest-varying coordinate. Parameters are named as in Hugging Face checkpoints, and
which dimension tensor parallelism splits comes from the model's parameter table
(`shapes.param_table`): callers pass it, nothing here guesses it from a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

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


def shard_slices(
    name: str, full_shape: tuple[int, ...], n_layers: int, layout: Layout, rank: int, split: int | None,
) -> tuple[slice, ...] | None:
    """The slice of the full tensor `name` that `rank` holds under `layout`, or None;
    `split` is the dimension tensor parallelism splits (None: replicated), from the
    model's parameter table (`shapes.param_table`), the one place that says it.

    This is the definition of a shard: loading, saving and reallocation all go through
    it, so a test that compares against `full[shard_slices(...)]` checks all of them.
    """
    c = layout.coord(rank)
    if c is None:
        return None
    pp_rank, _, tp_rank = c
    if pp_rank not in param_stages(name, n_layers, layout.pp):
        return None
    out = [slice(0, n) for n in full_shape]
    if split is not None and layout.tp > 1:
        size = full_shape[split]
        if size % layout.tp:
            raise ValueError(f"{name}: dim {split} of size {size} is not divisible by tp={layout.tp}")
        part = size // layout.tp
        out[split] = slice(tp_rank * part, (tp_rank + 1) * part)
    return tuple(out)
