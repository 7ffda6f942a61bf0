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


def behaviour_weights(
    old_logp: torch.Tensor, behav_logp: torch.Tensor, truncate: float | None, ratio_cap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token detached importance weights of the rollout's behaviour policy against
    the trainer's old (proximal) one, w = pi_old / pi_behav: (weight, w, where a cap bound
    (1.0/0.0)). The clipped loss with ratio pi / pi_old times the weight is AReaL's
    decoupled PPO (Fu et al. 2025, after Hilton et al. 2022) with `truncate` None, and
    verl's truncated IS (Yao et al. 2025: min(w, C)) with `truncate` = C. `ratio_cap` > 1
    drops the tokens with w above it from the loss (AReaL's `behav_imp_weight_cap`;
    0: off)."""
    if ratio_cap and ratio_cap <= 1:
        raise ValueError(f"ratio_cap must exceed 1 (got {ratio_cap})")
    w = torch.exp((old_logp - behav_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).detach()
    weight = w if truncate is None else w.clamp(max=truncate)
    capped = w > truncate if truncate is not None else torch.zeros_like(w, dtype=torch.bool)
    if ratio_cap:
        dropped = w > ratio_cap
        weight, capped = torch.where(dropped, torch.zeros_like(w), weight), capped | dropped
    return weight, w, capped.to(w.dtype)


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
