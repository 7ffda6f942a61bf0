"""The LM head's log-probs and entropies in tiles over tokens, vocab-parallel over tp.

`token_stats(hidden, weight, tokens, …)` gives, for each of N selected positions (rows
of `hidden` [N, H]), log p(tokens[n]) and the entropy of the next-token distribution,
without ever holding the logits of all N tokens: the tokens run in tiles of
`contract.shapes.logit_tile_tokens(vocab / tp)` rows, each tile's fp32 logits live only
while that tile is reduced to its statistics, and the backward pass recomputes them per
tile (`_TiledHead`, a `torch.autograd.Function`). Final-logit soft-capping (Gemma 2)
is applied inside the tile.

With tp > 1 each rank holds a vocabulary slice of the head: the tile's max and its three
sums (exp, exp·logit, the picked logit) are all-reduced over the tp group, so every rank
sees the full-vocabulary statistics. The gradient with respect to a rank's logit slice
needs nothing more (p_v from the global log-sum-exp, the global expectation E):

    d logp / dz_v = 1[v = y] - p_v        d entropy / dz_v = p_v (E - z_v)

The input's gradient is this rank's partial sum; the caller enters the region with
`copy_to_tp`, whose backward sums it over tp (as for any column-parallel layer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rlhfc_runtime.contract.shapes import logit_tile_tokens


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (bf16 over fp32 weights), else the
    weight's. Fixed in forward and reused in backward, so both see the same logits."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) if device != "meta" else False:
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _tile_logits(h: torch.Tensor, w: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (soft-capped) logits of one tile, and tanh(x / cap) for the cap's gradient."""
    x = F.linear(h, w).float()
    if not cap:
        return x, None
    t = torch.tanh(x / cap)
    return t * cap, t


class _TiledHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, cap, group, first, tile):
        dtype = _compute_dtype(weight)
        h, w = hidden.to(dtype), weight.to(dtype)
        width = w.shape[0]
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        expected = torch.empty_like(lse)
        logp = torch.empty_like(lse)
        for lo in range(0, n, tile):
            hi = min(lo + tile, n)
            z, _ = _tile_logits(h[lo:hi], w, cap)
            peak = z.max(dim=-1).values
            if group is not None:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            z -= peak[:, None]  # z is shifted in place: exp and the sums below reuse it
            e = torch.exp(z)
            idx = tokens[lo:hi] - first
            inside = (idx >= 0) & (idx < width)
            picked = z.gather(-1, idx.clamp(0, width - 1)[:, None]).squeeze(-1) * inside
            sums = torch.stack([e.sum(-1), (e * z).sum(-1), picked])
            del z, e
            if group is not None:
                dist.all_reduce(sums, group=group)
            log_sum = torch.log(sums[0])
            lse[lo:hi] = log_sum + peak
            expected[lo:hi] = sums[1] / sums[0] + peak  # E = sum p_v z_v (unshifted)
            logp[lo:hi] = sums[2] - log_sum
        ctx.save_for_backward(hidden, weight, tokens, lse, expected)
        ctx.cap, ctx.first, ctx.tile, ctx.dtype = cap, first, tile, dtype
        return logp, lse - expected

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, lse, expected = ctx.saved_tensors
        cap, first, tile, dtype = ctx.cap, ctx.first, ctx.tile, ctx.dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        width = w.shape[0]
        n = h.shape[0]
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp.float()
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.float()
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
        for lo in range(0, n, tile):
            hi = min(lo + tile, n)
            z, t = _tile_logits(h[lo:hi], w, cap)
            p = torch.exp(z - lse[lo:hi, None])
            # dL/dz = g_H p (E - z) - g_lp p (+ g_lp at the picked token)
            z.neg_().add_(expected[lo:hi, None]).mul_(grad_entropy[lo:hi, None]).sub_(grad_logp[lo:hi, None])
            grad = z.mul_(p)
            del p
            idx = tokens[lo:hi] - first
            inside = (idx >= 0) & (idx < width)
            rows = torch.arange(hi - lo, device=grad.device)  # no boolean indexing: no host sync
            grad.index_put_((rows, idx.clamp(0, width - 1)), grad_logp[lo:hi] * inside, accumulate=True)
            if t is not None:
                grad.mul_(1 - t * t)
                del t
            grad = grad.to(dtype)
            if grad_h is not None:
                grad_h[lo:hi] = grad @ w
            if grad_w is not None and dtype == torch.float32:
                grad_w.addmm_(grad.t(), h[lo:hi])
            elif grad_w is not None:
                grad_w += (grad.t() @ h[lo:hi]).float()
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None)


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, cap: float,
                group=None, first: int = 0, tile: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(tokens), entropy) [N] of the LM head `weight` (this rank's vocabulary rows
    [first, first + V/tp)) at the positions `hidden` [N, H], in tiles of `tile` tokens
    (the contract's size by default; see the module doc); `group` is the tp group to
    reduce over, None when tp = 1."""
    tile = tile or logit_tile_tokens(weight.shape[0])
    return _TiledHead.apply(hidden, weight, tokens, float(cap or 0.0), group, first, tile)
