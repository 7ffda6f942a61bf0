"""The ops of a compiled program: what the compiler's lowering produces, the generated
file spells out as constructor calls, and the engine executes, one handler per op type.

Pure Python, no torch: the compiler imports it too. Every op has `ahead`: the number
of iterations ahead of the step being trained that it works for. In a synchronous
program every op has ahead 0. In an asynchronous one (`max_staleness = K` > 0) a
generate call, the reallocation that feeds it and the calls that only need its output
may run ahead (≤ K): the engine's body of step t runs each op for iteration t + ahead,
so step t+1's rollouts are sampled while step t trains.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """Every rank reads the next batch of `dataset` into data key `key` (no collective)."""

    key: str
    dataset: str
    ahead: int = 0


@dataclass(frozen=True)
class Call:
    """Run `interface` on `model` in `layout`, each dp rank on its share of the batch.
    `settings` is every value the runtime reads for it (`call_settings`): nothing else."""

    name: str
    model: str
    kind: str
    interface: str
    layout: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    settings: tuple[tuple[str, float | int | str], ...]
    ahead: int = 0


@dataclass(frozen=True)
class Realloc:
    """Build `model`'s parameters in layout `dst` from its copy in layout `src`."""

    model: str
    src: str
    dst: str
    ahead: int = 0


@dataclass(frozen=True)
class Drop:
    """Free `model`'s parameter copy in `layout` (never its home copy)."""

    model: str
    layout: str
    ahead: int = 0


@dataclass(frozen=True)
class Move:
    """Redistribute data key `key` from the dp shards of `src` to those of `dst`."""

    key: str
    src: str
    dst: str
    ahead: int = 0


@dataclass(frozen=True)
class Offload:
    """Free `model`'s device copy in `layout`; its weights wait in host memory."""

    model: str
    layout: str
    ahead: int = 0


@dataclass(frozen=True)
class Reload:
    """Bring `model`'s offloaded weights back to the devices of `layout` (no-op if there)."""

    model: str
    layout: str
    ahead: int = 0


Op = Load | Call | Realloc | Drop | Move | Offload | Reload
OP_TYPES = (Load, Call, Realloc, Drop, Move, Offload, Reload)


def layouts_of(op: Op) -> tuple[str, ...]:
    """The layouts an op names: its ranks are the only ones that take part."""
    if isinstance(op, Load):
        return ()
    if isinstance(op, (Realloc, Move)):
        return (op.src, op.dst)
    return (op.layout,)
