"""The execution plan: what the solver returns, `rlhfc plan` prints and codegen embeds.

Frozen and JSON-serialisable with a schema version, so a plan can be diffed, stored
beside a run and read back byte-identically.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc.ir import Cluster, Strategy

# 2: `call_memory` per call; 3: `ahead` per call, `max_staleness`, `sync_time`; 4: a
# strategy's `token_budget` (the decision) in place of its `n_mbs` (now derived from it)
SCHEMA_VERSION = 4


@dataclass(frozen=True)
class CallPlacement:
    """One call's strategy and its estimated window and memory in the iteration.

    `start` and `end` are seconds in the frame of one iteration: 0 is the start of the
    body (a stretch of `Plan.iteration_time`) in which that iteration trains. A call
    `ahead` a ≥ 1 ran a bodies earlier, so its window is negative; in each body it runs
    at `start` + a·`iteration_time` and may end in the next body. `start` excludes the
    reallocation and data moves just before it: where they begin lies in
    [0, `iteration_time`) of the body."""

    call: str
    model: str
    strategy: Strategy
    start: float
    end: float
    peak_memory: int  # bytes on the fullest device of the mesh, every resident model included
    # bytes the call's own model copy and work need there: what `peak_bytes/CALL` measures
    call_memory: int
    # Iterations ahead of the step being trained this call runs for, in the steady state of
    # an asynchronous plan (`Plan.max_staleness` > 0): 1 for a generate call that samples
    # step t+1's rollouts while step t trains. 0 in synchronous plans.
    ahead: int = 0
    # A generate call on another engine (vLLM): the plan's decisions for it (its memory
    # share, KV pool, context length, start-up estimate; `planner.cost.engine`), which the
    # call's settings carry to the runtime. Empty for every other call.
    engine: tuple[tuple[str, float | int], ...] = ()


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
    between iterations: the train call's layout for trainable models, unless the model
    is `offloaded`.
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
    # Frozen models whose weights wait in host memory between iterations, reloaded before
    # their call (chosen only when the plan does not fit in device memory otherwise).
    offloaded: tuple[str, ...] = ()
    # What priced it: fitted coefficients, a measured profile (given, or this machine's,
    # measured once and cached), or the catalog's defaults (`driver.compile_program`).
    priced_by: str = ""
    # K of the run (`max_staleness`). With K > 0, `iteration_time` is the steady state's
    # seconds per step (the initiation interval) and `sync_time` the synchronous plan's.
    max_staleness: int = 0
    sync_time: float | None = None

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


# --- JSON (schema `SCHEMA_VERSION`): sorted keys, floats as Python's shortest repr ---


def _strategy_dict(s: Strategy) -> dict:
    m = s.mesh
    return {
        "mesh": {"first_node": m.first_node, "n_nodes": m.n_nodes, "first_device": m.first_device, "n_devices": m.n_devices},
        "dp": s.dp, "tp": s.tp, "pp": s.pp, "token_budget": s.token_budget, "recompute": s.recompute,
    }


def _strategy_from(d: dict) -> Strategy:
    from rlhfc.ir import Mesh

    return Strategy(Mesh(**d["mesh"]), d["dp"], d["tp"], d["pp"], d["token_budget"], bool(d.get("recompute", False)))


def plan_to_json(plan: Plan, include_timing: bool = False) -> str:
    """The plan as JSON text. Byte-identical across runs of a deterministic solve: the
    wall-clock `solve_seconds` is written only with `include_timing`."""
    import json

    c = plan.cluster
    doc = {
        "schema_version": plan.schema_version,
        "source": plan.source,
        "cluster": {"nodes": c.nodes, "devices_per_node": c.devices_per_node, "device": c.device,
                    "overrides": [[k, v] for k, v in c.overrides]},
        "calls": [
            {"call": p.call, "model": p.model, "strategy": _strategy_dict(p.strategy), "start": p.start,
             "end": p.end, "peak_memory": p.peak_memory,
             "call_memory": p.call_memory, "ahead": p.ahead,
             **({"engine": [list(kv) for kv in p.engine]} if p.engine else {})}
            for p in plan.calls
        ],
        "homes": [[m, _strategy_dict(s)] for m, s in plan.homes],
        "reallocations": [
            {"model": r.model, "before_call": r.before_call, "src": _strategy_dict(r.src), "dst": _strategy_dict(r.dst),
             "bytes": r.bytes, "seconds": r.seconds}
            for r in plan.reallocations
        ],
        "iteration_time": plan.iteration_time,
        "lower_bound": plan.lower_bound,
        "status": plan.status,
        "baseline_time": plan.baseline_time,
        "offloaded": list(plan.offloaded),
        "max_staleness": plan.max_staleness,
        "sync_time": plan.sync_time,
    }
    if plan.priced_by:
        doc["priced_by"] = plan.priced_by
    if include_timing:
        doc["solve_seconds"] = plan.solve_seconds
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def plan_from_json(text: str) -> Plan:
    """Read back `plan_to_json`; rejects other schema versions (a plan of version 3 or
    older holds micro-batch counts, not the token budgets they were priced at)."""
    import json

    d = json.loads(text)
    if d.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"plan schema version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}: "
                         "plan the program again (`rlhfc plan --json`)")
    c = d["cluster"]
    return Plan(
        d["source"],
        Cluster(c["nodes"], c["devices_per_node"], c["device"], tuple((k, v) for k, v in c["overrides"])),
        tuple(CallPlacement(p["call"], p["model"], _strategy_from(p["strategy"]), p["start"], p["end"], p["peak_memory"],
                            p["call_memory"], p["ahead"], tuple((k, v) for k, v in p.get("engine", ())))
              for p in d["calls"]),
        tuple((m, _strategy_from(s)) for m, s in d["homes"]),
        tuple(Reallocation(r["model"], r["before_call"], _strategy_from(r["src"]), _strategy_from(r["dst"]), r["bytes"],
                           r["seconds"]) for r in d["reallocations"]),
        d["iteration_time"], d["lower_bound"], d["status"], d.get("solve_seconds", 0.0), d["baseline_time"],
        d["schema_version"], tuple(d.get("offloaded", ())), d.get("priced_by", ""), d["max_staleness"],
        d["sync_time"],
    )


Plan.to_json = plan_to_json  # type: ignore[attr-defined]
Plan.from_json = staticmethod(plan_from_json)  # type: ignore[attr-defined]
