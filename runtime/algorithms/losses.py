"""Per-element loss terms; the registry weights and sums them (see `registry`).

Each function returns an unreduced tensor (per token or per pair), so callers decide
the normalisation and the result stays independent of micro-batching and sharding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhfc_runtime.algorithms.ops import LOG_RATIO_CLAMP


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
    clip_high: float | None = None, dual_clip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, and where clipping was active (1.0/0.0):
    max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) with r = exp(logp - old_logp), the
    log-ratio clamped to +-20 (no overflow). clip_high > clip_low is DAPO's clip-higher.
    dual_clip = c > 1 (Ye et al. 2020) also bounds the loss of A < 0 tokens at -c A."""
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss, active = torch.maximum(unclipped, clipped), clipped > unclipped
    if dual_clip:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must exceed 1 (got {dual_clip})")
        bound = -advantages * dual_clip
        lower = (advantages < 0) & (loss > bound)
        loss, active = torch.where(lower, bound, loss), active | lower
    return loss, active.to(logp.dtype)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token, 0.5 * max((v - R)^2, (v_clip - R)^2) with
    v_clip = old + clip(v - old, -eps, eps), and where the clipped term won."""
    step = values - old_values
    # `values` itself inside the clip range: old + (v - old) would differ from v by a
    # rounding, which made the clip fraction depend on the plan's float order.
    clipped_values = torch.where(step.abs() > clip, old_values + step.clamp(-clip, clip), values)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).to(values.dtype)


def dpo_loss(
    chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss per pair from summed response log-probs, and the implicit
    reward margin beta * ((pi_c - ref_c) - (pi_r - ref_r))."""
    margin = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
    return -F.logsigmoid(margin), margin


def bradley_terry_loss(chosen_score: torch.Tensor, rejected_score: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen_score - rejected_score)
