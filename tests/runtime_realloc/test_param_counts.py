"""Parameter counts are one fact: the contract's `ModelShape.param_count`, the cost
model's per-stage counts and the runtime's shards (`param_shapes` + `shard_slices`) agree
for every layout, head and model family (biases, q/k norms, sandwich and post norms,
head_dim != hidden / heads, tied embeddings); and the checker's config reader is the
runtime's, so what the runtime refuses is E017 at check time, naming the feature."""

from __future__ import annotations

import math

import pytest

from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.family import shape_from_hf
from rlhfc_runtime.contract.kinds import Head
from rlhfc_runtime.contract.layout import Layout, shard_slices
from rlhfc_runtime.contract.shapes import param_table
from rlhfc_runtime.model import ModelConfig, param_shapes

from rlhfc.planner.cost.model import stage_params
from family_cases import FAMILIES, hf_config

CONFIGS = {
    "tied": ck.tiny_config(num_hidden_layers=3, tie_word_embeddings=True),
    **{name: hf_config(name).to_dict() for name in FAMILIES},
}
LAYOUTS = [(tp, pp) for tp in (1, 2) for pp in (1, 2, 3)]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("head", [Head.LM, Head.VALUE])
def test_cost_model_counts_the_runtimes_shards(name, head):
    cfg = CONFIGS[name]
    shape = shape_from_hf(cfg)
    full = param_shapes(ModelConfig.from_hf(cfg), head.value)
    tied_copy = math.prod(full["lm_head.weight"]) if shape.tied_embeddings and head is Head.LM else 0
    assert shape.param_count(head) == sum(math.prod(s) for s in full.values()) - tied_copy  # distinct parameters
    for tp, pp in LAYOUTS:
        layout = Layout(tuple(range(tp * pp)), 1, tp, pp)
        for rank in layout.ranks:
            held = sum(math.prod(sl.stop - sl.start for sl in slices) for n, s in full.items()
                       if (slices := model_slices(n, s, shape, head, layout, rank)) is not None)
            assert held == stage_params(shape, head, tp, pp, layout.coord(rank)[0]), (name, head, tp, pp, rank)


def model_slices(name, full, shape, head, layout, rank):
    return shard_slices(name, full, shape.n_layers, layout, rank, param_table(shape, head)[name].split)


@pytest.mark.parametrize("change, reason", [
    ({"rope_scaling": {"rope_type": "su", "factor": 4.0}}, "rope type 'su'"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"model_type": "mixtral"}, "model_type 'mixtral'"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"num_hidden_layers": "4"}, "positive integers"),
])
def test_checker_refuses_what_the_runtime_refuses(tmp_path, change, reason):
    from rlhfc.frontend.check import check_program

    cfg = dict(ck.tiny_config(), **change)
    with pytest.raises(ValueError, match=reason.split("'")[0]):
        ModelConfig.from_hf(cfg)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(__import__("json").dumps(cfg))
    program = tmp_path / "p.rlhf"
    program.write_text('import sft from "stdlib/sft.rlhf"\ncluster { nodes = 1  devices_per_node = 1  device = "cpu" }\n'
                       'model actor = llama("ckpt") { trainable  optimizer = adam(lr = 1e-3) }\n'
                       'dataset d = jsonl("d.jsonl", prompt = "p", response = "r", max_len = 8)\n'
                       'run sft(actor, d) { batch = 2 }\n')
    _, diagnostics = check_program(program)
    errors = [d for d in diagnostics if d.code == "E017"]
    assert errors and reason.split("'")[0] in errors[0].message, [d.message for d in diagnostics]


def test_a_value_head_on_a_family_without_one_is_refused_at_its_head(tmp_path):
    from family_cases import write_family

    from rlhfc.frontend.check import check_program

    write_family("olmo2", tmp_path / "ckpt")
    program = tmp_path / "p.rlhf"
    program.write_text('import sft from "stdlib/sft.rlhf"\ncluster { nodes = 1  devices_per_node = 1  device = "cpu" }\n'
                       'model actor = hf("ckpt", head = value) { trainable }\n'
                       'dataset d = jsonl("d.jsonl", prompt = "p", response = "r", max_len = 8)\n'
                       'run sft(actor, d) { batch = 2 }\n')
    _, diagnostics = check_program(program)
    [error] = [d for d in diagnostics if d.code == "E017"]
    assert "Olmo2ForTokenClassification" in error.message and error.span.line == 3
