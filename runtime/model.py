"""A LLaMA decoder sharded by tensor, pipeline and data parallelism.

Parameters keep Hugging Face `LlamaForCausalLM` names and are exactly the slices that
`layout.shard_slices` defines (plain contiguous tensors), so loading, saving and
reallocation can address them by name. Numerics follow `transformers` (RMSNorm, RoPE
with rope_theta, GQA attention, SwiGLU); tensor parallelism is Megatron-style (column-
parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding and LM head);
pipeline stages own layer ranges and exchange activations with send/recv in a GPipe
schedule; data-parallel replicas average gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rlhfc_runtime.dist import RankGroups
from rlhfc_runtime.contract.layout import shard_slices, stage_layers, tp_split_dim

LM = "lm"
VALUE = "value"
# model_type -> HF class-name prefix (…ForCausalLM, …ForTokenClassification)
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a LLaMA-family model, read from a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    score_bias: bool
    qkv_bias: bool
    hf: dict = field(compare=False, hash=False, repr=False)

    @staticmethod
    def from_hf(cfg: dict) -> "ModelConfig":
        """Parse a config.json dict (LLaMA, or Qwen2: LLaMA with q/k/v biases); refuses
        features this runtime does not implement (so a checkpoint never loads with
        silently wrong numerics)."""
        kind = cfg.get("model_type", "llama")
        if kind not in ARCHITECTURES:
            raise ValueError(f"model_type {kind!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        if cfg.get("mlp_bias") or (kind == "llama" and cfg.get("attention_bias")):
            raise ValueError("config.json sets mlp_bias/attention_bias: biased LLaMA variants are not supported")
        if cfg.get("use_sliding_window"):
            raise ValueError("config.json sets use_sliding_window: sliding-window attention is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (LLaMA uses 'silu')")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported, only the default RoPE")
        heads = cfg["num_attention_heads"]
        return ModelConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            score_bias=bool(cfg.get("token_classification_bias", True)),
            qkv_bias=kind == "qwen2",
            hf=dict(cfg),
        )


def param_shapes(cfg: ModelConfig, head: str) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full (unsharded) model, HF name -> shape, in HF order.

    head="lm" is LlamaForCausalLM; head="value" is LlamaForTokenClassification with one
    label (critic / reward models)."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            **({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,)} if cfg.qkv_bias else {}),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    if head == LM:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    elif head == VALUE:
        shapes["score.weight"] = (1, h)
        if cfg.score_bias:
            shapes["score.bias"] = (1,)
    else:
        raise ValueError(f"unknown head {head!r}: expected 'lm' or 'value'")
    return shapes


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
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            cache.k[self.index][:, :, start:start + t] = k
            cache.v[self.index][:, :, start:start + t] = v
            k, v = cache.k[self.index][:, :, :start + t], cache.v[self.index][:, :, :start + t]
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:  # no padding, no cache: let SDPA pick its fused causal kernel
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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


# ---------------------------------------------------------------- heads


class HeadOutput:
    """What the last stage computes from its final hidden states, on demand: full
    logits, vocab-parallel log-probs of given tokens, or values. Loss functions get one."""

    def __init__(self, model: "ShardedLlama", hidden):
        self.model, self.hidden = model, hidden

    def local_logits(self):
        """This tp rank's vocabulary slice of the logits, [B, T, V/tp]."""
        g = self.model.groups
        return F.linear(copy_to_tp(self.hidden, g), self.model.lm_head.weight)

    def logits(self):
        """Full logits [B, T, V] (gathered over tp)."""
        return gather_from_tp(self.local_logits(), self.model.groups)

    def _local_logits_and_lse(self):
        """This rank's fp32 logit slice and the full-vocabulary log-sum-exp [B, T]."""
        g = self.model.groups
        local = self.local_logits().float()
        peak = local.detach().max(dim=-1).values
        if _active(g.tp_ranks):
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=g.tp)
        sumexp = reduce_from_tp(torch.exp(local - peak[..., None]).sum(-1), g)
        return local, torch.log(sumexp) + peak

    def token_logprobs(self, tokens):
        """log p(tokens[b, t] | position t) [B, T] without gathering the vocabulary:
        the log-sum-exp and the picked logit are reduced over the tp group."""
        g = self.model.groups
        local, lse = self._local_logits_and_lse()
        width = local.shape[-1]
        idx = tokens - g.tp_rank * width
        inside = (idx >= 0) & (idx < width)
        picked = local.gather(-1, idx.clamp(0, width - 1)[..., None]).squeeze(-1) * inside
        return reduce_from_tp(picked, g) - lse

    def entropy(self):
        """Entropy of the next-token distribution at every position [B, T], vocab-
        parallel (for entropy bonuses and monitoring): lse - sum_v p_v * logit_v."""
        local, lse = self._local_logits_and_lse()
        expected = reduce_from_tp((torch.exp(local - lse[..., None]) * local).sum(-1), self.model.groups)
        return lse - expected

    def values(self):
        """Value-head output [B, T] (HF token classification with one label)."""
        s = self.model.score
        return F.linear(self.hidden, s.weight, getattr(s, "bias", None)).squeeze(-1)


# ---------------------------------------------------------------- the model


class ShardedLlama(nn.Module):
    """The part of a LLaMA model that one rank holds under a layout.

    Parameter names are HF names; `shards()` / `load_shards()` are the contract with
    reallocation. Forward passes go through `run_pipeline`, which every rank of a
    data-parallel replica calls with the same batch."""

    def __init__(self, cfg: ModelConfig, groups: RankGroups, head: str = LM, device=None, dtype=torch.float32):
        super().__init__()
        self.cfg, self.groups, self.head = cfg, groups, head
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        layout = groups.layout
        self.first = groups.pp_rank == 0
        self.last = groups.pp_rank == layout.pp - 1
        self.layer_ids = list(stage_layers(cfg.num_layers, layout.pp, groups.pp_rank))
        self.model = nn.Module()
        vocab = cfg.vocab_size // layout.tp
        if cfg.vocab_size % layout.tp:
            raise ValueError(f"tp={layout.tp} must divide vocab_size={cfg.vocab_size}")
        if self.first:
            self.model.embed_tokens = _Weight((vocab, cfg.hidden_size), self.device, dtype)
        self.model.layers = nn.ModuleDict(
            {str(n): DecoderLayer(cfg, groups, n, self.device, dtype) for n in self.layer_ids}
        )
        if self.last:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.device, dtype)
            if head == LM:
                self.lm_head = _Weight((vocab, cfg.hidden_size), self.device, dtype)
            else:
                self.score = nn.Linear(cfg.hidden_size, 1, bias=cfg.score_bias, device=self.device, dtype=dtype)
        self._check_shapes()

    def _check_shapes(self):
        full = param_shapes(self.cfg, self.head)
        names = [n for n in full if self.slices(n) is not None]
        mine = dict(self.named_parameters())
        if sorted(names) != sorted(mine):
            raise AssertionError(f"parameters {sorted(mine)} differ from the layout's {sorted(names)}")
        for n in names:
            want = tuple(s.stop - s.start for s in self.slices(n))
            if tuple(mine[n].shape) != want:
                raise AssertionError(f"{n}: shard shape {tuple(mine[n].shape)} != layout's {want}")

    def slices(self, name: str):
        """This rank's slice of full parameter `name` (layout.shard_slices)."""
        full = param_shapes(self.cfg, self.head)[name]
        return shard_slices(name, full, self.cfg.num_layers, self.groups.layout, self.groups.rank)

    def shards(self) -> dict[str, torch.Tensor]:
        """HF name -> this rank's shard (shares storage with the parameter)."""
        return {n: p.detach() for n, p in self.named_parameters()}

    @torch.no_grad()
    def load_shards(self, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy shards in place (by HF name); strict: exactly this rank's names."""
        params = dict(self.named_parameters())
        if strict and sorted(tensors) != sorted(params):
            raise KeyError(f"load_shards: got {sorted(set(tensors) ^ set(params))} missing or extra")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(params[n].shape):
                raise ValueError(f"load_shards: {n} has shape {tuple(t.shape)}, shard is {tuple(params[n].shape)}")
            params[n].copy_(t)

    # ------------------------------------------------------------ one stage

    def stage_forward(self, x, position_ids, key_valid, cache: KVCache | None = None, start: int = 0):
        """Run this rank's stage: token ids (first stage) or hidden states in, hidden
        states out (normalised on the last stage). key_valid [B, K] marks real tokens
        among all keys (cache included); None means no padding and no cache."""
        if self.first:
            x = self._embed(x)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = None
        if key_valid is not None or cache is not None:
            if key_valid is None:
                key_valid = torch.ones(x.shape[0], start + x.shape[1], dtype=torch.bool, device=x.device)
            mask = attention_mask_4d(key_valid, start, x.shape[1])
        for n in self.layer_ids:
            x = self.model.layers[str(n)](x, cos, sin, mask, cache, start)
        return self.model.norm(x) if self.last else x

    def _embed(self, ids):
        w = self.model.embed_tokens.weight
        start = self.groups.tp_rank * w.shape[0]
        local = ids - start
        outside = (local < 0) | (local >= w.shape[0])
        pad = self.cfg.hf.get("pad_token_id")
        # like HF's nn.Embedding(padding_idx=pad_token_id): the pad row gets no gradient
        pad = pad - start if pad is not None and 0 <= pad - start < w.shape[0] else None
        out = F.embedding(local.masked_fill(outside, 0), w, padding_idx=pad) * (~outside)[..., None].to(w.dtype)
        return reduce_from_tp(out, self.groups)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for this stage's layers."""
        return KVCache(self.layer_ids, batch, max_len, self.cfg.num_kv_heads // self.groups.layout.tp,
                       self.cfg.head_dim, self.device, self.dtype)

    # ------------------------------------------------------------ pipeline

    def _neighbour(self, step: int) -> int:
        g = self.groups
        return g.layout.rank_at(g.pp_rank + step, g.dp_rank, g.tp_rank)

    def send_next(self, hidden):
        """Send this stage's output activations to the next stage (same dp, tp)."""
        dist.send(hidden.detach().contiguous(), self._neighbour(+1))

    def recv_prev(self, shape):
        """Receive the previous stage's output activations (same dp, tp)."""
        buf = torch.empty(shape, device=self.device, dtype=self.dtype)
        dist.recv(buf, self._neighbour(-1))
        return buf

    def pipeline_forward(self, ids, position_ids, key_valid, cache=None, start=0):
        """Pass one micro-batch through the whole pipeline; returns (stage input,
        stage output): the last stage's output is the final hidden state."""
        if self.first:
            inp = ids
        else:
            inp = self.recv_prev((ids.shape[0], ids.shape[1], self.cfg.hidden_size))
            inp.requires_grad_(torch.is_grad_enabled())
        out = self.stage_forward(inp, position_ids, key_valid, cache, start)
        if not self.last:
            self.send_next(out)
        return inp, out

    def run_pipeline(
        self,
        input_ids,
        attention_mask=None,
        fn: Callable[[HeadOutput, dict], object] | None = None,
        n_micro: int = 1,
        extra: dict | None = None,
        backward: bool = False,
    ):
        """GPipe over micro-batches of one data-parallel replica's batch.

        `fn(head_output, micro_batch)` runs on the last stage per micro-batch; the
        micro-batch dict holds input_ids, attention_mask and the rows of every tensor in
        `extra`. Forward only: fn returns a tensor, and the concatenation over
        micro-batches comes back on every stage. backward=True: fn returns the
        micro-batch's mean loss; gradients of the batch-mean loss accumulate into .grad
        (not yet averaged over dp, see `reduce_gradients`) and the loss comes back."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = attention_mask is not None and not bool(attention_mask.all())
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, **(extra or {})}
        rows = input_ids.shape[0]
        micro = [dict(zip(batch, parts)) for parts in zip(*(t.tensor_split(n_micro) for t in batch.values()))]
        micro = [m for m in micro if m["input_ids"].shape[0]]
        kept, results = [], []
        with torch.set_grad_enabled(backward):
            for mb in micro:
                inp, out = self.pipeline_forward(
                    mb["input_ids"], mb["position_ids"], mb["attention_mask"] if padded else None
                )
                if self.last:
                    r = fn(HeadOutput(self, out), mb)
                    if backward:
                        r = r * (mb["input_ids"].shape[0] / rows)
                    results.append(r)
                kept.append((inp, out))
        if not backward:
            local = torch.cat(results) if self.last else None
            return self._from_last_stage(local)
        loss = torch.zeros((), device=self.device)
        for i in reversed(range(len(kept))):
            inp, out = kept[i]
            if self.last:
                results[i].backward()
                loss += results[i].detach().float()
            else:
                grad = self.recv_next_grad(out)
                out.backward(grad)
            if not self.first:
                dist.send(inp.grad.contiguous(), self._neighbour(-1))
        return self._from_last_stage(loss)

    def recv_next_grad(self, out):
        """Receive d(loss)/d(out) from the next stage, for this stage's backward."""
        grad = torch.empty_like(out)
        dist.recv(grad, self._neighbour(+1))
        return grad

    def _from_last_stage(self, tensor):
        """Broadcast a last-stage tensor to every stage of this replica's pipeline."""
        g = self.groups
        if g.layout.pp == 1:
            return tensor
        meta = [(tuple(tensor.shape), tensor.dtype) if self.last else None]
        src = g.pp_ranks[-1]
        dist.broadcast_object_list(meta, src=src, group=g.pp)
        if not self.last:
            tensor = torch.empty(meta[0][0], dtype=meta[0][1], device=self.device)
        dist.broadcast(tensor.contiguous(), src=src, group=g.pp)
        return tensor

    # ------------------------------------------------------------ conveniences

    def forward(self, input_ids, attention_mask=None, n_micro: int = 1):
        """Full logits [B, T, V] on every rank of the replica (for tests and small
        vocabularies; RLHF code should prefer `token_logprobs`)."""
        return self.run_pipeline(input_ids, attention_mask, lambda h, mb: h.logits(), n_micro)

    def token_logprobs(self, input_ids, attention_mask=None, n_micro: int = 1):
        """log p(input_ids[:, t+1] | prefix) [B, T-1], vocab-parallel."""
        return self.run_pipeline(
            input_ids, attention_mask, lambda h, mb: next_token_logprobs(h, mb["input_ids"]), n_micro
        )

    def values(self, input_ids, attention_mask=None, n_micro: int = 1):
        """Value-head outputs [B, T]."""
        return self.run_pipeline(input_ids, attention_mask, lambda h, mb: h.values(), n_micro)

    def _sum_tied_gradients(self) -> None:
        """Tied input/output embeddings are two shards of one parameter (on the first and
        last stage): both get the sum of their gradients, so they stay equal."""
        if not (self.cfg.tie_word_embeddings and self.head == LM and (self.first or self.last)):
            return
        holders = (getattr(self.model, "embed_tokens", None), getattr(self, "lm_head", None))
        mine = [m.weight for m in holders if m is not None]
        total = sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in mine)
        if len(self.groups.tie_ranks) > 1:
            dist.all_reduce(total, group=self.groups.tie)
        for p in mine:
            p.grad = total.clone()

    def reduce_gradients(self) -> None:
        """Sum tied-embedding gradients, then average gradients over the data-parallel
        group (one flat bucket)."""
        self._sum_tied_gradients()
        g = self.groups
        if g.layout.dp == 1:
            return
        params = list(self.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([t.reshape(-1) for t in grads])
        dist.all_reduce(flat, group=g.dp)
        flat /= g.layout.dp
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient, the same on every rank of a replica:
        tp-split shards add up over the tp group, replicated parameters count once
        (tp rank 0), a tied lm_head counts as the embedding it is."""
        g = self.groups
        tied = self.cfg.tie_word_embeddings and self.head == LM
        sq = torch.zeros((), device=self.device, dtype=torch.float64)
        for name, p in self.named_parameters():
            if p.grad is None or (tied and name == "lm_head.weight"):
                continue
            if tp_split_dim(name) is not None or g.tp_rank == 0:
                sq += p.grad.double().pow(2).sum()
        if len(g.mp_ranks) > 1:
            dist.all_reduce(sq, group=g.mp)
        return float(sq.sqrt())

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale gradients so their global norm is at most max_norm (as
        torch.nn.utils.clip_grad_norm_ would on the unsharded model); returns the norm."""
        norm = self.grad_norm()
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def train_step(self, input_ids, attention_mask, loss_fn, optimizer, n_micro: int = 1, extra=None,
                   max_grad_norm: float | None = None) -> float:
        """zero grads, GPipe forward+backward of the batch-mean loss, dp average,
        optional global-norm clipping, optimizer step; returns the loss (same value on
        every rank of the replica)."""
        optimizer.zero_grad(set_to_none=True)
        loss = self.run_pipeline(input_ids, attention_mask, loss_fn, n_micro, extra, backward=True)
        self.reduce_gradients()
        if max_grad_norm is not None:
            self.clip_grad_norm_(max_grad_norm)
        optimizer.step()
        return float(loss)


def next_token_logprobs(head: HeadOutput, ids):
    """log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1]: position t predicts token t+1."""
    lp = head.token_logprobs(torch.cat([ids[:, 1:], ids[:, -1:]], dim=1))
    return lp[:, :-1]


def lm_loss(head: HeadOutput, mb: dict):
    """Mean next-token cross-entropy over real (unmasked) target tokens: the SFT loss,
    and the reference for the numerics tests."""
    lp = next_token_logprobs(head, mb["input_ids"])
    valid = mb["attention_mask"][:, 1:].to(lp.dtype)
    return -(lp * valid).sum() / valid.sum().clamp(min=1)
