"""The one reader of a Hugging Face config.json: the checker sizes a checkpoint with it
(E017 when it refuses) and the runtime builds the model from it, so a config the
runtime cannot run is an error at check time, never at step one."""

from __future__ import annotations

from rlhfc_runtime.contract.shapes import ModelShape

# model_type -> HF class-name prefix (…ForCausalLM, …ForTokenClassification)
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2"}

# config.json key -> ModelShape field
CONFIG_KEYS: dict[str, str] = {
    "num_hidden_layers": "n_layers", "hidden_size": "hidden", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "intermediate_size": "intermediate",
    "vocab_size": "vocab", "max_position_embeddings": "max_positions",
}
REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


def unsupported(cfg: dict) -> str | None:
    """Why this runtime cannot run the model `cfg` describes exactly (None: it can)."""
    kind = cfg.get("model_type", "llama")
    if kind not in ARCHITECTURES:
        return f"model_type {kind!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
    if cfg.get("mlp_bias") or (kind == "llama" and cfg.get("attention_bias")):
        return "config.json sets mlp_bias/attention_bias: biased LLaMA variants are not supported"
    if cfg.get("use_sliding_window"):
        return "config.json sets use_sliding_window: sliding-window attention is not supported"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act {cfg['hidden_act']!r} is not supported (LLaMA uses 'silu')"
    rope = rope_parameters(cfg)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported, only the default RoPE"
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim")
    if head_dim and isinstance(hidden, int) and isinstance(heads, int) and heads and head_dim * heads != hidden:
        return f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}: only head_dim = hidden / heads is supported"
    return None


def rope_parameters(cfg: dict) -> dict:
    """The RoPE block of either transformers generation (`rope_parameters`, `rope_scaling`)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {"rope_type": repr(rope)}


def shape_from_hf(cfg: dict) -> ModelShape:
    """The shape a config.json describes. ValueError (with the reason) for a model this
    runtime does not implement or a config with missing or non-integer sizes."""
    if not isinstance(cfg, dict):
        raise ValueError("config.json is not a JSON object")
    why = unsupported(cfg)
    if why:
        raise ValueError(why)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    fields = {field: cfg[key] for key, field in CONFIG_KEYS.items() if cfg.get(key) is not None}
    fields.setdefault("n_kv_heads", cfg["num_attention_heads"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in fields.values()):
        raise ValueError("shape entries must be positive integers")
    return ModelShape(**fields, tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                      qkv_bias=cfg.get("model_type", "llama") == "qwen2")
