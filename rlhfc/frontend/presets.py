"""Named model shapes for `hf(preset = "…")` (or `llama(…)`): public LLaMA configs and tiny test models.

The big shapes are the Hugging Face config.json values (docs: /work/shared/REFERENCE.md),
so plans for 7B–70B models can be made without downloading any weights.
"""

from __future__ import annotations

from rlhfc.ir import ModelShape

PRESETS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama-2-13b": ModelShape(40, 5120, 40, 40, 13824, 32000, 4096),
    "codellama-34b": ModelShape(48, 8192, 64, 8, 22016, 32000, 16384),
    "llama-2-70b": ModelShape(80, 8192, 64, 8, 28672, 32000, 4096),
    # Tiny shapes that train in seconds on a CPU (tests, examples, the bundled task).
    "tiny": ModelShape(2, 64, 4, 2, 128, 64, 128),
    "tiny-32": ModelShape(2, 32, 4, 4, 64, 64, 128),
}

# `hf(...)` inline keys → ModelShape fields (config.json's: `rlhfc_runtime.contract.hf.CONFIG_KEYS`).
SHAPE_KEYS: dict[str, str] = {
    "layers": "n_layers", "hidden": "hidden", "heads": "n_heads", "kv_heads": "n_kv_heads",
    "intermediate": "intermediate", "vocab": "vocab", "max_positions": "max_positions",
}
