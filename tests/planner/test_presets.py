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
