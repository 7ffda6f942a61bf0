"""Named model shapes for `hf(preset = "…")` (or `llama(…)`): public configs of the families people train, and
tiny test models.

The big shapes are the Hugging Face config.json values (docs: /work/shared/REFERENCE.md),
read by the same family reader as a checkpoint's (`contract.family.shape_from_hf`), so
plans for 7B–70B models can be made without downloading any weights.
"""

from __future__ import annotations

from rlhfc.ir import ModelShape
from rlhfc_runtime.contract.family import shape_from_hf


def _hf(model_type: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, **extra) -> ModelShape:
    return shape_from_hf(dict(model_type=model_type, num_hidden_layers=layers, hidden_size=hidden,
                              num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                              vocab_size=vocab, **extra))


_LLAMA3 = dict(head_dim=128, max_position_embeddings=131072, rope_parameters=dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192))
_QWEN = dict(max_position_embeddings=32768, rope_theta=1000000.0)

PRESETS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama-2-13b": ModelShape(40, 5120, 40, 40, 13824, 32000, 4096),
    "codellama-34b": ModelShape(48, 8192, 64, 8, 22016, 32000, 16384),
    "llama-2-70b": ModelShape(80, 8192, 64, 8, 28672, 32000, 4096),
    "llama-3.1-8b": _hf("llama", 32, 4096, 32, 8, 14336, 128256, **_LLAMA3),
    "llama-3.1-70b": _hf("llama", 80, 8192, 64, 8, 28672, 128256, **_LLAMA3),
    "qwen2.5-7b": _hf("qwen2", 28, 3584, 28, 4, 18944, 152064, **_QWEN),
    "qwen2.5-32b": _hf("qwen2", 64, 5120, 40, 8, 27648, 152064, **_QWEN),
    "qwen3-8b": _hf("qwen3", 36, 4096, 32, 8, 12288, 151936, head_dim=128, **_QWEN),
    "qwen3-32b": _hf("qwen3", 64, 5120, 64, 8, 25600, 151936, head_dim=128, **_QWEN),
    "gemma-3-27b": _hf("gemma3_text", 62, 5376, 32, 16, 21504, 262208, head_dim=128, sliding_window=1024,
                       sliding_window_pattern=6, query_pre_attn_scalar=168, max_position_embeddings=131072,
                       hidden_activation="gelu_pytorch_tanh"),
    "mistral-7b": _hf("mistral", 32, 4096, 32, 8, 14336, 32768, head_dim=128, max_position_embeddings=32768),
    # Tiny shapes that train in seconds on a CPU (tests, examples, the bundled task).
    "tiny": ModelShape(2, 64, 4, 2, 128, 64, 128),
    "tiny-32": ModelShape(2, 32, 4, 4, 64, 64, 128),
}

# `hf(...)` inline keys → ModelShape fields (config.json's: `rlhfc_runtime.contract.family.CONFIG_KEYS`).
SHAPE_KEYS: dict[str, str] = {
    "layers": "n_layers", "hidden": "hidden", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "intermediate": "intermediate", "vocab": "vocab", "max_positions": "max_positions",
}
