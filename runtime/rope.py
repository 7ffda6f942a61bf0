"""Rotary position tables for every RoPE variant a family uses.

The inverse frequencies come from transformers' own initialisers (`ROPE_INIT_FUNCTIONS`:
linear, dynamic, llama3, yarn, longrope) applied to the checkpoint's config, so scaled
RoPE matches the reference by construction; the default variant is the plain formula.
Gemma 3 has one RoPE block per layer type (local layers keep a short base), so tables
are kept per layer type. Partial rotary (Phi-4-mini) rotates the first
`rotary_fraction * head_dim` channels only: the tables are that wide.

The length-dependent variants (dynamic, longrope) are recomputed for the longest
position of each forward pass, without transformers' cache of the largest length
seen: the same positions always get the same rotation, whatever ran before.
"""

from __future__ import annotations

import torch

from rlhfc_runtime.contract.family import rope_parameters
from rlhfc_runtime.contract.shapes import ModelShape

FULL, SLIDING = "full_attention", "sliding_attention"


def layer_type(shape: ModelShape, layer: int) -> str:
    return SLIDING if shape.windows and shape.windows[layer] else FULL


class RopeTables:
    """cos / sin tables of one model for given positions, per layer type."""

    def __init__(self, shape: ModelShape, hf: dict):
        self.shape, self.hf = shape, hf
        self.dim = int(shape.head_dim * shape.rotary_fraction)
        rope = rope_parameters(hf)
        self.nested = any(isinstance(v, dict) for v in rope.values())
        self.blocks = {t: (rope.get(t) or {}) if self.nested else rope for t in (FULL, SLIDING)}
        self._config = None
        self._fixed: dict[str, tuple[torch.Tensor, float]] = {}

    def _kind(self, block: dict) -> str:
        return block.get("rope_type", block.get("type", "default"))

    def _hf_config(self):
        if self._config is None:
            from transformers import AutoConfig

            cfg = {k: v for k, v in self.hf.items() if k != "model_type"}
            self._config = AutoConfig.for_model(self.hf.get("model_type", "llama"), **cfg)
        return self._config

    def _inv_freq(self, kind: str, seq_len: int) -> tuple[torch.Tensor, float]:
        block = self.blocks[kind]
        rope_type = self._kind(block)
        if rope_type == "default":
            theta = float(block.get("rope_theta", self.hf.get("rope_theta", 10000.0)))
            exps = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
            return 1.0 / (theta ** exps), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        fn = ROPE_INIT_FUNCTIONS[rope_type]
        config = self._hf_config()
        original = int(block.get("original_max_position_embeddings") or self.shape.max_positions)
        layer = kind if self.nested else None
        if rope_type == "dynamic":
            return fn(config, None, seq_len=max(seq_len, original), layer_type=layer)
        if rope_type == "longrope":  # long factors only beyond the original context
            return fn(config, None, seq_len=seq_len if seq_len > original else None, layer_type=layer)
        return fn(config, None, layer_type=layer)

    def tables(self, position_ids, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer type -> (cos, sin) [B, T, rotary dim] in `dtype` for `position_ids` [B, T]."""
        seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 1
        out = {}
        for kind in ({layer_type(self.shape, i) for i in range(self.shape.n_layers)} or {FULL}):
            rope_type = self._kind(self.blocks[kind])
            if rope_type in ("dynamic", "longrope"):
                inv, scale = self._inv_freq(kind, seq_len)
            else:
                if kind not in self._fixed:
                    self._fixed[kind] = self._inv_freq(kind, seq_len)
                inv, scale = self._fixed[kind]
            freqs = position_ids[..., None].float() * inv.to(position_ids.device, torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            out[kind] = ((emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype))
        return out


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the first cos.shape[-1] channels of x [B, H, T, D] (all of them but for
    partial rotary), as transformers' apply_rotary_pos_emb."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos[:, None] + _rotate_half(x) * sin[:, None]
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos[:, None] + _rotate_half(rot) * sin[:, None], rest), dim=-1)
