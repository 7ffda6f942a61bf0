"""Model families: how each Hugging Face `model_type` reads into a `ModelShape`.

A family is its config.json reader (which forward switches it turns on, and its defaults
where a config leaves them out), its HF class prefix, and how its checkpoint fuses
tensors (Phi-3's `qkv_proj` / `gate_up_proj` are concatenations of rows of the table's
q/k/v and gate/up). The parameter inventory itself is `shapes.TABLE`, shared by all, so a
new family is a reader here plus whatever its forward pass does differently
(`rlhfc_runtime.layers`). Pure Python, no torch: the checker refuses, with the feature
named, what the runtime would not run exactly (E017).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from rlhfc_runtime.contract.shapes import ModelShape

# config.json key -> ModelShape field
CONFIG_KEYS: dict[str, str] = {
    "num_hidden_layers": "n_layers", "hidden_size": "hidden", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "intermediate_size": "intermediate",
    "vocab_size": "vocab", "max_position_embeddings": "max_positions", "head_dim": "head_dim",
}
REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
ACTIVATIONS = {"swish": "silu", "silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # the last spelling of each is written


@dataclass(frozen=True)
class Fused:
    """A checkpoint tensor that is the concatenation along `dim` of table parameters."""

    name: str  # layer-relative, as the table's rows
    parts: tuple[str, ...]
    dim: int = 0


class Unsupported(ValueError):
    """A config.json this runtime cannot run exactly; the message names the feature."""


@dataclass(frozen=True)
class Family:
    """One model family: its HF class prefix, its switches as a function of config.json,
    whether its sliding windows follow a `use_sliding_window` flag, its tied-embedding
    default, and its fused checkpoint tensors."""

    model_type: str
    arch: str  # HF class prefix: {arch}ForCausalLM, {arch}ForTokenClassification
    switches: Callable[[dict], dict] = lambda cfg: {}
    default_layer_types: Callable[[dict, int], list[str]] | None = None
    window_flag: bool = False  # sliding windows only with use_sliding_window = true
    tied_default: bool = False
    fused: tuple[Fused, ...] = field(default=())
    value_head: bool = True  # transformers has {arch}ForTokenClassification


def _attention_bias(cfg: dict) -> dict:
    bias = bool(cfg.get("attention_bias", False))
    return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": bool(cfg.get("mlp_bias", False))}


def _gemma(qk_norm: str) -> Callable[[dict], dict]:
    def switches(cfg: dict) -> dict:
        return {
            **_attention_bias(cfg), "norm": "sandwich", "norm_offset": True, "embed_scale": True,
            "qk_norm": qk_norm, "attn_softcap": float(cfg.get("attn_logit_softcapping") or 0.0),
            "final_softcap": float(cfg.get("final_logit_softcapping") or 0.0),
            "query_scale": float(cfg.get("query_pre_attn_scalar") or 0.0),
        }
    return switches


def _every(pattern: int) -> Callable[[dict, int], list[str]]:
    """Gemma's default: every `pattern`-th layer global, the others local (sliding)."""
    def types(cfg: dict, n: int) -> list[str]:
        p = int(cfg.get("sliding_window_pattern", pattern))
        return ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    return types


def _from_layer(cfg: dict, n: int) -> list[str]:
    """Qwen2/3's default: sliding from layer `max_window_layers` on."""
    first = int(cfg.get("max_window_layers", n))
    return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]


_PHI3_FUSED = (Fused("self_attn.qkv_proj.weight", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                    "self_attn.v_proj.weight")),
               Fused("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", _attention_bias),
    Family("mistral", "Mistral", _attention_bias),
    Family("qwen2", "Qwen2", lambda cfg: {"qkv_bias": True}, _from_layer, window_flag=True),
    Family("qwen3", "Qwen3", lambda cfg: {**_attention_bias(cfg), "qk_norm": "head"}, _from_layer,
           window_flag=True),
    Family("gemma2", "Gemma2", _gemma(""), _every(2), tied_default=True),
    Family("gemma3_text", "Gemma3", _gemma("head"), _every(6), tied_default=True, value_head=False),
    Family("phi3", "Phi3", lambda cfg: {"fused_checkpoint": True}, fused=_PHI3_FUSED),
    Family("olmo2", "Olmo2", lambda cfg: {**_attention_bias(cfg), "norm": "post", "qk_norm": "full"},
           value_head=False),
    Family("smollm3", "SmolLM3", _attention_bias, window_flag=True),
)}
ARCHITECTURES = {t: f.arch for t, f in FAMILIES.items()}


def rope_parameters(cfg: dict) -> dict:
    """The RoPE block of either transformers generation (`rope_parameters`, `rope_scaling`)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rope if isinstance(rope, dict) else {"rope_type": repr(rope)}


def _rope_blocks(cfg: dict) -> list[dict]:
    """Each RoPE block a config uses (Gemma 3 has one per layer type)."""
    rope = rope_parameters(cfg)
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def _rope_problem(cfg: dict) -> str | None:
    for block in _rope_blocks(cfg):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ROPE_TYPES:
            return f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
    return None


def _windows(fam: Family, cfg: dict, n: int) -> tuple[int, ...]:
    window = cfg.get("sliding_window")
    if fam.window_flag and not cfg.get("use_sliding_window"):
        window = None
    if not window:
        return ()
    types = cfg.get("layer_types") or (fam.default_layer_types(cfg, n) if fam.default_layer_types
                                       else ["sliding_attention"] * n)
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _rotary_fraction(cfg: dict) -> float:
    fraction = cfg.get("partial_rotary_factor")
    for block in _rope_blocks(cfg):
        fraction = block.get("partial_rotary_factor", fraction)
    return float(fraction or 1.0)


def shape_from_hf(cfg: dict) -> ModelShape:
    """The shape a config.json describes. `Unsupported` (a ValueError naming the missing
    feature) for a model this runtime does not implement exactly, or a config with
    missing or non-integer sizes."""
    if not isinstance(cfg, dict):
        raise Unsupported("config.json is not a JSON object")
    kind = cfg.get("model_type", "llama")
    fam = FAMILIES.get(kind)
    if fam is None:
        raise Unsupported(f"model_type {kind!r} is not supported (supported: {', '.join(FAMILIES)})")
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise Unsupported(f"config.json lacks {', '.join(missing)}")
    sizes = {f: cfg[k] for k, f in CONFIG_KEYS.items() if cfg.get(k) is not None}
    sizes.setdefault("n_kv_heads", cfg["num_attention_heads"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes.values()):
        raise Unsupported("shape entries must be positive integers")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise Unsupported(f"activation {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    why = _rope_problem(cfg)
    if why:
        raise Unsupported(why)
    n = sizes["n_layers"]
    nope = cfg.get("no_rope_layers") or []
    if len(cfg.get("layer_types") or [None] * n) != n or (nope and len(nope) != n):
        raise Unsupported(f"layer_types / no_rope_layers must list all {n} layers")
    if sizes["n_heads"] % sizes["n_kv_heads"]:
        raise Unsupported(f"{sizes['n_kv_heads']} kv heads do not divide {sizes['n_heads']} attention heads")
    return ModelShape(
        **sizes, **fam.switches(cfg), family=kind,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", fam.tied_default)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), activation=ACTIVATIONS[act],
        windows=_windows(fam, cfg, n), nope_layers=tuple(i for i, use in enumerate(nope) if not use),
        rotary_fraction=_rotary_fraction(cfg),
        score_bias=bool(cfg.get("token_classification_bias", True)),
    )


def config_json(shape: ModelShape) -> dict:
    """The config.json of a model given by its shape alone (a preset or inline keys):
    what its export writes and what its RoPE tables read (the default RoPE, base 10000:
    a shape carries no RoPE scaling). `shape_from_hf` of it is `shape` again, for every
    family (the presets are held to that)."""
    n, windows = shape.n_layers, shape.windows
    cfg = {
        "model_type": shape.family, "architectures": [hf_class(shape, False)],
        **{key: getattr(shape, field) for key, field in CONFIG_KEYS.items()},
        "tie_word_embeddings": shape.tied_embeddings, "rms_norm_eps": shape.norm_eps,
        "hidden_act": {v: k for k, v in ACTIVATIONS.items()}[shape.activation], "rope_theta": 10000.0,
        "attention_bias": shape.o_bias, "mlp_bias": shape.mlp_bias, "initializer_range": 0.02,
        "token_classification_bias": shape.score_bias,
    }
    if shape.activation != "silu":
        cfg["hidden_activation"] = cfg["hidden_act"]
    for key, value in (("attn_logit_softcapping", shape.attn_softcap), ("final_logit_softcapping", shape.final_softcap),
                       ("query_pre_attn_scalar", shape.query_scale)):
        cfg[key] = value or None
    if windows:
        cfg.update(sliding_window=max(windows), use_sliding_window=True,
                   layer_types=["sliding_attention" if w else "full_attention" for w in windows])
    if shape.nope_layers:
        cfg["no_rope_layers"] = [int(i not in shape.nope_layers) for i in range(n)]
    if shape.rotary_fraction != 1.0:
        cfg["partial_rotary_factor"] = shape.rotary_fraction
    return cfg


def fused(shape: ModelShape) -> tuple[Fused, ...]:
    """The fused checkpoint tensors of `shape`'s family (empty for most)."""
    return FAMILIES[shape.family].fused if shape.fused_checkpoint else ()


def hf_class(shape: ModelShape, value_head: bool) -> str:
    """The transformers class a checkpoint of `shape` is saved as."""
    return FAMILIES[shape.family].arch + ("ForTokenClassification" if value_head else "ForCausalLM")
