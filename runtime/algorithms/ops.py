"""Masked tensor helpers and the alignment conventions every loss relies on.

Alignment (shared with the models and generation):
- `logp[:, t]` is log p(input_ids[:, t] | input_ids[:, :t]); column 0 is 0.
- `values[:, t]` is the value head's output at position t (after reading token t),
  so the value of the state *before* token t is `values[:, t - 1]` (`state_values`).
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is 1: padding never leaks into a loss."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (0 where there are none)."""
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked positions; masked-out positions become 0.
    PPO normalises advantages this way so the step size does not depend on reward scale."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `input_ids` under full-vocabulary `logits` [B, T, V], in
    the module's alignment (column 0 is 0). Sharded models compute the same thing with
    a vocab-parallel log-softmax; this is the single-device definition."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))


def state_values(values: torch.Tensor) -> torch.Tensor:
    """Value of the state before each token: the head's output one position earlier."""
    return torch.nn.functional.pad(values[:, :-1], (1, 0))


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of `mask` [B, T] (0 for an all-zero row)."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * (mask > 0)).amax(-1)


def sequence_score(score: torch.Tensor) -> torch.Tensor:
    """One score per sequence: a rule's [B] score as is, or a reward model's per-token
    output [B, T] read in its last column (the `values` interface repeats the last
    real token's value over the padding, so that column is the sequence's score)."""
    return score if score.dim() == 1 else score[:, -1]


LOG_RATIO_CLAMP = 20.0  # |log(pi/ref)| beyond this is clamped before exp (verl, OpenRLHF)
K3_CLAMP = 10.0  # k3 clamped to [-10, 10] (verl's low_var_kl)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate log(pi/ref) (Schulman's k1): unbiased, high variance."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate (log(pi/ref))^2 / 2 (k2): biased, low variance, non-negative."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative KL estimate ref/pi - log(ref/pi) - 1 (k3, GRPO);
    the log-ratio is clamped to +-20 and the result to [-10, 10], so it never overflows."""
    log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - log_ratio - 1).clamp(-K3_CLAMP, K3_CLAMP)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(name: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate `name` (k1, k2, k3) of pi against ref."""
    return KL_ESTIMATORS[name](logp, ref_logp)


def aggregation_weights(mode: str, response_mask: torch.Tensor, horizon: int) -> torch.Tensor:
    """Per-token weights whose weighted sum of a per-token loss is its aggregate over the
    batch (verl's `loss_agg_mode`); any row split's weighted sums add up to it:
    token-mean: sum / all tokens; seq-mean-token-mean: mean over rows of each row's
    token mean; seq-mean-token-sum: mean over rows of each row's token sum;
    seq-mean-token-sum-norm: token sums / `horizon` (max_new_tokens), mean over rows
    (Dr.GRPO, Liu et al. 2025: a constant normaliser, no length bias)."""
    mask = response_mask.float()
    rows = max(mask.shape[0], 1)
    if mode == "token-mean":
        return mask / mask.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * rows)
    if mode == "seq-mean-token-sum":
        return mask / rows
    if mode == "seq-mean-token-sum-norm":
        return mask / (rows * max(int(horizon), 1))
    raise ValueError(f"unknown loss_agg {mode!r}")
