"""Hand-built PPO dataflows for the planner tests (no parser needed)."""

from __future__ import annotations

from rlhfc.ir import (
    Call, CallKind, Cluster, Dataflow, Dataset, Edge, EdgeKind, Head, Model, ModelShape, Optimizer,
    Pin, RunConfig, Span,
)

SPAN = Span("fixture.rlhf", 1, 1, 1, 1)
LLAMA_7B = ModelShape(32, 4096, 32, 32, 11008, 32000)
LLAMA_13B = ModelShape(40, 5120, 40, 40, 13824, 32000)
CODELLAMA_34B = ModelShape(48, 8192, 64, 8, 22016, 32000)
LLAMA_70B = ModelShape(80, 8192, 64, 8, 28672, 32000)
TINY = ModelShape(2, 64, 4, 2, 128, 64, max_positions=128)

# name, model, kind, inputs, outputs
PPO_CALLS = (
    ("gen", "actor", CallKind.GENERATE, ("prompts",), ("seq", "logp")),
    ("score", "reward", CallKind.INFERENCE, ("seq",), ("score",)),
    ("refl", "ref", CallKind.INFERENCE, ("seq",), ("ref_logp",)),
    ("vals", "critic", CallKind.INFERENCE, ("seq",), ("values",)),
    ("a_tr", "actor", CallKind.TRAIN, ("seq", "logp", "ref_logp", "score", "values"), ()),
    ("c_tr", "critic", CallKind.TRAIN, ("seq", "logp", "ref_logp", "score", "values"), ()),
)


def _model(name: str, shape: ModelShape | None, head: Head, trainable: bool, rule: str | None = None) -> Model:
    return Model(
        name, "rule" if rule else "llama", shape, head, trainable, None,
        Optimizer("adam", (("lr", 1e-6),)) if trainable else None, rule, SPAN,
    )


def dataflow_from(calls, models, cluster: Cluster, batch: int, prompt_len: int, gen_len: int, pins=()) -> Dataflow:
    """A dataflow with data edges from keys and parameter edges around each train call."""
    made = tuple(
        Call(n, m, k, i, o, "generate" if k is CallKind.GENERATE else "x", (), batch, prompt_len, gen_len, SPAN)
        for n, m, k, i, o in calls
    )
    producer = {key: c.name for c in made for key in c.outputs}
    edges = [
        Edge(producer[key], c.name, EdgeKind.DATA, key) for c in made for key in c.inputs if key in producer
    ]
    for tr in (c for c in made if c.kind is CallKind.TRAIN):
        for other in (c for c in made if c.model == tr.model and c is not tr):
            edges.append(Edge(other.name, tr.name, EdgeKind.PARAM, tr.model))
            edges.append(Edge(tr.name, other.name, EdgeKind.PARAM, tr.model, next_iteration=True))
    ds = Dataset("prompts", "jsonl", "p.jsonl", (("prompt", "prompt"),), prompt_len, SPAN)
    run = RunConfig("ppo", batch, 1, (("max_new_tokens", gen_len),), SPAN)
    return Dataflow("fixture.rlhf", tuple(models), (ds,), made, tuple(edges), cluster, run, tuple(pins))


def ppo_dataflow(
    shape: ModelShape, cluster: Cluster, batch: int = 512, prompt_len: int = 256, gen_len: int = 256,
    pins: tuple[Pin, ...] = (), rule_reward: bool = False, critic_shape: ModelShape | None = None,
) -> Dataflow:
    """ReaL's PPO: actor generates, reward/ref/critic score, actor and critic train."""
    critic_shape = critic_shape or shape
    models = (
        _model("actor", shape, Head.LM, True),
        _model("critic", critic_shape, Head.VALUE, True),
        _model("ref", shape, Head.LM, False),
        _model("reward", None, Head.VALUE, False, "pattern_reward") if rule_reward
        else _model("reward", critic_shape, Head.VALUE, False),
    )
    return dataflow_from(PPO_CALLS, models, cluster, batch, prompt_len, gen_len, pins)


def small_dataflow(shape: ModelShape, cluster: Cluster, batch: int = 64, prompt_len: int = 128, gen_len: int = 128,
                   pins: tuple[Pin, ...] = ()) -> Dataflow:
    """Four calls (generate, two inferences, train): small enough to brute-force."""
    calls = (PPO_CALLS[0], PPO_CALLS[2], PPO_CALLS[1], ("a_tr", "actor", CallKind.TRAIN, ("seq", "logp", "ref_logp", "score"), ()))
    models = (
        _model("actor", shape, Head.LM, True),
        _model("ref", shape, Head.LM, False),
        _model("reward", shape, Head.VALUE, False),
    )
    return dataflow_from(calls, models, cluster, batch, prompt_len, gen_len, pins)
