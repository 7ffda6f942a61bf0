"""Per-element loss terms; the registry weights and sums them (see `registry`).

Each function returns an unreduced tensor (per token or per pair), so callers decide
the normalisation and the result stays independent of micro-batching and sharding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, and where clipping was active (1.0/0.0).
    max(-A r, -A clip(r, 1-eps, 1+eps)) with r = exp(logp - old_logp)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logp.dtype)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token, 0.5 * max((v - R)^2, (v_clip - R)^2) with
    v_clip = old + clip(v - old, -eps, eps), and where the clipped term won."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
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
