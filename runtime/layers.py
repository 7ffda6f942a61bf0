"""The layers of a tensor-parallel LLaMA decoder: Megatron-style tp regions, RMSNorm,
RoPE, GQA attention (SDPA on the KV-cache view, flash-attn varlen on CUDA when
installed), SwiGLU MLP, and the KV cache of incremental decoding.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rlhfc_runtime.dist import RankGroups

if TYPE_CHECKING:
    from rlhfc_runtime.model import ModelConfig

# ---------------------------------------------------------------- tensor-parallel ops


def _active(group_ranks: tuple[int, ...]) -> bool:
    return len(group_ranks) > 1


class _CopyToTP(torch.autograd.Function):
    """Identity forward; sums the gradient over the tp group (input of a column-parallel
    layer: every tp rank's partial output depends on the same replicated input)."""

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.groups.tp)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sums partial results over the tp group; the gradient passes unchanged (output of
    a row-parallel layer, whose consumers are replicated)."""

    @staticmethod
    def forward(ctx, x, groups):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=groups.tp)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Concatenates the tp ranks' slices of the last dimension; the gradient keeps this
    rank's slice."""

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups, ctx.width = groups, x.shape[-1]
        parts = [torch.empty_like(x) for _ in groups.tp_ranks]
        dist.all_gather(parts, x.contiguous(), group=groups.tp)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.groups.tp_rank * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


def copy_to_tp(x, groups: RankGroups):
    """Enter a column-parallel region (identity; gradient summed over tp)."""
    return _CopyToTP.apply(x, groups) if _active(groups.tp_ranks) else x


def reduce_from_tp(x, groups: RankGroups):
    """Leave a row-parallel region: sum the tp ranks' partial results."""
    return _ReduceFromTP.apply(x, groups) if _active(groups.tp_ranks) else x


def gather_from_tp(x, groups: RankGroups):
    """Concatenate the tp ranks' slices of the last dimension (vocab-parallel logits)."""
    return _GatherLastDim.apply(x, groups) if _active(groups.tp_ranks) else x


# ---------------------------------------------------------------- layers


def _param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in fp32, scale in the input dtype."""

    def __init__(self, size, eps, device, dtype):
        super().__init__()
        self.weight = _param((size,), device, dtype)
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _Weight(nn.Module):
    """A bare weight (and optional bias) holder, so parameter names match HF
    (`…q_proj.weight`, `…q_proj.bias`)."""

    def __init__(self, shape, device, dtype, bias: bool = False):
        super().__init__()
        self.weight = _param(shape, device, dtype)
        self.bias = _param(shape[:1], device, dtype) if bias else None


def rope_cos_sin(position_ids, head_dim, theta, dtype):
    """HF default RoPE tables for `position_ids` [B, T] -> cos, sin [B, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x, cos, sin):
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def attention_mask_4d(key_valid, q_start: int, q_len: int):
    """Boolean [B, 1, q_len, K] mask: query i (absolute position q_start+i in the
    cache) sees valid keys at or before it. A query always sees itself, so padded
    rows never become all-masked (their outputs are ignored)."""
    k_len = key_valid.shape[1]
    q_abs = torch.arange(q_start, q_start + q_len, device=key_valid.device)[:, None]
    k_idx = torch.arange(k_len, device=key_valid.device)[None, :]
    causal = k_idx <= q_abs
    mask = causal[None] & key_valid[:, None, :].bool()
    mask = mask | (k_idx == q_abs)[None]
    return mask[:, None]


class KVCache:
    """Preallocated keys and values of one stage's layers, for incremental decoding."""

    def __init__(self, layers, batch, max_len, kv_heads, head_dim, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layers}
        self.v = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layers}


FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def attention(q, k, v, mask):
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, K, D] (Hkv divides H:
    grouped-query heads are shared, never copied). mask: None (causal, no padding) or
    a boolean [B, 1, T, K]. On CUDA with flash-attn installed, unpadded fp16/bf16
    prefill runs its kernel; everything else runs torch's SDPA."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None and q.is_cuda and FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v)
    if mask is None:  # no padding, no cache: let SDPA pick its fused causal kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _flash(q, k, v):  # pragma: no cover - needs CUDA and flash-attn
    from flash_attn import flash_attn_varlen_func

    b, h, t, d = q.shape
    lens = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # noqa: E731
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), lens, lens, t, t, causal=True)
    return out.view(b, t, h, d).transpose(1, 2)


class DecoderLayer(nn.Module):
    """One LLaMA block; attention heads and MLP columns split over the tp group."""

    def __init__(self, cfg: ModelConfig, groups: RankGroups, index: int, device, dtype):
        super().__init__()
        tp = groups.layout.tp
        if cfg.num_kv_heads % tp or cfg.num_heads % tp:
            raise ValueError(f"tp={tp} must divide heads={cfg.num_heads} and kv heads={cfg.num_kv_heads}")
        self.cfg, self.groups, self.index = cfg, groups, index
        self.heads, self.kv_heads = cfg.num_heads // tp, cfg.num_kv_heads // tp
        h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size // tp
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, device, dtype)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = _Weight((self.heads * hd, h), device, dtype, cfg.qkv_bias)
        self.self_attn.k_proj = _Weight((self.kv_heads * hd, h), device, dtype, cfg.qkv_bias)
        self.self_attn.v_proj = _Weight((self.kv_heads * hd, h), device, dtype, cfg.qkv_bias)
        self.self_attn.o_proj = _Weight((h, self.heads * hd), device, dtype)
        self.mlp = nn.Module()
        self.mlp.gate_proj = _Weight((inter, h), device, dtype)
        self.mlp.up_proj = _Weight((inter, h), device, dtype)
        self.mlp.down_proj = _Weight((h, inter), device, dtype)

    def _attention(self, x, cos, sin, mask, cache: KVCache | None, start: int):
        b, t, _ = x.shape
        hd, a = self.cfg.head_dim, self.self_attn
        x = copy_to_tp(x, self.groups)
        q = F.linear(x, a.q_proj.weight, a.q_proj.bias).view(b, t, self.heads, hd).transpose(1, 2)
        k = F.linear(x, a.k_proj.weight, a.k_proj.bias).view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = F.linear(x, a.v_proj.weight, a.v_proj.bias).view(b, t, self.kv_heads, hd).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin).to(v.dtype), _apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            cache.k[self.index][:, :, start:start + t] = k
            cache.v[self.index][:, :, start:start + t] = v
            # a view of the cache: no copy, and no repeat of the kv heads (SDPA's GQA)
            k, v = cache.k[self.index][:, :, :start + t], cache.v[self.index][:, :, :start + t]
            q = q.to(k.dtype)
        out = attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(b, t, self.heads * hd)
        return reduce_from_tp(F.linear(out, a.o_proj.weight), self.groups)

    def _mlp(self, x):
        m = self.mlp
        x = copy_to_tp(x, self.groups)
        y = F.silu(F.linear(x, m.gate_proj.weight)) * F.linear(x, m.up_proj.weight)
        return reduce_from_tp(F.linear(y, m.down_proj.weight), self.groups)

    def forward(self, x, cos, sin, mask, cache=None, start=0):
        x = x + self._attention(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self._mlp(self.post_attention_layernorm(x))
