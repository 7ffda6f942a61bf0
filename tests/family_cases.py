"""Tiny random checkpoints of every supported family, written by `transformers` itself
(`save_pretrained`), each small but keeping its distinguishing feature active: RoPE
bands inside head_dim, windows shorter than the test sequences, head_dim != hidden /
heads, soft-capping that bends, q/k norms, fused tensors, layers without RoPE.

Weights are redrawn larger than transformers' init (and norms away from 1), so every
switch changes the logits visibly."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama3": ("llama", dict(head_dim=32, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama_dynamic": ("llama", dict(max_position_embeddings=8, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama_yarn": ("llama", dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(head_dim=16, sliding_window=5)),
    "gemma2": ("gemma2", dict(head_dim=24, sliding_window=4, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0, query_pre_attn_scalar=20)),
    "gemma3": ("gemma3_text", dict(head_dim=24, sliding_window=4, query_pre_attn_scalar=20,
                                   layer_types=["sliding_attention", "full_attention"] * 2,
                                   rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=100.0),
                                                    "full_attention": dict(rope_type="linear", rope_theta=10000.0,
                                                                           factor=4.0)})),
    "phi3": ("phi3", dict(sliding_window=5, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                  partial_rotary_factor=0.5))),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0, 1, 0])),
}


def hf_config(name: str, **overrides):
    from transformers import AutoConfig

    model_type, extra = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})


def has_value_class(name: str) -> bool:
    import transformers

    from rlhfc_runtime.contract.family import FAMILIES as SPECS

    return hasattr(transformers, SPECS[FAMILIES[name][0]].arch + "ForTokenClassification")


def write_family(name: str, path: Path, seed: int = 0, value: bool = False, **overrides) -> Path:
    """Save a random `name` checkpoint (a causal LM, or a one-label token classifier),
    its config's keys replaced by `overrides`."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    torch.manual_seed(seed)
    cfg = hf_config(name, **({"num_labels": 1} if value else {}), **overrides)
    cls = AutoModelForTokenClassification if value else AutoModelForCausalLM
    model = cls.from_config(cfg, torch_dtype=torch.float32)
    offset = name.startswith("gemma")  # Gemma norms scale by 1 + w
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_((0.0 if offset else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return Path(path)
