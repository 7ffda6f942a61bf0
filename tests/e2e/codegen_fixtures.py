"""Hand-built dataflows and plans for the lowering and codegen tests: they pin down
layouts exactly (no solver involved), so a test can say where reallocation must go."""

from __future__ import annotations

from dataclasses import replace

from rlhfc import ir
from rlhfc.frontend.check.settings import resolve
from rlhfc.hardware import device_for
from rlhfc.plan import CallPlacement, Plan
from rlhfc.planner.cost.engine import engine_decisions

SPAN = ir.Span("t.rlhf", 1, 1, 1, 1)
TINY = ir.ModelShape(n_layers=2, hidden=32, n_heads=4, n_kv_heads=2, intermediate=64, vocab=64, max_positions=64)
ADAM = ir.Optimizer("adam", (("lr", 5e-4),))

PPO_CALLS = (  # name, model, kind, inputs, outputs, interface
    ("gen", "actor", "generate", ("prompts",), ("seq", "logp"), "generate"),
    ("score", "reward", "inference", ("seq",), ("score",), "rule"),
    ("refl", "ref", "inference", ("seq",), ("ref_logp",), "logprobs"),
    ("vals", "critic", "inference", ("seq",), ("values",), "values"),
    ("a_tr", "actor", "train", ("seq", "logp", "ref_logp", "score", "values"), (), "ppo_actor"),
    ("c_tr", "critic", "train", ("seq", "logp", "ref_logp", "score", "values"), (), "ppo_critic"),
)


def model(name, trainable=False, head=ir.Head.LM, rule=None):
    return ir.Model(name, "rule" if rule else "llama", None if rule else TINY, head, trainable,
                    None, ADAM if trainable else None, rule, SPAN)


def dataflow(calls=PPO_CALLS, devices=2, dataset_path="../data/tiny/prompts.jsonl", batch=8, steps=3, **params):
    """A PPO-shaped dataflow with its data and parameter edges, as the checker builds it."""
    run = ir.RunConfig("ppo", batch, steps, tuple(sorted({"max_new_tokens": 12, "seed": 1, **params}.items())))
    ir_calls = tuple(
        ir.Call(n, m, ir.CallKind(k), i, o, f, (), batch, 16, 12, SPAN) for n, m, k, i, o, f in calls
    )
    ir_calls = tuple(replace(c, settings=resolve(c, run, 1)) for c in ir_calls)
    producers = {key: c.name for c in ir_calls for key in c.outputs}
    edges = [ir.Edge(producers[k], c.name, ir.EdgeKind.DATA, k) for c in ir_calls for k in c.inputs if k in producers]
    for t in (c for c in ir_calls if c.kind is ir.CallKind.TRAIN):
        for other in (c for c in ir_calls if c.model == t.model and c is not t):
            edges.append(ir.Edge(other.name, t.name, ir.EdgeKind.PARAM, t.model))
            edges.append(ir.Edge(t.name, other.name, ir.EdgeKind.PARAM, t.model, next_iteration=True))
    names = {c.model for c in ir_calls}
    models = tuple(
        model(n, trainable=any(c.model == n and c.kind is ir.CallKind.TRAIN for c in ir_calls),
              head=ir.Head.VALUE if n == "critic" else ir.Head.LM,
              rule="pattern_reward" if n == "reward" else None)
        for n in sorted(names)
    )
    ds = ir.Dataset("prompts", "jsonl", dataset_path,
                    (("field", "prompt"), ("tokenizer", "../data/tiny/tokenizer.json")), 16, SPAN)
    return ir.Dataflow("programs/t.rlhf", models, (ds,), ir_calls, tuple(edges),
                       ir.Cluster(1, devices, "cpu"), run)


def strategy(first, n, dp, tp=1, pp=1):
    return ir.Strategy(ir.Mesh(0, 1, first, n), dp, tp, pp)


def plan(df: ir.Dataflow, placements: dict[str, ir.Strategy]) -> Plan:
    """A plan with the given strategies, calls one time unit apart in dataflow order,
    and homes at each trainable model's train call (else its first call)."""
    device = device_for(df.cluster)
    calls = tuple(CallPlacement(c.name, c.model, placements[c.name], float(i), float(i + 1), 2**20, 2**20,
                                engine=engine_decisions(df, c.name, placements[c.name], 2**20, device))
                  for i, c in enumerate(df.calls))
    homes = {}
    for c in df.calls:
        if df.model(c.model).kind == "rule":
            continue
        if c.kind is ir.CallKind.TRAIN or c.model not in homes:
            homes[c.model] = placements[c.name]
    return Plan(df.source, df.cluster, calls, tuple(sorted(homes.items())), (), float(len(calls)),
                float(len(calls)), "FIXED", 0.0)


def split_plan(df: ir.Dataflow) -> Plan:
    """Actor trains on both devices (dp=2) but generates on device 1 only, so it is
    reallocated every iteration; ref and critic inference sit on device 0."""
    both = strategy(0, 2, dp=2)
    placements = {"gen": strategy(1, 1, 1), "score": strategy(1, 1, 1), "refl": strategy(0, 1, 1),
                  "vals": strategy(0, 1, 1), "a_tr": both, "c_tr": both}
    return plan(df, {c.name: placements.get(c.name, both) for c in df.calls})


def single_plan(df: ir.Dataflow) -> Plan:
    """Everything on every device with the same layout: no realloc, no move."""
    s = strategy(0, df.cluster.n_devices, dp=df.cluster.n_devices)
    return plan(df, {c.name: s for c in df.calls})
