"""A decoder of any supported family sharded by tensor, pipeline and data parallelism.

Parameters keep Hugging Face names (the contract's parameter table) and are exactly the
slices that `layout.shard_slices` defines (plain contiguous tensors), so loading, saving
and reallocation can address them by name. Numerics follow `transformers` for each
family (`layers`, `rope`); tensor parallelism is Megatron-style (column-
parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding and LM head);
pipeline stages own layer ranges and exchange activations with send/recv in a GPipe
schedule; data-parallel replicas average gradients.

Layers live in `layers`, pipeline schedules (GPipe, 1F1B) in `pipeline`; this module
holds the configuration, the heads, the sharded model and its gradient handling.
Precision: a model's parameters have one dtype (`dtype`); `compute(precision)` runs
its forward passes in bf16 under autocast when the parameters are fp32 (training on
fp32 master weights), and is a no-op when they already have the wanted dtype.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torch.utils.checkpoint import checkpoint

from rlhfc_runtime.contract.family import shape_from_hf
from rlhfc_runtime.contract.kinds import Head
from rlhfc_runtime.contract.layout import shard_slices, stage_layers
from rlhfc_runtime.contract.shapes import ModelShape, param_table
from rlhfc_runtime.dist import RankGroups
from rlhfc_runtime.layers import (  # noqa: F401  (re-exported: the model's public pieces)
    DecoderLayer, KVCache, RMSNorm, _active, _Weight, attention, attention_mask_4d, copy_to_tp, gather_from_tp,
    norm_for, reduce_from_tp,
)
from rlhfc_runtime.logits import token_stats
from rlhfc_runtime.packing import Packing, attention_for
from rlhfc_runtime.pipeline import PipelineStage
from rlhfc_runtime.rope import RopeTables, layer_type

LM = "lm"
VALUE = "value"
# the contract's `precision` setting -> torch dtype
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GRAD_BUCKET_BYTES = 25 * 2**20  # gradient all-reduce bucket (as DDP's default)


@dataclass(frozen=True)
class ModelConfig:
    """A model as the runtime builds it: the contract's shape (sizes and forward
    switches, `family.shape_from_hf`) and the config.json it was read from (RoPE
    scaling blocks, special token ids, what an export writes back)."""

    shape: ModelShape
    hf: dict = field(compare=False, hash=False, repr=False)
    rope: RopeTables = field(compare=False, hash=False, repr=False, default=None)

    @staticmethod
    def from_hf(cfg: dict) -> "ModelConfig":
        """Parse a config.json dict; refuses (ValueError naming the feature) what this
        runtime does not implement, so a checkpoint never loads with silently wrong
        numerics. The checker uses the same reader."""
        shape = shape_from_hf(cfg)
        return ModelConfig(shape, dict(cfg), RopeTables(shape, dict(cfg)))


def param_shapes(cfg: ModelConfig, head: str) -> dict[str, tuple[int, ...]]:
    """Every parameter of the full (unsharded) model, HF name -> shape, in HF order
    (the contract's parameter table). head="lm": …ForCausalLM; head="value":
    …ForTokenClassification with one label (critic / reward models)."""
    if head not in (LM, VALUE):
        raise ValueError(f"unknown head {head!r}: expected 'lm' or 'value'")
    return {n: p.shape for n, p in param_table(cfg.shape, Head(head)).items()}


# ---------------------------------------------------------------- heads


class HeadOutput:
    """What the last stage computes from its final hidden states, on demand: full
    logits, vocab-parallel log-probs of given tokens, or values. Loss functions get one."""

    def __init__(self, model: "ShardedDecoder", hidden):
        self.model, self.hidden = model, hidden

    def local_logits(self):
        """This tp rank's vocabulary slice of the logits, [B, T, V/tp]."""
        g = self.model.groups
        logits = F.linear(copy_to_tp(self.hidden, g), self.model.lm_head.weight)
        cap = self.model.cfg.shape.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits(self):
        """Full logits [B, T, V] (gathered over tp): generation's last position only."""
        return gather_from_tp(self.local_logits(), self.model.groups)

    def token_stats(self, tokens, where=None, entropy: bool = False):
        """(log p(tokens[b, t] | position t), entropy there or None) [B, T], computed
        only where `where` [B, T] is true (0 elsewhere; everywhere when None), by the
        tiled vocab-parallel head (`rlhfc_runtime.logits`): no full-vocabulary logits of
        all positions ever exist, in the forward or the backward pass."""
        g, shape = self.model.groups, self.model.cfg.shape
        hidden = copy_to_tp(self.hidden, g)
        flat = hidden.reshape(-1, hidden.shape[-1])
        picked = None if where is None else where.reshape(-1).nonzero().squeeze(-1)
        h = flat if picked is None else flat.index_select(0, picked)
        ids = tokens.reshape(-1) if picked is None else tokens.reshape(-1).index_select(0, picked)
        width = self.model.lm_head.weight.shape[0]
        group = g.tp if _active(g.tp_ranks) else None
        logp, ent = token_stats(h, self.model.lm_head.weight, ids, shape.final_softcap, group, g.tp_rank * width)
        return self._placed(logp, picked, tokens.shape), (self._placed(ent, picked, tokens.shape) if entropy else None)

    @staticmethod
    def _placed(values, picked, shape):
        """Per-position values [N] back at their [B, T] places (0 elsewhere)."""
        if picked is None:
            return values.reshape(shape)
        return values.new_zeros(shape.numel()).index_put((picked,), values).reshape(shape)

    def token_logprobs(self, tokens):
        """log p(tokens[b, t] | position t) [B, T] at every position (`token_stats`)."""
        return self.token_stats(tokens)[0]

    def entropy(self):
        """Entropy of the next-token distribution at every position [B, T], vocab-
        parallel (for entropy bonuses and monitoring)."""
        return self.token_stats(torch.zeros(self.hidden.shape[:-1], dtype=torch.long,
                                            device=self.hidden.device), entropy=True)[1]

    def values(self):
        """Value-head output [B, T] (HF token classification with one label)."""
        s = self.model.score
        return F.linear(self.hidden, s.weight, getattr(s, "bias", None)).squeeze(-1)


# ---------------------------------------------------------------- the model


class ShardedDecoder(PipelineStage, nn.Module):
    """The part of a decoder model that one rank holds under a layout.

    Parameter names are HF names; `shards()` / `load_shards()` are the contract with
    reallocation. Forward passes go through `run_pipeline`, which every rank of a
    data-parallel replica calls with the same batch."""

    def __init__(self, cfg: ModelConfig, groups: RankGroups, head: str = LM, device=None, dtype=torch.float32):
        super().__init__()
        self.cfg, self.groups, self.head = cfg, groups, head
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self._recompute = False  # set by run_pipeline for a backward pass that asks for it
        layout = groups.layout
        self.first = groups.pp_rank == 0
        self.last = groups.pp_rank == layout.pp - 1
        shape = cfg.shape
        self.table = param_table(shape, Head(head))
        self.layer_ids = list(stage_layers(shape.n_layers, layout.pp, groups.pp_rank))
        self.model = nn.Module()
        vocab = shape.vocab // layout.tp
        if shape.vocab % layout.tp:
            raise ValueError(f"tp={layout.tp} must divide vocab_size={shape.vocab}")
        if self.first:
            self.model.embed_tokens = _Weight((vocab, shape.hidden), self.device, dtype)
        self.model.layers = nn.ModuleDict(
            {str(n): DecoderLayer(shape, groups, n, self.device, dtype) for n in self.layer_ids}
        )
        if self.last:
            self.model.norm = norm_for(shape, shape.hidden, self.device, dtype)
            if head == LM:
                self.lm_head = _Weight((vocab, shape.hidden), self.device, dtype)
            else:
                self.score = _Weight((1, shape.hidden), self.device, dtype, shape.score_bias)
        self._check_shapes()

    def _check_shapes(self):
        names = [n for n in self.table if self.slices(n) is not None]
        mine = dict(self.named_parameters())
        if sorted(names) != sorted(mine):
            raise AssertionError(f"parameters {sorted(mine)} differ from the layout's {sorted(names)}")
        for n in names:
            want = tuple(s.stop - s.start for s in self.slices(n))
            if tuple(mine[n].shape) != want:
                raise AssertionError(f"{n}: shard shape {tuple(mine[n].shape)} != layout's {want}")

    @staticmethod
    def from_shards(cfg: ModelConfig, groups: RankGroups, head: str, shards: dict[str, torch.Tensor]) -> "ShardedDecoder":
        """A model whose parameters ARE `shards` (received by reallocation or reloaded
        from host memory): built on the meta device, then the tensors are assigned, so
        no second copy of the weights is ever allocated. Device and dtype are theirs."""
        sample = next(iter(shards.values()))
        module = ShardedDecoder(cfg, groups, head, device="meta", dtype=sample.dtype)
        module.load_state_dict(shards, strict=True, assign=True)
        module.device = sample.device
        return module

    def compute(self, precision: str):
        """The context forward passes of a call with `precision` run in: bf16 autocast
        over fp32 weights (training on master weights), nothing when the weights already
        have that dtype (bf16 inference copies, fp32 runs)."""
        dtype = DTYPES[precision]
        if dtype == self.dtype:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def head_output(self, hidden) -> HeadOutput:
        return HeadOutput(self, hidden)

    def slices(self, name: str):
        """This rank's slice of full parameter `name` (layout.shard_slices)."""
        p = self.table[name]
        return shard_slices(name, p.shape, self.cfg.shape.n_layers, self.groups.layout, self.groups.rank, p.split)

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

    def stage_forward(self, x, position_ids, key_valid, cache: KVCache | None = None, start: int = 0,
                      packing: Packing | None = None):
        """Run this rank's stage: token ids (first stage) or hidden states in, hidden
        states out (normalised on the last stage). key_valid [B, K] marks real tokens
        among all keys (cache included); None means no padding and no cache. `packing`:
        x holds packed sequences (`packing.Packing`), attention stays inside each one."""
        if self.first:
            x = self._embed(x)
        shape = self.cfg.shape
        ropes = self.cfg.rope.tables(position_ids, x.dtype)
        masks = _Masks(key_valid, cache is not None, start, x, packing)
        recompute = self._recompute and torch.is_grad_enabled() and cache is None
        for n in self.layer_ids:
            layer = self.model.layers[str(n)]
            rope = ropes[layer_type(shape, n)]
            if recompute:  # keep only the layer's input; rerun its forward in backward
                x = checkpoint(layer, x, rope, masks, use_reentrant=False)
            else:
                x = layer(x, rope, masks, cache, start)
        return self.model.norm(x) if self.last else x

    def _embed(self, ids):
        w = self.model.embed_tokens.weight
        start = self.groups.tp_rank * w.shape[0]
        local = ids - start
        outside = (local < 0) | (local >= w.shape[0])
        pad = self.cfg.hf.get("pad_token_id")
        # like HF's nn.Embedding(padding_idx=pad_token_id): the pad row gets no gradient
        pad = pad - start if pad is not None and 0 <= pad - start < w.shape[0] else None
        out = F.embedding(local.masked_fill(outside, 0), w, padding_idx=pad) * outside.logical_not()[..., None].to(w.dtype)
        out = reduce_from_tp(out, self.groups)
        if self.cfg.shape.embed_scale:  # Gemma: times sqrt(hidden), rounded to the weights' dtype
            out = out * torch.tensor(self.cfg.shape.hidden ** 0.5, dtype=w.dtype)
        return out

    def new_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for this stage's layers (in the compute dtype `dtype`,
        the parameters' by default)."""
        return KVCache(self.layer_ids, batch, max_len, self.cfg.shape.n_kv_heads // self.groups.layout.tp,
                       self.cfg.shape.head_dim, self.device, dtype or self.dtype)

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
        if not (self.cfg.shape.tied_embeddings and self.head == LM and (self.first or self.last)):
            return
        holders = (getattr(self.model, "embed_tokens", None), getattr(self, "lm_head", None))
        mine = [m.weight for m in holders if m is not None]
        total = sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in mine)
        if len(self.groups.tie_ranks) > 1:
            dist.all_reduce(total, group=self.groups.tie)
        for p in mine:
            p.grad = total.clone()

    def reduce_gradients(self, bucket_bytes: int = GRAD_BUCKET_BYTES) -> None:
        """Sum tied-embedding gradients and those of replicated parameters each tp rank
        applies to its own heads only (`Param.tp_partial`), then average gradients over the data-parallel
        group in fp32, bucket by bucket (one bucket of extra memory, never a copy of
        all gradients; a gradient at least a bucket large is reduced in place)."""
        self._sum_tied_gradients()
        g = self.groups
        if _active(g.tp_ranks):
            for name, p in self.named_parameters():
                if self.table[name].tp_partial and p.grad is not None:
                    dist.all_reduce(p.grad, group=g.tp)
        if g.layout.dp == 1:
            return
        grads = []
        for p in self.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads, bucket_bytes):
            if len(bucket) == 1 and bucket[0].dtype == torch.float32 and bucket[0].is_contiguous():
                dist.all_reduce(bucket[0], group=g.dp)
                bucket[0].div_(g.layout.dp)
                continue
            flat = torch.cat([t.reshape(-1).float() for t in bucket])
            dist.all_reduce(flat, group=g.dp)
            flat /= g.layout.dp
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient, the same on every rank of a replica:
        tp-split shards add up over the tp group, replicated parameters count once
        (tp rank 0), a tied lm_head counts as the embedding it is."""
        g = self.groups
        tied = self.cfg.shape.tied_embeddings and self.head == LM
        sq = torch.zeros((), device=self.device, dtype=torch.float64)
        for name, p in self.named_parameters():
            if p.grad is None or (tied and name == "lm_head.weight"):
                continue
            if self.table[name].split is not None or g.tp_rank == 0:
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
                   max_grad_norm: float | None = None, *, precision: str = "fp32", schedule: str = "1f1b",
                   recompute: bool = False, token_budget: int = 0) -> float:
        """zero grads, forward+backward of the batch-mean loss (`schedule`, `recompute`,
        micro-batches of `token_budget` tokens where given, compute in `precision` over these weights), dp average, optional global-norm
        clipping, optimizer step; returns the loss (same value on every rank of the
        replica)."""
        optimizer.zero_grad(set_to_none=True)
        with self.compute(precision):
            loss = self.run_pipeline(input_ids, attention_mask, loss_fn, n_micro, extra, backward=True,
                                     schedule=schedule, recompute=recompute, token_budget=token_budget)
        self.reduce_gradients()
        if max_grad_norm is not None:
            self.clip_grad_norm_(max_grad_norm)
        optimizer.step()
        return float(loss)


class _Masks:
    """The attention masks of one stage pass, per sliding-window length, built once:
    None (SDPA's causal kernel) for full attention without padding or cache; for packed
    sequences their block-diagonal mask (`packing.attention_for`)."""

    def __init__(self, key_valid, cached: bool, start: int, x, packing: Packing | None = None):
        self.key_valid, self.cached, self.start, self.q_len = key_valid, cached, start, x.shape[1]
        self.batch, self.device, self.packing = x.shape[0], x.device, packing
        self.built: dict[int, torch.Tensor | None] = {}

    def __call__(self, window: int):
        if window not in self.built:
            if self.packing is not None:
                self.built[window] = attention_for(self.packing, window)
            elif self.key_valid is None and not self.cached and not window:
                self.built[window] = None
            else:
                valid = self.key_valid
                if valid is None:
                    valid = torch.ones(self.batch, self.start + self.q_len, dtype=torch.bool, device=self.device)
                self.built[window] = attention_mask_4d(valid, self.start, self.q_len, window)
        return self.built[window]


def _buckets(tensors: list[torch.Tensor], limit: int):
    """Consecutive runs of `tensors` of about `limit` bytes (in fp32)."""
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + 4 * t.numel() > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += 4 * t.numel()
    if bucket:
        yield bucket


def next_token_stats(head: HeadOutput, ids, targets=None, entropy: bool = False):
    """(logp, entropy or None) [B, T] in the alignment of `algorithms.ops`: column t is
    log p(ids[:, t] | ids[:, :t]) (and the entropy of the distribution it was drawn
    from), 0 in column 0 and wherever `targets` [B, T] is 0: the head runs only at the
    positions whose next token is a target (the response), or everywhere when None."""
    tokens = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
    where = None if targets is None else F.pad(targets[:, 1:] > 0, (0, 1), value=False)
    lp, ent = head.token_stats(tokens, where, entropy)
    aligned = lambda t: F.pad(t[:, :-1], (1, 0))  # noqa: E731
    return aligned(lp), (aligned(ent) if entropy else None)


def next_token_logprobs(head: HeadOutput, ids):
    """log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1]: position t predicts token t+1."""
    return next_token_stats(head, ids)[0][:, 1:]


def lm_loss(head: HeadOutput, mb: dict):
    """Mean next-token cross-entropy over real (unmasked) target tokens: the SFT loss,
    and the reference for the numerics tests."""
    lp = next_token_logprobs(head, mb["input_ids"])
    valid = mb["attention_mask"][:, 1:].to(lp.dtype)
    return -(lp * valid).sum() / valid.sum().clamp(min=1)
