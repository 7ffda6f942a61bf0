"""The planning problem as the solvers see it: every call's candidate options with their
integer durations and memory, the precedence edges with their transfer times, and the
reallocation time between layouts of one model.

Search space (ReaL, Mei et al. 2024 §4): a mesh is an aligned power-of-two slice of one
node or an aligned power-of-two run of whole nodes; tp is a power of two inside a node
dividing heads, kv heads, intermediate and vocab; pp ≤ layers; dp·tp·pp = mesh size;
pp any divisor of mesh size / tp (so nodes of 5, 6 or 7 devices plan too); dp divides
the (mini-)batch; train calls with and without activation recompute; each with token
budgets (tokens of one micro-batch on one replica; the micro-batches follow): the largest
whose priced peak fits (`fitting_budget`), and the ladder of 1, 2, 4, 8… micro-batches
(smaller budgets: a shorter pipeline bubble, room for co-located models). Slices smaller than
a node are offered on every node of clusters up to 4 nodes and on the first node of larger
ones (`SearchSpace.sub_node_nodes` sets how many; the proven bound is relative to the
space searched).

Durations are seconds rounded up to whole `Coefficients.time_unit` (1 µs by default),
so CP-SAT, brute force and MCMC optimise the very same integers.

Homes: a model's parameters live in its train call's layout (its first call's layout
for a frozen model); every other call of the model pays the reallocation from the home
layout to its own layout at its start, on its own devices.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import cached_property

from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS, Coefficients
from rlhfc.planner.cost.model import CallCost, call_cost, optimizer_steps, reload_seconds, transfer_seconds
from rlhfc.planner.cost.memory import precision_of
from rlhfc.planner.cost.realloc import meshes_overlap, realloc_cost
from rlhfc_runtime.contract.interfaces import PRECISION_BYTES, default_precision
from rlhfc.hardware import Device, device_for
from rlhfc.ir import Call, CallKind, Cluster, Dataflow, EdgeKind, Mesh, Model, ModelKind, Strategy


@dataclass(frozen=True)
class SearchSpace:
    """Knobs of the option enumeration."""

    # The budget ladder: the budgets that cut a replica's (mini-)batch into these many
    # micro-batches. None: 1, 2, 4, 8, then further doublings up to the per-replica
    # mini-batch while each still frees `memory_step` of device memory.
    n_mbs: tuple[int, ...] | None = None
    memory_step: float = 1 / 32
    # Also offer the largest budget (whole rows) whose priced peak fits the device's plan
    # memory, where the ladder skips it (`fitting_budget`).
    fit_budget: bool = True
    # Nodes that get sub-node meshes; None: every node of a cluster of up to
    # `SUB_NODE_EVERY` nodes, the first node of a larger one (nodes are interchangeable,
    # and slicing all 16 nodes of a 128-GPU cluster makes its 10 s solve 3x slower).
    sub_node_nodes: int | None = None
    # Offer train calls with activation recompute as well as without.
    recompute: bool = True
    # Also offer offloaded options for frozen single-call models (`offloaded_option`);
    # `plan_dataflow` turns this on only when the plan does not fit without it.
    offload: bool = False


@dataclass(frozen=True)
class Option:
    """One candidate strategy for one call, with its integer duration and memory."""

    call: str
    strategy: Strategy
    duration: int  # time units, compute only (reallocation is added per pair)
    cost: CallCost
    devices: frozenset[int]
    offloaded: bool = False  # the model's weights wait in host memory between iterations

    @property
    def layout(self) -> tuple:
        """What reallocation depends on: the mesh and degrees, not the token budget."""
        s = self.strategy
        return (s.mesh, s.dp, s.tp, s.pp)


@dataclass(frozen=True)
class Problem:
    """Everything a solver needs; built once by `build_problem`."""

    dataflow: Dataflow
    device: Device
    coeffs: Coefficients
    options: tuple[tuple[str, tuple[Option, ...]], ...]  # per call, in program order
    home_of: tuple[tuple[str, str], ...]  # model -> its home call
    edges: tuple[tuple[str, str], ...]  # (src, dst): dst starts after src ends, same iteration
    capacity: int
    dropped: tuple[tuple[str, int], ...] = field(default=())  # call -> options over memory
    space: SearchSpace = SearchSpace()
    # (src, dst, units) of every data edge: when dst runs in another layout than src, its
    # devices receive the edge's keys before it computes (the runtime's senders post and go
    # on, receivers wait): the keys' transfer time plus `move_latency` each. Only edges above
    # `MOVE_RESOLUTION`; an upper bound where two consumers of a key share a layout (it moves once).
    moves: tuple[tuple[str, str, int], ...] = field(default=())

    @cached_property
    def by_call(self) -> dict[str, tuple[Option, ...]]:
        return dict(self.options)

    @cached_property
    def homes(self) -> dict[str, str]:
        return dict(self.home_of)

    @cached_property
    def model_of(self) -> dict[str, Model]:
        """Call -> its model."""
        return {c.name: self.dataflow.model(c.model) for c in self.dataflow.calls}

    @property
    def calls(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.options)

    def home_call(self, call: str) -> str | None:
        """The home call whose layout `call` reallocates from, or None when it is one."""
        home = self.homes.get(self.model_of[call].name)
        return None if home in (None, call) else home

    def is_home(self, call: str) -> bool:
        return self.homes.get(self.model_of[call].name) == call

    def realloc(self, call: str, home: Option, dst: Option) -> int:
        """Time units to bring `call`'s model from the home option's layout to `dst`'s."""
        return self.to_units(self.realloc_cost(call, home, dst).seconds)

    def realloc_cost(self, call: str, home: Option, dst: Option):
        """Reallocation depends on the layouts only (`Option.layout`), not on the budget."""
        model = self.model_of[call]
        width = PRECISION_BYTES[precision_of(self.dataflow.call(call), default_precision(self.device.name))]
        return realloc_cost(
            model.shape, model.head, home.strategy, dst.strategy,
            self.dataflow.cluster.devices_per_node, self.device, self.coeffs, width,
        )

    def realloc_table(self, call: str, homes: dict[tuple, Option], dsts: dict[tuple, Option]) -> dict[tuple, int]:
        """`realloc` for every (home layout, destination layout) pair, the same integers
        computed faster: from a mesh disjoint from the destination's, the cost depends on
        the destination layout and the link only (nothing is held), so it is computed
        once per destination layout and link."""
        out = {}
        for dl, d in dsts.items():
            dm = d.strategy.mesh
            disjoint = {}  # one node? -> units from any home mesh disjoint from dm
            for hl, h in homes.items():
                hm = h.strategy.mesh
                if meshes_overlap(hm, dm):
                    out[hl, dl] = self.to_units(self.realloc_cost(call, h, d).seconds)
                    continue
                one_node = hm.n_nodes == dm.n_nodes == 1 and hm.first_node == dm.first_node
                units = disjoint.get(one_node)
                if units is None:
                    units = disjoint[one_node] = self.to_units(self.realloc_cost(call, h, d).seconds)
                out[hl, dl] = units
        return out

    @property
    def capacity_kib(self) -> int:
        return self.capacity >> 10

    def to_units(self, seconds: float) -> int:
        return to_units(seconds, self.coeffs)

    def moves_in(self, choice: dict[str, Option]) -> dict[str, int]:
        """Call -> time units its devices spend receiving data before it computes under
        `choice`: the moves of its incoming edges from calls in another layout."""
        out = dict.fromkeys(self.calls, 0)
        for a, b, units in self.moves:
            if choice[a].layout != choice[b].layout:
                out[b] += units
        return out

    def seconds(self, units: int) -> float:
        return round(units * self.coeffs.time_unit, 9)


def to_units(seconds: float, coeffs: Coefficients) -> int:
    """Round a duration up to whole solver time units (the 1e-9 absorbs float noise)."""
    return math.ceil(seconds / coeffs.time_unit - 1e-9)


def kib(nbytes: int) -> int:
    """Memory in whole KiB, rounded up: the unit of the solvers' memory constraints (keeps
    CP-SAT's coefficients far from the ~1e11 of raw bytes)."""
    return -(-nbytes >> 10)


SUB_NODE_EVERY = 4


def enumerate_meshes(cluster: Cluster, space: SearchSpace) -> list[Mesh]:
    """Aligned power-of-two node slices (on the first `sub_node_nodes` nodes of a bigger
    cluster) and aligned power-of-two runs of whole nodes, small to large."""
    dpn, nodes = cluster.devices_per_node, cluster.nodes
    meshes = []
    if space.sub_node_nodes is None:
        sliced = nodes if nodes <= SUB_NODE_EVERY else 1
    else:
        sliced = min(nodes, space.sub_node_nodes)
    size = 1
    while size < dpn:
        meshes += [Mesh(n, 1, d, size) for n in range(sliced) for d in range(0, dpn - size + 1, size)]
        size *= 2
    run = 1
    while run <= nodes:
        meshes += [Mesh(n, run, 0, dpn) for n in range(0, nodes - run + 1, run)]
        run *= 2
    return meshes


def powers_of_two(limit: int) -> list[int]:
    return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_strategies(call: Call, model: Model, mesh: Mesh, space: SearchSpace) -> list[Strategy]:
    """Every valid (dp, tp, pp, recompute) of `call` on `mesh`, with each token budget of
    the ladder (`SearchSpace.n_mbs` micro-batches of a replica's rows, where they divide them)."""
    if model.shape is None:
        return [Strategy(mesh, mesh.size, 1, 1)]
    shape = model.shape
    recompute = (False, True) if space.recompute and call.kind is CallKind.TRAIN else (False,)
    out = []
    for tp in powers_of_two(mesh.n_devices):
        # tp groups stay inside a node: tp divides the devices of each node of the mesh
        if mesh.n_devices % tp or any(x % tp for x in (shape.n_heads, shape.n_kv_heads, shape.intermediate, shape.vocab)):
            continue
        # pp any divisor of the rest (a node of 6 devices gives dp·pp = 3 or 6 per node),
        # dp what remains: dp·tp·pp = mesh size, and dp·n_mbs divides the batch below
        for pp in _divisors(mesh.size // tp):
            dp = mesh.size // (tp * pp)
            if pp > shape.n_layers:
                continue
            per_replica = mini_batch_rows(call) // dp if mini_batch_rows(call) % dp == 0 else 0
            for n_mbs in BASE_N_MBS if space.n_mbs is None else space.n_mbs:
                if per_replica and per_replica % n_mbs == 0:
                    out += [Strategy(mesh, dp, tp, pp, call.budget_for(dp, n_mbs), rc) for rc in recompute]
    return out


BASE_N_MBS = (1, 2, 4, 8)


def call_options(
    df: Dataflow, call: Call, model: Model, meshes: list[Mesh], space: SearchSpace, device: Device,
    coeffs: Coefficients, is_home: bool,
) -> list[Option]:
    """Every option of `call` on `meshes`: `enumerate_strategies`; with the default space
    the ladder's micro-batches doubled past 8 while the doubling frees at least
    `memory_step` of device memory (a layout whose activations or KV cache need more
    micro-batches gets them); and with `fit_budget` each layout's largest fitting budget."""
    options = [make_option(df, call, s, device, coeffs, is_home) for m in meshes
               for s in enumerate_strategies(call, model, m, space)]
    if space.n_mbs is None:
        step = device.plan_memory * space.memory_step
        rows = mini_batch_rows(call)
        for o in [o for o in options if call.n_mbs(o.strategy) == BASE_N_MBS[-1]]:
            s, n = o.strategy, BASE_N_MBS[-1]
            while rows % (s.dp * n * 2) == 0:
                n *= 2
                more = make_option(df, call, replace(s, token_budget=call.budget_for(s.dp, n)), device, coeffs, is_home)
                if o.cost.peak_bytes - more.cost.peak_bytes < step:
                    break
                options.append(more)
                o = more
    if space.fit_budget and model.shape is not None:
        ladders: dict[Strategy, list[Option]] = {}  # a layout (budget 0) -> its ladder's options
        for o in options:
            ladders.setdefault(replace(o.strategy, token_budget=0), []).append(o)
        options += [o for s, ladder in ladders.items()
                    if (o := fitting_budget(df, call, s, ladder, device, coeffs, is_home)) is not None]
    return options


def fitting_budget(df: Dataflow, call: Call, layout: Strategy, ladder: list[Option], device: Device,
                   coeffs: Coefficients, is_home: bool) -> Option | None:
    """The option of `layout` with the largest budget of whole rows whose priced peak fits
    the device's plan memory; None where the ladder has it or nothing fits. Memory grows
    with the budget: bisected between the ladder's largest fitting rung and the next
    (where 1F1B holds fewer micro-batches than stages, memory may dip as the budget grows:
    the result still fits)."""
    by_rows = {call.token_budget(o.strategy) // call.row_len: o for o in ladder}
    lo = max((k for k, o in by_rows.items() if o.cost.peak_bytes <= device.plan_memory), default=0)
    hi = min((k for k in by_rows if k > lo), default=call.replica_rows(layout.dp) + 1)
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        o = make_option(df, call, replace(layout, token_budget=mid * call.row_len), device, coeffs, is_home)
        if o.cost.peak_bytes <= device.plan_memory:
            lo, best = mid, o
        else:
            hi = mid
    return best


def mini_batch_rows(call: Call) -> int:
    """Data rows of one mini-batch of the call (a train call takes `mini_batches`
    optimizer steps over its rows; every other call one pass): what dp·n_mbs splits."""
    return call.rows // optimizer_steps(call)[0] if call.kind is CallKind.TRAIN else call.rows


def make_option(df: Dataflow, call: Call, s: Strategy, device: Device, coeffs: Coefficients, is_home: bool) -> Option:
    """Cost one strategy of one call."""
    cost = call_cost(call, df.model(call.model), s, df.cluster, device, coeffs, is_home)
    duration = to_units(cost.seconds, coeffs)
    devices = frozenset() if df.model(call.model).kind == ModelKind.RULE else frozenset(s.mesh.ranks(df.cluster.devices_per_node))
    return Option(call.name, s, duration, cost, devices)


def offloadable(df: Dataflow, model: Model) -> bool:
    """A frozen neural model with one call: its weights never change and nothing else
    reallocates from them, so they can wait in host memory between its calls."""
    return model.kind != ModelKind.RULE and not model.trainable and sum(c.model == model.name for c in df.calls) == 1


def offloaded_option(o: Option, device: Device, coeffs: Coefficients) -> Option:
    """`o` with its model's weights in host memory between iterations: nothing resident on
    the mesh, the weights transient during the call, and their reload over the host link
    (ReaL offloads frozen models the same way) before it."""
    reload = reload_seconds(o.cost.static_bytes, device)
    cost = CallCost(o.cost.seconds + reload, 0, o.cost.peak_bytes, o.cost.terms + (("reload", reload),))
    return replace(o, duration=to_units(cost.seconds, coeffs), cost=cost, offloaded=True)


def prune_dominated(options: list[Option], layout_matters: bool) -> list[Option]:
    """Drop options no faster and no smaller than another on the same mesh (and, when the
    call takes part in a reallocation, the same layout), keeping the first of equals."""
    kept: dict[object, list[Option]] = {}
    for o in sorted(options, key=lambda o: (o.duration, o.cost.static_bytes, o.cost.transient_bytes)):
        group = kept.setdefault(o.layout if layout_matters else o.strategy.mesh, [])
        if not any(
            k.duration <= o.duration and k.cost.static_bytes <= o.cost.static_bytes
            and k.cost.transient_bytes <= o.cost.transient_bytes
            for k in group
        ):
            group.append(o)
    return sorted((o for group in kept.values() for o in group), key=_option_order)


def _option_order(o: Option):
    s = o.strategy
    return (o.duration, s.mesh.first_node, s.mesh.n_nodes, s.mesh.first_device, s.mesh.n_devices, s.dp, s.tp, s.pp,
            -s.token_budget, o.offloaded)


def home_calls(df: Dataflow) -> dict[str, str]:
    """Model -> the call whose layout holds its parameters between uses."""
    neural = [c for c in df.calls if df.model(c.model).kind != ModelKind.RULE]
    homes = {c.model: c.name for c in reversed(neural)}  # first call of each model
    homes.update({c.model: c.name for c in neural if c.kind is CallKind.TRAIN})
    return homes


def build_problem(
    df: Dataflow, coeffs: Coefficients = DEFAULT_COEFFICIENTS, space: SearchSpace = SearchSpace(),
    deadline: float | None = None,
) -> Problem:
    """Enumerate, cost, memory-filter and prune every call's options; pins replace the
    enumeration of their call by the single pinned strategy. Past the `time.perf_counter()`
    `deadline` the pruning across layouts stops (the options it would drop stay: slower
    to solve, same optimum)."""
    df = with_train_steps(df)
    device = device_for(df.cluster)
    homes = home_calls(df)
    meshes = enumerate_meshes(df.cluster, space)
    pins = {p.call: p.strategy for p in df.pins}
    model_calls = {m.name: sum(c.model == m.name for c in df.calls) for m in df.models}
    per_call, dropped = [], []
    for call in df.calls:
        model = df.model(call.model)
        is_home = homes.get(call.model) == call.name
        if model.kind == ModelKind.RULE:  # runs in the driver: no devices, reported on the whole cluster
            whole = Mesh(0, df.cluster.nodes, 0, df.cluster.devices_per_node)
            strategies = [Strategy(whole, whole.size, 1, 1)]
        elif call.name in pins:
            strategies = [pins[call.name]]
        else:
            strategies = None
        options = (call_options(df, call, model, meshes, space, device, coeffs, is_home) if strategies is None
                   else [make_option(df, call, s, device, coeffs, is_home) for s in strategies])
        if space.offload and is_home and offloadable(df, model):
            options += [offloaded_option(o, device, coeffs) for o in options]
        fitting = [o for o in options if o.cost.peak_bytes <= device.plan_memory]
        dropped.append((call.name, len(options) - len(fitting)))
        layout_matters = model_calls[call.model] > 1
        per_call.append((call.name, tuple(prune_dominated(fitting, layout_matters))))
    calls = {c.name for c in df.calls}
    edges: dict[tuple[str, str], None] = {}
    moves: dict[tuple[str, str], float] = {}  # (src, dst) -> seconds of its keys' moves
    for e in df.edges:
        if e.next_iteration or e.src not in calls or e.dst not in calls:
            continue
        edges[e.src, e.dst] = None
        if e.kind is EdgeKind.DATA:
            seconds = transfer_seconds(df.call(e.dst), df.cluster, device, coeffs) + coeffs.move_latency
            moves[e.src, e.dst] = moves.get((e.src, e.dst), 0.0) + seconds
    fastest = {c: min((o.duration for o in opts), default=0) for c, opts in per_call}
    priced = tuple((a, b, u) for (a, b), t in moves.items()
                   if (u := to_units(t, coeffs)) > MOVE_RESOLUTION * fastest[b])
    problem = Problem(df, device, coeffs, tuple(per_call), tuple(sorted(homes.items())), tuple(edges),
                      device.plan_memory, tuple(dropped), space, priced)
    return prune_with_realloc(problem, deadline)


# A data edge's moves are priced only where they cost more than this share of the
# consumer's fastest option: below it (GPU clusters move a few MB in microseconds beside
# calls of seconds) no estimate changes by more than that share of its calls' durations,
# and the CP-SAT model keeps its layout terms off edges that cannot matter.
MOVE_RESOLUTION = 1e-3

TRAIN_STEP_KEYS = ("mini_batches", "ppo_epochs")


def with_train_steps(df: Dataflow) -> Dataflow:
    """Train calls carry the run block's `mini_batches` / `ppo_epochs` (unless their own
    options set them), so that the cost model prices the optimizer steps the run takes."""
    run = {k: df.run.param(k) for k in TRAIN_STEP_KEYS if df.run is not None and df.run.param(k) is not None}
    if not run:
        return df
    calls = tuple(
        replace(c, options=c.options + tuple((k, v) for k, v in run.items() if c.option(k) is None))
        if c.kind is CallKind.TRAIN else c for c in df.calls
    )
    return replace(df, calls=calls)


def _mem(o: Option) -> tuple[int, int]:
    return o.cost.static_bytes, o.cost.transient_bytes


def _no_worse_memory(a: Option, b: Option) -> bool:
    return a.cost.static_bytes <= b.cost.static_bytes and a.cost.transient_bytes <= b.cost.transient_bytes


def prune_with_realloc(problem: Problem, deadline: float | None = None) -> Problem:
    """Dominance across layouts once reallocation is known, on the same mesh:
    a receiving option B goes if some A has worst-case time (duration + largest realloc
    from any home) ≤ B's best case and no more memory; a home option B goes if some A is
    no slower, no larger, and no costlier to reallocate from for every receiving layout."""
    opts = dict(problem.options)
    receivers: dict[str, list[str]] = {}
    for call in problem.calls:
        home = problem.home_call(call)
        if home:
            receivers.setdefault(home, []).append(call)
    for home, calls in receivers.items():
        if not opts[home] or not all(opts[c] for c in calls):
            continue  # infeasible: left to the diagnostics
        if deadline is not None and time.perf_counter() > deadline:
            break
        homes = by_layout(opts[home])
        costs: dict[tuple, list[int]] = {hl: [] for hl in homes}  # home layout -> realloc per receiver layout
        for call in calls:
            dsts = by_layout(opts[call])
            r = problem.realloc_table(call, homes, dsts)
            span = {dl: (min(r[hl, dl] for hl in homes), max(r[hl, dl] for hl in homes)) for dl in dsts}
            kept: list[Option] = []
            same_mesh: dict[Mesh, list[Option]] = {}  # kept, by mesh (dominance is within a mesh)
            for o in sorted(opts[call], key=lambda o: (o.duration + span[o.layout][0], _mem(o), _option_order(o))):
                rivals = same_mesh.setdefault(o.strategy.mesh, [])
                if not any(_no_worse_memory(k, o) and k.duration + span[k.layout][1] <= o.duration + span[o.layout][0]
                           for k in rivals):
                    kept.append(o)
                    rivals.append(o)
            opts[call] = tuple(sorted(kept, key=_option_order))
            kept_layouts = sorted({o.layout for o in kept}, key=lambda dl: _option_order(dsts[dl]))
            for hl in homes:
                costs[hl] += [r[hl, dl] for dl in kept_layouts]
        kept, same_mesh = [], {}
        for h in sorted(opts[home], key=lambda h: (h.duration, _mem(h), sum(costs[h.layout]), _option_order(h))):
            rivals = same_mesh.setdefault(h.strategy.mesh, [])
            if not any(k.duration <= h.duration and _no_worse_memory(k, h)
                       and all(a <= b for a, b in zip(costs[k.layout], costs[h.layout])) for k in rivals):
                kept.append(h)
                rivals.append(h)
        opts[home] = tuple(sorted(kept, key=_option_order))
    return replace(problem, options=tuple((c, opts[c]) for c in problem.calls))


def by_layout(options) -> dict[tuple, Option]:
    """One representative option per layout (reallocation depends on the layout only)."""
    out: dict[tuple, Option] = {}
    for o in options:
        out.setdefault(o.layout, o)
    return out


def with_options(problem: Problem, choice: dict[str, Option]) -> Problem:
    """The problem with `choice`'s options added back where pruning dropped them, so
    that a baseline can seed the solver as a complete hint."""
    return replace(problem, options=tuple(
        (c, opts if choice[c] in opts else opts + (choice[c],)) for c, opts in problem.options
    ))
