"""Lowering: ops in a shared order that cannot deadlock, reallocation exactly where a
call runs away from its model's parameters, data moved only where needed."""

from __future__ import annotations

import itertools

from codegen_fixtures import dataflow, single_plan, split_plan, strategy, plan

from rlhfc.backend.lower import lower, participants
from rlhfc_runtime.contract.ops import Call, Drop, Load, Move, Realloc


def simulate(prog) -> list[tuple[int, object]]:
    """Run every rank's op list as a rendezvous: an op fires when all its participants
    have it at the head of their queue. Returns the firing order; raises on deadlock."""
    layouts = dict(prog.layouts)
    queues = {r: [op for op in prog.ops if r in participants(op, layouts)] for r in range(prog.world_size)}
    fired = []
    while any(queues.values()):
        for r, q in queues.items():
            if not q:
                continue
            op, members = q[0], participants(q[0], layouts)
            if all(queues[m] and queues[m][0] == op for m in members):
                for m in members:
                    queues[m].pop(0)
                fired.append((r, op))
                break
        else:
            heads = {r: q[0] for r, q in queues.items() if q}
            raise AssertionError(f"deadlock: heads {heads}")
    return fired


def test_split_plan_reallocates_actor_for_generation_only():
    prog = lower(df := dataflow(), split_plan(df))
    layouts = dict(prog.layouts)
    gen = next(op for op in prog.ops if isinstance(op, Call) and op.name == "gen")
    before = prog.ops[prog.ops.index(gen) - 1]
    assert before == Realloc("actor", src=dict(prog.homes)["actor"], dst=gen.layout)
    assert layouts[gen.layout].ranks == (1,)
    reallocs = [op for op in prog.ops if isinstance(op, Realloc)]
    # actor for gen; ref and critic are homed where they first run (ref on device 0),
    # and the critic's inference (device 0) runs away from its train home (both devices).
    assert {(r.model, layouts[r.dst].ranks) for r in reallocs} == {("actor", (1,)), ("critic", (0,))}
    drops = [op for op in prog.ops if isinstance(op, Drop)]
    assert {d.model for d in drops} == {"actor", "critic"}
    for d in drops:  # each non-home copy is freed after its call and before the train call
        i = prog.ops.index(d)
        train = next(op for op in prog.ops if isinstance(op, Call) and op.model == d.model and op.kind == "train")
        assert i < prog.ops.index(train)
    simulate(prog)


def test_moves_exactly_where_consumer_layout_differs():
    prog = lower(df := dataflow(), split_plan(df))
    moves = [op for op in prog.ops if isinstance(op, Move)]
    call_layout = {op.name: op.layout for op in prog.ops if isinstance(op, Call)}
    # seq is produced on device 1: refl/vals (device 0) and the train calls (both) need it
    assert {(m.key, m.dst) for m in moves} == {
        ("seq", call_layout["refl"]), ("seq", call_layout["a_tr"]),
        ("logp", call_layout["a_tr"]), ("score", call_layout["a_tr"]),
        ("ref_logp", call_layout["a_tr"]), ("values", call_layout["a_tr"]),
    }
    for m in moves:  # every move precedes the first consumer in the destination
        first = next(op for op in prog.ops if isinstance(op, Call) and op.layout == m.dst and m.key in op.inputs)
        assert prog.ops.index(m) < prog.ops.index(first)


def test_same_layout_everywhere_needs_no_realloc_or_move():
    prog = lower(df := dataflow(), single_plan(df))
    assert [type(op) for op in prog.ops] == [Load] + [Call] * 6
    assert prog.groups == ((0, 1),)


def test_every_rank_meets_collectives_in_the_same_order_for_all_small_plans():
    """Brute force over many 4-device placements: no lowering can deadlock."""
    df = dataflow(devices=4)
    meshes = [strategy(0, 4, 4), strategy(0, 2, 2), strategy(2, 2, 2), strategy(1, 1, 1), strategy(3, 1, 1)]
    for gen, inf, train in itertools.product(meshes, repeat=3):
        placements = {"gen": gen, "score": gen, "refl": inf, "vals": inf, "a_tr": train, "c_tr": train}
        prog = lower(df, plan(df, placements))
        fired = simulate(prog)
        assert len(fired) == len(prog.ops)
        for r in range(4):  # each rank's view is the global list filtered to its ops
            layouts = dict(prog.layouts)
            mine = [op for _, op in fired if r in participants(op, layouts)]
            assert mine == [op for op in prog.ops if r in participants(op, layouts)]


def test_groups_are_the_layouts_rank_sets_once_each():
    """Moves and reallocations are point-to-point over the world, so the only groups are
    the layouts' own (each once, in naming order)."""
    prog = lower(df := dataflow(), split_plan(df))
    assert any(isinstance(op, (Realloc, Move)) for op in prog.ops)
    sets = [tuple(sorted(lay.ranks)) for _, lay in prog.layouts]
    assert prog.groups == tuple(dict.fromkeys(sets))
    assert len(set(prog.groups)) == len(prog.groups)
