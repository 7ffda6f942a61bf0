"""Presets of the 2026 families, read by the family reader from their public config.json
values, count exactly the parameters their published checkpoints hold (the totals in
the checkpoints' safetensors metadata)."""

import pytest

from rlhfc.frontend.presets import PRESETS
from rlhfc_runtime.contract.kinds import Head

PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_counts_the_published_parameters(name):
    assert PRESETS[name].param_count(Head.LM) == PUBLISHED[name]


def test_family_switches_come_from_the_family_reader():
    assert PRESETS["qwen3-32b"].head_dim == 128 != 5120 // 64 and PRESETS["qwen3-32b"].qk_norm == "head"
    assert PRESETS["qwen2.5-7b"].qkv_bias and not PRESETS["qwen2.5-7b"].o_bias
    gemma = PRESETS["gemma-3-27b"]
    assert gemma.norm == "sandwich" and gemma.tied_embeddings and gemma.activation == "gelu_tanh"
    assert gemma.windows.count(0) == 62 // 6 and set(gemma.windows) == {0, 1024}


def test_a_shape_alone_writes_a_config_json_that_reads_back_as_itself():
    """Presets and inline shapes run from `family.config_json`: the family reader must
    read it back to the same shape, for every family."""
    from family_cases import FAMILIES, hf_config
    from rlhfc_runtime.contract.family import config_json, shape_from_hf

    shapes = [*PRESETS.values(), *(shape_from_hf(hf_config(n).to_dict()) for n in FAMILIES)]
    assert {s.family for s in shapes} >= {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3",
                                          "olmo2", "smollm3"}
    for shape in shapes:
        assert shape_from_hf(config_json(shape)) == shape
