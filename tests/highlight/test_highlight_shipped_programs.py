"""The shipped library and example programs: each passes the checker, each stdlib
dataflow is its algorithm's call graph (the interfaces ReaL, OpenRLHF and verl run),
and the examples are at the scale the README promises (tiny CPU jobs, 7B and 70B plans)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfc import ir
from rlhfc.frontend.check import load_program
from rlhfc.frontend.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]

# Program -> {call: (model, interface)}: the algorithm's dataflow as the libraries run it.
ALGORITHMS = {
    "ppo": {"gen": ("actor", "generate"), "score": ("reward", "rule"), "refl": ("ref", "logprobs"),
            "vals": ("critic", "values"), "a_tr": ("actor", "ppo_actor"), "c_tr": ("critic", "ppo_critic")},
    "grpo": {"gen": ("actor", "generate"), "score": ("reward", "rule"), "refl": ("ref", "logprobs"),
             "a_tr": ("actor", "grpo_actor")},
    "rloo": {"gen": ("actor", "generate"), "score": ("reward", "rule"), "refl": ("ref", "logprobs"),
             "a_tr": ("actor", "rloo_actor")},
    "remax": {"gen": ("actor", "generate"), "greedy": ("actor", "generate_greedy"),
              "score": ("reward", "rule"), "base": ("reward", "rule"), "refl": ("ref", "logprobs"),
              "a_tr": ("actor", "remax_actor")},
    "dpo": {"refl": ("ref", "pair_logprobs"), "a_tr": ("actor", "dpo")},
    "sft": {"a_tr": ("actor", "sft")},
    "reward_model": {"rm_tr": ("rm", "pairwise_reward")},
}


@pytest.mark.parametrize("path", sorted(ROOT.glob("stdlib/*.rlhf")), ids=lambda p: p.name)
def test_stdlib_file_is_a_library_that_checks(path: Path):
    flow = load_program(path)
    assert flow.run is None and flow.calls == ()
    assert path.read_text().startswith("// "), "each library file opens with what it is"


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_example_runs_its_algorithm_on_two_cpu_devices(name: str):
    flow = load_program(ROOT / "programs" / f"{name}.rlhf")
    assert flow.run.dataflow == name
    assert {c.name: (c.model, c.interface) for c in flow.calls} == ALGORITHMS[name]
    assert (flow.cluster.nodes, flow.cluster.devices_per_node, flow.cluster.device) == (1, 2, "cpu")
    for model in flow.models:
        assert model.kind == "rule" or model.shape.hidden <= 64 and model.shape.n_layers <= 2
    trained = {c.model for c in flow.calls if c.kind is ir.CallKind.TRAIN}
    assert trained == {m.name for m in flow.models if m.trainable}
    for dataset in flow.datasets:
        assert dataset.path.endswith(".jsonl") and "/data/tiny/" in dataset.path


def test_group_sampling_multiplies_the_batch():
    for name in ("grpo", "rloo"):
        flow = load_program(ROOT / "programs" / f"{name}.rlhf")
        assert {c.batch for c in flow.calls} == {flow.run.batch * flow.run.param("group_size")}
        assert flow.run.param("group_size") > 1


def test_data_edges_of_ppo():
    flow = load_program(ROOT / "programs" / "ppo.rlhf")
    data = {(e.src, e.dst) for e in flow.edges if e.kind is ir.EdgeKind.DATA}
    for consumer in ("score", "refl", "vals", "a_tr", "c_tr"):
        assert ("gen", consumer) in data
    for producer in ("score", "refl", "vals"):
        assert {(producer, "a_tr"), (producer, "c_tr")} <= data


@pytest.mark.parametrize("name, preset, nodes", [("ppo_7b", "llama-2-7b", 1), ("ppo_70b", "llama-2-70b", 16)])
def test_planning_examples_use_paper_scale_models(name: str, preset: str, nodes: int):
    flow = load_program(ROOT / "programs" / f"{name}.rlhf")
    assert (flow.cluster.nodes, flow.cluster.devices_per_node, flow.cluster.device) == (nodes, 8, "H100-80GB")
    assert len(flow.models) == 4 and all(m.shape == PRESETS[preset] for m in flow.models)
    gen = flow.call("gen")
    assert (gen.batch, gen.prompt_len, gen.gen_len) == (512, 256, 256)


def test_pinned_example_pins_within_its_cluster():
    flow = load_program(ROOT / "programs" / "ppo_pinned.rlhf")
    assert {p.call for p in flow.pins} == {"gen", "refl", "a_tr", "c_tr"}
    for pin in flow.pins:
        s = pin.strategy
        assert s.dp * s.tp * s.pp == s.mesh.size
        assert max(s.mesh.ranks(flow.cluster.devices_per_node)) < flow.cluster.n_devices
