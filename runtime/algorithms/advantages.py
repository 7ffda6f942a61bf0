"""Rewards to advantages: GAE for PPO, group baselines for GRPO and RLOO, ReMax returns.

All functions take whole batches (rows = sequences, columns = positions) with a
`response_mask` marking generated tokens; positions outside it come back as 0.
"""

from __future__ import annotations

import torch

from rlhfc_runtime.algorithms.ops import kl_estimate, last_index


def kl_penalised_rewards(
    score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
    response_mask: torch.Tensor, kl_coef: float, estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL estimate (k1 log(pi/ref) by default) on every
    response token, plus the sequence score on the last one. Keeps the policy near the
    reference."""
    rewards = -kl_coef * kl_estimate(estimator, logp, ref_logp) * response_mask
    last = last_index(response_mask).unsqueeze(-1)
    return rewards.scatter_add(-1, last, score.to(rewards.dtype).unsqueeze(-1))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
    gamma: float, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; `values` are state values
    aligned with the tokens, and the state after the last token is terminal (value 0).
    Returns (advantages, returns = advantages + values)."""
    mask = response_mask.to(rewards.dtype)
    values = values * mask
    next_mask = torch.nn.functional.pad(mask[:, 1:], (0, 1))
    deltas = rewards + gamma * torch.nn.functional.pad(values[:, 1:], (0, 1)) * next_mask - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def _groups(score: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scores as [prompts, group_size]: generation puts a prompt's samples in a row."""
    if group_size < 2 or score.numel() % group_size:
        raise ValueError(f"group baselines need group_size >= 2 dividing the batch "
                         f"({score.numel()} sequences, group_size={group_size})")
    return score.reshape(-1, group_size)


def group_normalised(score: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "group") -> torch.Tensor:
    """GRPO advantage of each sample: (score - group mean) / (std + eps), the std of its
    group (`scale = "group"`, Shao et al. 2024), of the whole batch ("batch", TRL's
    scale_rewards="batch"), or no division ("none", Dr.GRPO, Liu et al. 2025)."""
    groups = _groups(score, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (score.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return centred.reshape(-1)


def leave_one_out(score: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO advantage: score minus the mean score of the other samples of its group."""
    groups = _groups(score, group_size)
    baseline = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def returns_to_go(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted sum of the rewards from each response token to the end (ReMax)."""
    masked = rewards * response_mask
    return (masked.flip(-1).cumsum(-1).flip(-1)) * response_mask
