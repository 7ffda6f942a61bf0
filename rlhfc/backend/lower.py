"""Lowering: a solved Plan plus its Dataflow become one op program for one iteration.

The op program is a single ordered list that every rank executes; an op involves only
the ranks of the layouts it names and skips itself elsewhere. Because every rank sees
the same list, any two ranks that share collective ops meet them in the same order:
no schedule produced here can deadlock. Process groups are listed up front in one fixed
order, so every rank creates them identically (torch requires that).

Parameters: a model's authoritative copy lives in its home layout (the train layout of
a trainable model). Before a call in another layout the parameters are reallocated
there; the copy is dropped after its last use in the iteration, and a train call away
from home is reallocated back, so every iteration starts and ends with models at home.
A frozen model the plan offloads is reloaded to its (only) call's devices before the
call and offloaded to host memory after it.
Data: a key lives where its producer ran; it is moved to a consumer's layout the first
time that layout needs it. Dataset keys are loaded on every rank (deterministic).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from rlhfc import ir
from rlhfc.plan import Plan
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.contract.ops import Call, Drop, Load, Move, Offload, Op, Realloc, Reload, layouts_of




@dataclass(frozen=True)
class OpProgram:
    """One iteration as ops, with every layout, model home and process group it uses."""

    dataflow: ir.Dataflow
    plan: Plan
    layouts: tuple[tuple[str, Layout], ...]
    homes: tuple[tuple[str, str], ...]
    groups: tuple[tuple[int, ...], ...]
    ops: tuple[Op, ...]

    @property
    def world_size(self) -> int:
        return self.plan.cluster.n_devices

    def layout(self, name: str) -> Layout:
        return dict(self.layouts)[name]


def strategy_layout(strategy: ir.Strategy, cluster: ir.Cluster) -> Layout:
    """The runtime layout (global ranks + degrees) of a planned strategy."""
    return Layout(strategy.mesh.ranks(cluster.devices_per_node), strategy.dp, strategy.tp, strategy.pp)


def participants(op: Op, layouts: dict[str, Layout]) -> tuple[int, ...]:
    """The ranks an op involves, sorted: the only ranks that may block on it."""
    names = layouts_of(op) or tuple(layouts)  # a load: every rank
    return tuple(sorted({r for n in names for r in layouts[n].ranks}))


def call_order(dataflow: ir.Dataflow, plan: Plan) -> list[ir.Call]:
    """Calls in an order that respects this iteration's edges, earliest planned start
    first among those ready (so the op list follows the plan's timeline)."""
    start = {p.call: (p.start, i) for i, p in enumerate(plan.calls)}
    deps = {c.name: set() for c in dataflow.calls}
    for e in dataflow.edges:
        if not e.next_iteration and e.src in deps and e.dst in deps:
            deps[e.dst].add(e.src)
    ready = [(start[n], n) for n, d in deps.items() if not d]
    heapq.heapify(ready)
    done: list[ir.Call] = []
    while ready:
        _, name = heapq.heappop(ready)
        done.append(dataflow.call(name))
        for other, d in deps.items():
            if name in d:
                d.discard(name)
                if not d:
                    heapq.heappush(ready, (start[other], other))
    if len(done) != len(dataflow.calls):
        raise ValueError("the dataflow's calls form a cycle within one iteration")
    return done


class _Layouts:
    """Names layouts L0, L1, … in first-use order, one name per distinct layout."""

    def __init__(self, cluster: ir.Cluster):
        self.cluster = cluster
        self.by_layout: dict[Layout, str] = {}

    def name(self, strategy: ir.Strategy) -> str:
        layout = strategy_layout(strategy, self.cluster)
        return self.by_layout.setdefault(layout, f"L{len(self.by_layout)}")

    def index(self, name: str) -> int:
        """Naming order of layout `name` (names are labels, never parsed)."""
        return list(self.by_layout.values()).index(name)


def _dataset_of(key: str, dataflow: ir.Dataflow) -> str:
    names = [d.name for d in dataflow.datasets]
    if key in names:
        return key
    if len(names) == 1:
        return names[0]
    raise ValueError(f"data key {key!r} is produced by no call and names no dataset")


def lower(dataflow: ir.Dataflow, plan: Plan) -> OpProgram:
    """The op program of one iteration: loads, then per call (in a dependency-respecting
    plan order) the moves and reallocations it needs, the call, and the drops after it."""
    ahead = {p.call: p.ahead for p in plan.calls}
    producers = {k: c.name for c in dataflow.calls for k in c.outputs}  # data key -> its call
    check_ahead(dataflow, ahead, producers)
    names = _Layouts(plan.cluster)
    order = call_order(dataflow, plan)
    neural = [m for m in dataflow.models if m.kind != ir.ModelKind.RULE]
    homes = {m.name: names.name(plan.home(m.name)) for m in neural if m.name in dict(plan.homes)}
    call_layout = {c.name: names.name(plan.placement(c.name).strategy) for c in order}
    for c in order:  # models the plan gives no home live where their first call runs
        if dataflow.model(c.model).kind != ir.ModelKind.RULE:
            homes.setdefault(c.model, call_layout[c.name])

    ops: list[tuple[Op, str]] = []  # (op with the `ahead` of the call it serves, that call)
    # data key -> {layout holding it: how many iterations ahead the op that put it there runs}
    where: dict[str, dict[str, int]] = {}
    for c in order:
        for key in c.inputs:
            if key not in producers and key not in where:
                readers = max(ahead[d.name] for d in dataflow.calls if key in d.inputs)  # loaded for the furthest
                ops.append((Load(key, _dataset_of(key, dataflow), readers), c.name))
                where[key] = dict.fromkeys({*call_layout.values(), *homes.values()}, max(ahead.values()))

    copies = {m: {h} for m, h in homes.items()}  # model -> layouts holding its parameters
    last_use = {}
    for i, c in enumerate(order):
        last_use[(c.model, call_layout[c.name])] = i
    moved: set[str] = set()  # calls whose inputs are already in their layout

    def move_inputs(d: ir.Call) -> None:
        lay = call_layout[d.name]
        for key in d.inputs:
            holders = {h for h, level in where[key].items() if level >= ahead[d.name]}  # there in time for d
            if lay not in holders:
                ops.append((Move(key, _nearest(holders, lay, names), lay, ahead[d.name]), d.name))
                where[key][lay] = ahead[d.name]
        moved.add(d.name)

    for i, c in enumerate(order):
        # Data moves as early as the plan's timeline allows: a later call's inputs move before
        # this call once their producers have run and were planned to end by this call's start.
        # Otherwise a consumer's moves would wait behind the calls before it in the one op order
        # every rank follows, and calls the plan overlaps (on disjoint devices) would run one
        # after the other.
        emitted = {d.name for d in order[:i]}
        for d in order[i:]:
            feeds = {producers[k] for k in d.inputs if k in producers}
            if d.name not in moved and feeds <= emitted and all(
                    plan.placement(f).end <= plan.placement(c.name).start for f in feeds):
                move_inputs(d)
        if c.name not in moved:
            move_inputs(c)
        lay = call_layout[c.name]
        model = dataflow.model(c.model)
        if model.kind != ir.ModelKind.RULE and lay not in copies[c.model]:
            ops.append((Realloc(c.model, homes[c.model], lay, ahead[c.name]), c.name))
            copies[c.model].add(lay)
        if c.model in plan.offloaded:
            ops.append((Reload(c.model, lay, ahead[c.name]), c.name))
        ops.append((Call(c.name, c.model, c.kind.value, c.interface, lay, c.inputs, c.outputs,
                         call_settings(c, plan, neural=model.kind != ir.ModelKind.RULE), ahead[c.name]), c.name))
        if c.model in plan.offloaded:
            ops.append((Offload(c.model, lay, ahead[c.name]), c.name))
        for key in c.outputs:
            where[key] = {lay: ahead[c.name]}
        if model.kind == ir.ModelKind.RULE or lay == homes[c.model]:
            continue
        if c.kind is ir.CallKind.TRAIN:
            ops.append((Realloc(c.model, lay, homes[c.model], ahead[c.name]), c.name))
        if last_use[(c.model, lay)] == i or c.kind is ir.CallKind.TRAIN:
            ops.append((Drop(c.model, lay, ahead[c.name]), c.name))
            copies[c.model].discard(lay)

    layouts = {n: lay for lay, n in names.by_layout.items()}  # in naming order: L0, L1, …
    return OpProgram(
        dataflow=dataflow,
        plan=plan,
        layouts=tuple(layouts.items()),
        homes=tuple(sorted(homes.items())),
        groups=_groups(layouts),
        ops=pipelined(ops, plan, ahead, producers),
    )


def pipelined(ops: list[tuple[Op, str]], plan: Plan, ahead: dict[str, int], producers: dict[str, str]
              ) -> tuple[Op, ...]:
    """The iteration's ops (each with the `ahead` of the call it serves) in the order of
    the steady-state body. A synchronous plan keeps the iteration's order. An
    asynchronous one orders by the planned window in the body (a call's start + ahead x
    the interval; the plan's frame): moves of data made in an earlier body first; what
    prepares a call (its loads, moves, reallocation) as an instant at its start, what
    follows it (drops, the reallocation home) at its end; at equal start the op that
    ends first first, so a zero-second rule call or a sync that the plan put before a
    train call on the same devices precedes it."""
    if not any(op.ahead for op, _ in ops):
        return tuple(op for op, _ in ops)
    at = {op.name: i for i, (op, _) in enumerate(ops) if isinstance(op, Call)}

    def window(index: int) -> tuple[float, float]:
        op, owner = ops[index]
        if isinstance(op, Move) and op.key in producers and ahead[producers[op.key]] > op.ahead:
            return (-math.inf, -math.inf)  # made in an earlier body: moved first
        p = plan.placement(owner)
        start, end = (round(t + p.ahead * plan.iteration_time, 9) for t in (p.start, p.end))  # no float dust
        if isinstance(op, Call):
            return (start, end)
        return (end, end) if index > at[owner] else (start, start)

    return tuple(ops[i][0] for i in sorted(range(len(ops)), key=lambda i: (*window(i), i)))


def check_ahead(dataflow: ir.Dataflow, ahead: dict[str, int], producers: dict[str, str]) -> None:
    """A call runs at most as far ahead as the calls whose data it reads (they must have
    made it in an earlier or the same body); ValueError (a planner bug) otherwise."""
    for c in dataflow.calls:
        for key in c.inputs:
            if key in producers and ahead[producers[key]] < ahead[c.name]:
                raise ValueError(f"plan runs {c.name!r} {ahead[c.name]} iteration(s) ahead but its input "
                                 f"{key!r} {ahead[producers[key]]} ahead: a planner bug")


def call_settings(call: ir.Call, plan: Plan, neural: bool = True) -> tuple[tuple[str, float | int | str], ...]:
    """What the op carries: the checker's resolved settings plus, for a call on a neural
    model, the plan's decisions for it (the micro-batches' token budget and the count it
    makes at the priced lengths, which generation runs; activation recompute; an engine's
    memory share and pool), so the runtime runs what the cost model priced."""
    if not neural:
        return call.settings
    placement = plan.placement(call.name)
    strategy = placement.strategy
    return (*call.settings, ("n_mbs", call.n_mbs(strategy)), ("recompute", strategy.recompute),
            ("token_budget", call.token_budget(strategy)), *placement.engine)


def _nearest(holders: set[str], dst: str, names: "_Layouts") -> str:
    """The source layout for a move: deterministic (the first named)."""
    return min(holders, key=names.index)


def _groups(layouts: dict[str, Layout]) -> tuple[tuple[int, ...], ...]:
    """Every layout's rank set, in naming order (moves and reallocations are
    point-to-point over the world: they need no group of their own)."""
    return tuple(dict.fromkeys(tuple(sorted(lay.ranks)) for lay in layouts.values()))
