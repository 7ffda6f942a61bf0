"""The peers' loss and advantage options against plain references written from each
method's formula: clip-higher (DAPO), dual-clip PPO, loss aggregation modes (verl,
Dr.GRPO), the KL estimators (Schulman's k1/k2/k3) with their clamps, GRPO reward
scaling (group / batch / none), the entropy bonus, adaptive KL (Ziegler et al.) and the
learning-rate schedules; every aggregate stays a sum of per-shard contributions."""

import json
import math

import pytest
import torch
from test_algorithms_losses import B, T, _seq, prepared, settings

from rlhfc_runtime.algorithms.advantages import group_normalised
from rlhfc_runtime.algorithms.batch import split_rows
from rlhfc_runtime.algorithms.losses import clipped_policy_loss
from rlhfc_runtime.algorithms.ops import kl_estimate
from rlhfc_runtime.algorithms.registry import REGISTRY
from rlhfc_runtime.algorithms.schedules import AdaptiveKL, lr_factor
from rlhfc_runtime.calls import RuntimeModel


def _ref_token_loss(logp, old, adv, low, high, dual):
    """PPO-clip per token (Schulman et al. 2017, eq. 7) with asymmetric bounds (DAPO,
    Yu et al. 2025) and dual-clip (Ye et al. 2020: for A < 0, min(that, -c A))."""
    ratio = math.exp(min(max(logp - old, -20.0), 20.0))
    loss = max(-adv * ratio, -adv * min(max(ratio, 1 - low), 1 + high))
    if dual and adv < 0:
        loss = min(loss, -dual * adv)
    return loss


@pytest.mark.parametrize("low,high,dual", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 3.0)])
def test_clip_higher_and_dual_clip_per_token(low, high, dual):
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(64, generator=gen) * 3
    logp = old + torch.randn(64, generator=gen) * 1.5  # ratios far outside [0.7, 1.3]
    adv = torch.randn(64, generator=gen) * 2
    loss, clipped = clipped_policy_loss(logp, old, adv, low, high, dual)
    for i in range(64):
        want = _ref_token_loss(logp[i].item(), old[i].item(), adv[i].item(), low, high, dual)
        assert loss[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        unclipped = -adv[i].item() * math.exp(logp[i].item() - old[i].item())
        assert bool(clipped[i]) == (abs(want - unclipped) > 1e-6 * max(1.0, abs(unclipped)))
    if dual:
        assert (loss <= -dual * adv + 1e-6)[adv < 0].all() and bool((loss == -dual * adv)[adv < 0].any())


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="exceed 1"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(2), -torch.ones(2), 0.2, 0.2, 0.5)


def test_huge_log_ratio_stays_finite():
    """A log-ratio of 95 overflowed exp() to inf and the loss to NaN before the clamps."""
    seq = _seq()
    mask = seq["response_mask"].float()
    old = -torch.rand(B, T) * mask
    new = old + 95.0 * mask
    ref = new - 95.0 * mask
    hyper = settings("grpo_actor", group_size=2)
    batch = prepared("grpo_actor", [seq, old, ref, torch.tensor([1.0, 0.0, 0.5, 0.2])], hyper)
    loss, metrics = REGISTRY["grpo_actor"].loss({"logp": new, "entropy": torch.zeros(B, T)}, batch, hyper)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert metrics["ref_kl"].item() == pytest.approx(10.0)  # k3 clamped to [-10, 10]
    assert torch.isfinite(clipped_policy_loss(torch.tensor([95.0]), torch.tensor([0.0]), torch.tensor([-1.0]),
                                              0.2)[0]).all()


def test_kl_estimators_by_formula():
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0])
    ref = torch.tensor([-1.5, -1.0, -0.5, -1.0])
    for name, f in (("k1", lambda r: -r), ("k2", lambda r: 0.5 * r * r), ("k3", lambda r: math.exp(r) - r - 1)):
        got = kl_estimate(name, logp, ref)
        for i in range(3):
            r = ref[i].item() - logp[i].item()  # log(ref / pi)
            assert got[i].item() == pytest.approx(f(r), abs=1e-6), name
    assert kl_estimate("k3", logp, ref)[3].item() == 10.0  # exp(29) - 30 clamps to 10
    # k3 is unbiased: E_pi[ref/pi - 1 - log(ref/pi)] = KL(pi || ref) for samples from pi
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = float((p * (p / q).log()).sum())
    for name in ("k1", "k3"):
        expected = float((p * kl_estimate(name, p.log(), q.log())).sum())
        assert expected == pytest.approx(exact, abs=1e-6), name


def _ref_aggregate(mode, per_token, mask, horizon):
    """verl's agg_loss / Dr.GRPO written out per sequence."""
    rows = [[per_token[b, t].item() for t in range(T) if mask[b, t]] for b in range(B)]
    if mode == "token-mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / B
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / B
    return sum(sum(r) / horizon for r in rows) / B


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", ["grpo_actor", "rloo_actor", "ppo_actor"])
def test_loss_aggregation_matches_reference_and_splits(mode, name):
    """A policy loss whose ratio is 1 (on-policy) is -A per token; its aggregate is the
    reference's, and the sum over any row split equals the whole."""
    seq = _seq()
    mask = seq["response_mask"].float()
    old = -torch.rand(B, T) * mask
    ref = old.clone()  # no KL: the loss is the policy term only
    score = torch.tensor([1.0, 0.0, 0.3, 0.9])
    args = [seq, old, ref, score] + ([torch.randn(B, T)] if name == "ppo_actor" else [])
    hyper = settings(name, loss_agg=mode, group_size=2, max_new_tokens=7, kl_coef=0.0)
    iface = REGISTRY[name]
    batch = prepared(name, args, hyper)
    out = {"logp": old.clone(), "entropy": torch.zeros(B, T)}
    loss, _ = iface.loss(out, batch, hyper)
    assert loss.item() == pytest.approx(_ref_aggregate(mode, -batch["advantages"], mask, 7), abs=1e-5)
    parts = split_rows({**batch, "out_logp": out["logp"], "out_entropy": out["entropy"]}, 3)
    total = sum(iface.loss({"logp": p["out_logp"], "entropy": p["out_entropy"]}, p, hyper)[0] for p in parts)
    assert total.item() == pytest.approx(loss.item(), abs=1e-5)


def test_grpo_scale_rewards_group_batch_none():
    """GRPO (Shao et al. 2024): (r - mean_g) / std_g; TRL's batch scaling divides by the
    batch std; Dr.GRPO (Liu et al. 2025) does not divide."""
    score = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])
    groups = [score[i:i + 2].tolist() for i in range(0, 6, 2)]
    mean = [sum(g) / 2 for g in groups]
    std = [math.sqrt(sum((x - m) ** 2 for x in g)) for g, m in zip(groups, mean)]  # unbiased, n-1 = 1
    all_mean = sum(score.tolist()) / 6
    batch_std = math.sqrt(sum((x - all_mean) ** 2 for x in score.tolist()) / 5)
    for scale, div in (("group", lambda i: std[i // 2] + 1e-6), ("batch", lambda i: batch_std + 1e-6),
                       ("none", lambda i: 1.0)):
        got = group_normalised(score, 2, scale=scale)
        want = [(score[i].item() - mean[i // 2]) / div(i) for i in range(6)]
        assert got.tolist() == pytest.approx(want, abs=1e-5), scale


def test_entropy_bonus_and_kl_estimator_in_the_loss():
    """loss = policy term + kl_coef * mean KL estimate - entropy_coef * mean entropy."""
    seq = _seq()
    mask = seq["response_mask"].float()
    old, ref = -torch.rand(B, T) * mask, -torch.rand(B, T) * mask
    entropy = torch.rand(B, T)
    score = torch.tensor([1.0, 0.0, 0.3, 0.9])
    iface = REGISTRY["grpo_actor"]
    base = settings("grpo_actor", group_size=2, kl_coef=0.0)
    batch = prepared("grpo_actor", [seq, old, ref, score], base)
    out = {"logp": old.clone(), "entropy": entropy}
    policy = iface.loss(out, batch, base)[0].item()
    n = mask.sum().item()
    mean_entropy = (entropy * mask).sum().item() / n
    for est in ("k1", "k2", "k3"):
        hyper = {**base, "kl_coef": 0.3, "entropy_coef": 0.01, "kl_estimator": est}
        loss, metrics = iface.loss(out, batch, hyper)
        kl = (kl_estimate(est, old, ref) * mask).sum().item() / n
        assert loss.item() == pytest.approx(policy + 0.3 * kl - 0.01 * mean_entropy, abs=1e-5), est
        assert metrics["entropy"].item() == pytest.approx(mean_entropy, abs=1e-6)


def test_reward_penalty_uses_the_estimator():
    """RLOO's reward is score - kl_coef * sum_t KL_t with the chosen estimator."""
    seq = _seq()
    mask = seq["response_mask"].float()
    logp, ref = -torch.rand(B, T) * mask, -torch.rand(B, T) * mask
    score = torch.tensor([1.0, 0.2, 0.6, 0.0])
    for est in ("k1", "k2", "k3"):
        batch = prepared("rloo_actor", [seq, logp, ref, score], settings("rloo_actor", group_size=2, kl_coef=0.5,
                                                                          kl_estimator=est))
        r = [score[b].item() - 0.5 * (kl_estimate(est, logp[b], ref[b]) * mask[b]).sum().item() for b in range(B)]
        want = [r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]]  # leave-one-out, groups of 2
        assert batch["advantages"][:, 3].tolist() == pytest.approx(want, abs=1e-5), est


def test_adaptive_kl_follows_ziegler():
    """Ziegler et al. 2019: e = clip(KL/target - 1, +-0.2); beta *= 1 + e * n / horizon."""
    ctl, beta = AdaptiveKL(0.1, 6.0, 1000.0), 0.1
    for kl in (12.0, 6.6, 3.0, 5.4, 0.0):
        ctl.update(kl, 64)
        beta *= 1 + max(-0.2, min(0.2, kl / 6.0 - 1)) * 64 / 1000
        assert ctl.coef == pytest.approx(beta, rel=1e-12)
    fixed = AdaptiveKL(0.1, 0.0, 1000.0)
    fixed.update(50.0, 64)
    assert fixed.coef == 0.1
    # the coefficient is checkpointed with the model it steers (plain numbers)
    class Shards:
        def shards(self):
            return {}

        def load_shards(self, shards):
            pass

    saved = RuntimeModel(Shards(), None, AdaptiveKL(0.2, 1.0, 10.0))
    saved.adaptive_kl.update(2.0, 5)
    restored = AdaptiveKL(0.0, 0.0, 1.0)  # its state as plain numbers, as JSON would hold it
    restored.load_state_dict(json.loads(json.dumps(saved.adaptive_kl.state_dict())))
    assert restored.state_dict() == {"coef": pytest.approx(0.2 * 1.1), "target": 1.0, "horizon": 10.0}


def test_lr_schedules_by_formula():
    total, warm = 20, 4
    for u in range(total):
        assert lr_factor("constant", u, total, 0) == 1.0
        if u < warm:
            assert lr_factor("cosine", u, total, warm) == pytest.approx((u + 1) / (warm + 1))
            continue
        p = (u - warm) / (total - warm)
        assert lr_factor("linear", u, total, warm) == pytest.approx(1 - p)
        assert lr_factor("cosine", u, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)))
