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
from dataclasses import dataclass

from rlhfc import ir
from rlhfc.plan import Plan
from rlhfc_runtime.contract.layout import Layout


@dataclass(frozen=True)
class Load:
    """Every rank reads the next batch of `dataset` into data key `key` (no collective)."""

    key: str
    dataset: str


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


@dataclass(frozen=True)
class Realloc:
    """Build `model`'s parameters in layout `dst` from its copy in layout `src`."""

    model: str
    src: str
    dst: str


@dataclass(frozen=True)
class Drop:
    """Free `model`'s parameter copy in `layout` (never its home copy)."""

    model: str
    layout: str


@dataclass(frozen=True)
class Move:
    """Redistribute data key `key` from the dp shards of `src` to those of `dst`."""

    key: str
    src: str
    dst: str


@dataclass(frozen=True)
class Offload:
    """Free `model`'s device copy in `layout`; its weights wait in host memory."""

    model: str
    layout: str


@dataclass(frozen=True)
class Reload:
    """Bring `model`'s offloaded weights back to the devices of `layout` (no-op if there)."""

    model: str
    layout: str


Op = Load | Call | Realloc | Drop | Move | Offload | Reload


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
    if isinstance(op, Load):
        return tuple(sorted({r for lay in layouts.values() for r in lay.ranks}))
    names = (op.layout,) if isinstance(op, (Call, Drop, Offload, Reload)) else (op.src, op.dst)
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
    names = _Layouts(plan.cluster)
    order = call_order(dataflow, plan)
    neural = [m for m in dataflow.models if m.kind != ir.ModelKind.RULE]
    homes = {m.name: names.name(plan.home(m.name)) for m in neural if m.name in dict(plan.homes)}
    call_layout = {c.name: names.name(plan.placement(c.name).strategy) for c in order}
    for c in order:  # models the plan gives no home live where their first call runs
        if dataflow.model(c.model).kind != ir.ModelKind.RULE:
            homes.setdefault(c.model, call_layout[c.name])

    producers = {k: c.name for c in dataflow.calls for k in c.outputs}  # data key -> its call
    ops: list[Op] = []
    where: dict[str, set[str]] = {}  # data key -> layouts holding it
    for c in order:
        for key in c.inputs:
            if key not in producers and key not in where:
                ops.append(Load(key, _dataset_of(key, dataflow)))
                where[key] = set(call_layout.values()) | set(homes.values())

    copies = {m: {h} for m, h in homes.items()}  # model -> layouts holding its parameters
    last_use = {}
    for i, c in enumerate(order):
        last_use[(c.model, call_layout[c.name])] = i
    moved: set[str] = set()  # calls whose inputs are already in their layout

    def move_inputs(d: ir.Call) -> None:
        lay = call_layout[d.name]
        for key in d.inputs:
            if lay not in where[key]:
                ops.append(Move(key, _nearest(where[key], lay, names), lay))
                where[key].add(lay)
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
            ops.append(Realloc(c.model, homes[c.model], lay))
            copies[c.model].add(lay)
        if c.model in plan.offloaded:
            ops.append(Reload(c.model, lay))
        ops.append(Call(c.name, c.model, c.kind.value, c.interface, lay, c.inputs, c.outputs,
                        call_settings(c, plan, neural=model.kind != ir.ModelKind.RULE)))
        if c.model in plan.offloaded:
            ops.append(Offload(c.model, lay))
        for key in c.outputs:
            where[key] = {lay}
        if model.kind == ir.ModelKind.RULE or lay == homes[c.model]:
            continue
        if c.kind is ir.CallKind.TRAIN:
            ops.append(Realloc(c.model, lay, homes[c.model]))
        if last_use[(c.model, lay)] == i or c.kind is ir.CallKind.TRAIN:
            ops.append(Drop(c.model, lay))
            copies[c.model].discard(lay)

    layouts = {n: lay for lay, n in names.by_layout.items()}  # in naming order: L0, L1, …
    return OpProgram(
        dataflow=dataflow,
        plan=plan,
        layouts=tuple(layouts.items()),
        homes=tuple(sorted(homes.items())),
        groups=_groups(layouts),
        ops=tuple(ops),
    )


def call_settings(call: ir.Call, plan: Plan, neural: bool = True) -> tuple[tuple[str, float | int | str], ...]:
    """What the op carries: the checker's resolved settings plus, for a call on a neural
    model, the plan's decisions for it (micro-batches, activation recompute, the
    micro-batches' token budget; an engine's memory share and pool), so the runtime runs
    what the cost model priced."""
    if not neural:
        return call.settings
    placement = plan.placement(call.name)
    strategy = placement.strategy
    return (*call.settings, ("n_mbs", strategy.n_mbs), ("recompute", strategy.recompute),
            ("token_budget", call.token_budget(strategy)), *placement.engine)


def _nearest(holders: set[str], dst: str, names: "_Layouts") -> str:
    """The source layout for a move: deterministic (the first named)."""
    return min(holders, key=names.index)


def _groups(layouts: dict[str, Layout]) -> tuple[tuple[int, ...], ...]:
    """Every layout's rank set, in naming order (moves and reallocations are
    point-to-point over the world: they need no group of their own)."""
    return tuple(dict.fromkeys(tuple(sorted(lay.ranks)) for lay in layouts.values()))
