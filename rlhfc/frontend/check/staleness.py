"""Asynchrony: what `max_staleness = K` (K >= 1) needs to be pipelined.

A rollout K updates behind is a generate call sampling from a model that a train call
of the same dataflow updates: the generate call of step t + K may run while step t
trains. A dataflow with no generate call, or one whose generate call reads a model no
call trains, has nothing to run ahead, so K there is an error rather than a no-op.
"""

from __future__ import annotations

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import Reporter

_WHY = "max_staleness needs a generate call whose model a train call updates"


def check_staleness(run: ast.RunStmt, config: ir.RunConfig, calls: tuple[ir.Call, ...], rep: Reporter) -> None:
    """E034 at the run block's `max_staleness` when K >= 1 has no stale rollout to allow."""
    k = config.max_staleness
    if not k:
        return
    opt = next(o for o in run.options if o.key.text == "max_staleness")
    trained = {c.model for c in calls if c.kind is ir.CallKind.TRAIN}
    generating = [c for c in calls if c.kind is ir.CallKind.GENERATE]
    if not generating:
        rep.error("E034", f"{_WHY}: `{config.dataflow}` has no generate call, so max_staleness = {k} "
                          "has no rollout to run ahead", opt.value.span, "remove max_staleness (or set it to 0)")
    for call in generating:
        if call.model not in trained:
            rep.error("E034", f"{_WHY}: generate call `{call.name}` samples from `{call.model}`, which no "
                              f"train call of `{config.dataflow}` updates", opt.value.span,
                      "remove max_staleness (or set it to 0): a frozen model's rollouts are never stale")
