"""The execution plan: what the solver returns, `rlhfc plan` prints and codegen embeds.

Frozen and JSON-serialisable with a schema version, so a plan can be diffed, stored
beside a run and read back byte-identically.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc.ir import Cluster, Strategy

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CallPlacement:
    """One call's strategy and its estimated window and memory in the iteration."""

    call: str
    model: str
    strategy: Strategy
    start: float
    end: float
    peak_memory: int  # bytes on the fullest device of the mesh


@dataclass(frozen=True)
class Reallocation:
    """Parameters of `model` move from layout `src` to layout `dst` before `before_call`."""

    model: str
    before_call: str
    src: Strategy
    dst: Strategy
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    """A whole iteration: placements in start order, reallocations, and solver facts.

    `homes` maps each model to the layout its parameters (and optimizer state) live in
    between iterations: the train call's layout for trainable models.
    """

    source: str
    cluster: Cluster
    calls: tuple[CallPlacement, ...]
    homes: tuple[tuple[str, Strategy], ...]
    reallocations: tuple[Reallocation, ...]
    iteration_time: float
    lower_bound: float
    status: str
    solve_seconds: float
    baseline_time: float | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def gap(self) -> float:
        """Relative distance to the proven bound: 0 means proven optimal."""
        if self.iteration_time <= 0:
            return 0.0
        return max(0.0, (self.iteration_time - self.lower_bound) / self.iteration_time)

    def placement(self, call: str) -> CallPlacement:
        return next(p for p in self.calls if p.call == call)

    def home(self, model: str) -> Strategy:
        return dict(self.homes)[model]
