"""The layers of a tensor-parallel decoder, for every family of `contract.family`:
Megatron-style tp regions, RMSNorm (LLaMA's, Gemma's `1 + w`, OLMo 2's over all heads),
GQA attention (q/k norms, RoPE variants, sliding windows, soft-capping; SDPA on the
KV-cache view, flash-attn varlen on CUDA when installed), the gated MLP (SwiGLU,
GeGLU), and the KV cache of incremental decoding. Which of these a layer runs is read
from the model's `ModelShape` switches.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rlhfc_runtime.dist import RankGroups
from rlhfc_runtime.packing import PackedAttention
from rlhfc_runtime.rope import apply_rope

if TYPE_CHECKING:
    from rlhfc_runtime.contract.shapes import ModelShape

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


class _SumOverTP(torch.autograd.Function):
    """Sums over the tp group where every rank goes on with the sum in its own
    computation (the variance of a norm over all heads): the gradient is summed too."""

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        x = x.contiguous().clone()
        dist.all_reduce(x, group=groups.tp)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.groups.tp)
        return grad, None


def gather_from_tp(x, groups: RankGroups):
    """Concatenate the tp ranks' slices of the last dimension (vocab-parallel logits)."""
    return _GatherLastDim.apply(x, groups) if _active(groups.tp_ranks) else x


# ---------------------------------------------------------------- layers


def _param(shape, device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class RMSNorm(nn.Module):
    """RMSNorm as the families define it, normalising in fp32: LLaMA scales by `w` in the
    input dtype; Gemma by `1 + w` (`offset`) and OLMo 2 by `w`, both in fp32
    (`scale_fp32`). With `groups`, the weight is this rank's tp slice of a norm over all
    heads (OLMo 2's q/k norms): the mean square is taken over the full width."""

    def __init__(self, size, eps, device, dtype, offset=False, scale_fp32=False, groups=None):
        super().__init__()
        self.weight = _param((size,), device, dtype)
        self.eps, self.offset, self.scale_fp32, self.groups = eps, offset, scale_fp32 or offset, groups

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        if self.groups is not None and _active(self.groups.tp_ranks):
            square = _SumOverTP.apply(x.pow(2).sum(-1, keepdim=True), self.groups)
            x = x * torch.rsqrt(square / (x.shape[-1] * len(self.groups.tp_ranks)) + self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_fp32:
            w = self.weight.float()
            return (x * (1.0 + w) if self.offset else w * x).to(dtype)
        return self.weight * x.to(dtype)


def norm_for(shape: ModelShape, size: int, device, dtype, groups=None) -> RMSNorm:
    """The family's RMSNorm of width `size` (offset for Gemma, fp32 scaling off LLaMA's pre-norm)."""
    return RMSNorm(size, shape.norm_eps, device, dtype, shape.norm_offset, shape.norm != "pre", groups)


class _Weight(nn.Module):
    """A bare weight (and optional bias) holder, so parameter names match HF
    (`…q_proj.weight`, `…q_proj.bias`)."""

    def __init__(self, shape, device, dtype, bias: bool = False):
        super().__init__()
        self.weight = _param(shape, device, dtype)
        self.bias = _param(shape[:1], device, dtype) if bias else None


def attention_mask_4d(key_valid, q_start: int, q_len: int, window: int = 0):
    """Boolean [B, 1, q_len, K] mask: query i (absolute position q_start+i in the
    cache) sees valid keys at or before it, and with a sliding `window` only the last
    `window` of them. A query always sees itself, so padded rows never become
    all-masked (their outputs are ignored)."""
    k_len = key_valid.shape[1]
    q_abs = torch.arange(q_start, q_start + q_len, device=key_valid.device)[:, None]
    k_idx = torch.arange(k_len, device=key_valid.device)[None, :]
    causal = k_idx <= q_abs
    if window:
        causal = causal & (q_abs - k_idx < window)
    mask = causal[None] & key_valid[:, None, :].bool()
    mask = mask | (k_idx == q_abs)[None]
    return mask[:, None]


class KVCache:
    """Preallocated keys and values of one stage's layers, for incremental decoding."""

    def __init__(self, layers, batch, max_len, kv_heads, head_dim, device, dtype):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layers}
        self.v = {n: torch.zeros(shape, device=device, dtype=dtype) for n in layers}

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the cache of batch rows `rows` (finished rows leave the batch)."""
        self.k = {n: t[rows] for n, t in self.k.items()}
        self.v = {n: t[rows] for n, t in self.v.items()}


FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def attention(q, k, v, mask, scale: float | None = None, softcap: float = 0.0):
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, K, D] (Hkv divides H:
    grouped-query heads are shared, never copied, except by the soft-capped path).
    mask: None (causal, no padding) or a boolean [B, 1, T, K]. Soft-capping (Gemma 2)
    runs the scores explicitly, as transformers' eager attention; on CUDA with
    flash-attn installed, unpadded fp16/bf16 prefill runs its kernel; everything else
    runs torch's SDPA. mask may be a `packing.PackedAttention` (packed sequences):
    flash-attn's varlen kernel where it runs, its dense block-diagonal mask elsewhere."""
    if isinstance(mask, PackedAttention):
        if q.is_cuda and FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16):
            return _flash_packed(q, k, v, mask, scale, softcap)
        mask = mask.dense
    if softcap:
        return _softcapped(q, k, v, mask, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    if mask is None and q.is_cuda and FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16):
        return _flash(q, k, v, scale)
    if mask is None:  # no padding, no cache: let SDPA pick its fused causal kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


def _softcapped(q, k, v, mask, scale, cap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        t, kl = q.shape[2], k.shape[2]
        mask = torch.ones(t, kl, dtype=torch.bool, device=q.device).tril(kl - t)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _flash(q, k, v, scale):  # pragma: no cover - needs CUDA and flash-attn
    from flash_attn import flash_attn_varlen_func

    b, h, t, d = q.shape
    lens = torch.arange(0, (b + 1) * t, t, dtype=torch.int32, device=q.device)
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # noqa: E731
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), lens, lens, t, t, causal=True, softmax_scale=scale)
    return out.view(b, t, h, d).transpose(1, 2)


def _flash_packed(q, k, v, packed, scale, softcap):  # pragma: no cover - needs CUDA and flash-attn
    """Packed rows [R, H, W, D] as one varlen batch: each sequence attends to itself only
    (a sliding window of `packed.window` positions where the layer has one)."""
    from flash_attn import flash_attn_varlen_func

    r, h, w, d = q.shape
    flat = lambda x: x.transpose(1, 2).reshape(r * w, x.shape[1], d)  # noqa: E731
    lens = packed.cu_seqlens
    window = (packed.window - 1, 0) if packed.window else (-1, -1)
    out = flash_attn_varlen_func(flat(q), flat(k), flat(v), lens, lens, w, w, causal=True, softmax_scale=scale,
                                 window_size=window, softcap=softcap)
    return out.view(r, w, h, d).transpose(1, 2)


def _linear(x, w: _Weight):
    return F.linear(x, w.weight, w.bias)


def _add_bias(x, w: _Weight):
    """Row-parallel output plus its (replicated) bias, added once after the tp reduce."""
    return x if w.bias is None else x + w.bias


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class DecoderLayer(nn.Module):
    """One decoder block of any supported family; attention heads and MLP columns split
    over the tp group. Norm placement: "pre" (LLaMA), "sandwich" (Gemma: around both
    sub-blocks), "post" (OLMo 2: after each sub-block)."""

    def __init__(self, shape: ModelShape, groups: RankGroups, index: int, device, dtype):
        super().__init__()
        tp = groups.layout.tp
        if shape.n_kv_heads % tp or shape.n_heads % tp:
            raise ValueError(f"tp={tp} must divide heads={shape.n_heads} and kv heads={shape.n_kv_heads}")
        self.shape, self.groups, self.index = shape, groups, index
        self.heads, self.kv_heads = shape.n_heads // tp, shape.n_kv_heads // tp
        self.window = shape.windows[index] if shape.windows else 0
        self.rope = index not in shape.nope_layers
        self.scale = shape.query_scale ** -0.5 if shape.query_scale else None
        h, hd, inter = shape.hidden, shape.head_dim, shape.intermediate // tp
        if shape.has("input_norm"):
            self.input_layernorm = norm_for(shape, h, device, dtype)
        self.post_attention_layernorm = norm_for(shape, h, device, dtype)
        if shape.has("sandwich_norm"):
            self.pre_feedforward_layernorm = norm_for(shape, h, device, dtype)
        if shape.has("post_mlp_norm"):
            self.post_feedforward_layernorm = norm_for(shape, h, device, dtype)
        a = self.self_attn = nn.Module()
        a.q_proj = _Weight((self.heads * hd, h), device, dtype, shape.qkv_bias)
        a.k_proj = _Weight((self.kv_heads * hd, h), device, dtype, shape.qkv_bias)
        a.v_proj = _Weight((self.kv_heads * hd, h), device, dtype, shape.qkv_bias)
        a.o_proj = _Weight((h, self.heads * hd), device, dtype, shape.o_bias)
        if shape.qk_norm == "head":
            a.q_norm, a.k_norm = (RMSNorm(hd, shape.norm_eps, device, dtype, shape.norm_offset) for _ in "qk")
        elif shape.qk_norm == "full":
            a.q_norm = norm_for(shape, self.heads * hd, device, dtype, groups)
            a.k_norm = norm_for(shape, self.kv_heads * hd, device, dtype, groups)
        m = self.mlp = nn.Module()
        m.gate_proj = _Weight((inter, h), device, dtype, shape.mlp_bias)
        m.up_proj = _Weight((inter, h), device, dtype, shape.mlp_bias)
        m.down_proj = _Weight((h, inter), device, dtype, shape.mlp_bias)
        self.act = ACTIVATIONS[shape.activation]

    def _attention(self, x, rope, masks, cache: KVCache | None, start: int):
        b, t, _ = x.shape
        hd, a = self.shape.head_dim, self.self_attn
        x = copy_to_tp(x, self.groups)
        q, k, v = _linear(x, a.q_proj), _linear(x, a.k_proj), _linear(x, a.v_proj)
        if self.shape.qk_norm == "full":
            q, k = a.q_norm(q), a.k_norm(k)
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, hd).transpose(1, 2)
        if self.shape.qk_norm == "head":
            q, k = a.q_norm(q), a.k_norm(k)
        if self.rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is not None:
            cache.k[self.index][:, :, start:start + t] = k
            cache.v[self.index][:, :, start:start + t] = v
            # a view of the cache: no copy, and no repeat of the kv heads (SDPA's GQA)
            k, v = cache.k[self.index][:, :, :start + t], cache.v[self.index][:, :, :start + t]
            q = q.to(k.dtype)
        out = attention(q, k, v, masks(self.window), self.scale, self.shape.attn_softcap)
        out = out.transpose(1, 2).reshape(b, t, self.heads * hd)
        return _add_bias(reduce_from_tp(F.linear(out, a.o_proj.weight), self.groups), a.o_proj)

    def _mlp(self, x):
        m = self.mlp
        x = copy_to_tp(x, self.groups)
        y = self.act(_linear(x, m.gate_proj)) * _linear(x, m.up_proj)
        return _add_bias(reduce_from_tp(F.linear(y, m.down_proj.weight), self.groups), m.down_proj)

    def forward(self, x, rope, masks, cache=None, start=0):
        """`rope`: this layer type's (cos, sin); `masks(window)`: the attention mask."""
        norm = self.shape.norm
        if norm == "pre":
            x = x + self._attention(self.input_layernorm(x), rope, masks, cache, start)
            return x + self._mlp(self.post_attention_layernorm(x))
        inner = self.input_layernorm(x) if norm == "sandwich" else x
        x = x + self.post_attention_layernorm(self._attention(inner, rope, masks, cache, start))
        inner = self.pre_feedforward_layernorm(x) if norm == "sandwich" else x
        return x + self.post_feedforward_layernorm(self._mlp(inner))
