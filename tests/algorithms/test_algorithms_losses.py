"""Each loss and advantage against a plain loop-per-sequence reference written here."""

import math

import torch

from rlhfc_runtime.algorithms.advantages import gae, group_normalised, leave_one_out
from rlhfc_runtime.algorithms.batch import split_rows
from rlhfc_runtime.algorithms.ops import token_logprobs
from rlhfc_runtime.contract.interfaces import INTERFACES
from rlhfc_runtime.algorithms.registry import REGISTRY, bind

torch.manual_seed(0)
B, T = 4, 9



def settings(name: str, **overrides) -> dict:
    """An interface's settings as the compiler resolves them: the contract's defaults, overridden
    (clip_low / clip_high follow clip unless set; max_new_tokens is the padded response width)."""
    out = {**INTERFACES[name].defaults(), "max_new_tokens": T, **overrides}
    for side in ("clip_low", "clip_high"):
        if side in out and side not in overrides:
            out[side] = out["clip"]
    return out


def prepared(name: str, args, hyper) -> dict:
    """A whole batch as one train call's single mini-batch sees it: prepared, then weighed."""
    iface = REGISTRY[name]
    return iface.weigh(iface.prepare(bind(name, args), hyper), hyper)


def zero_entropy(logp):
    return {"logp": logp, "entropy": torch.zeros_like(logp)}

def _seq():
    """Left-padded prompts (lengths 3,2,3,1) and responses of lengths 4,6,2,5 + padding."""
    prompt_len, resp_len = [3, 2, 3, 1], [4, 6, 2, 5]
    ids = torch.randint(3, 30, (B, T))
    attn, resp = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        start = 3 - prompt_len[b]
        attn[b, start:3 + resp_len[b]] = 1
        resp[b, 3:3 + resp_len[b]] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def _ref_gae(rewards, values, gamma, lam):
    """Textbook GAE on one response (lists), terminal value 0."""
    n, adv, running = len(rewards), [0.0] * len(rewards), 0.0
    for t in reversed(range(n)):
        nxt = values[t + 1] if t + 1 < n else 0.0
        running = rewards[t] + gamma * nxt - values[t] + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_matches_per_sequence_loop():
    seq = _seq()
    mask = seq["response_mask"].float()
    rewards, values = torch.randn(B, T) * mask, torch.randn(B, T)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    for b in range(B):
        idx = mask[b].nonzero().flatten().tolist()
        ref_adv, ref_ret = _ref_gae(rewards[b, idx].tolist(), values[b, idx].tolist(), 0.9, 0.8)
        assert torch.allclose(adv[b, idx], torch.tensor(ref_adv), atol=1e-5)
        assert torch.allclose(ret[b, idx], torch.tensor(ref_ret), atol=1e-5)
        assert (adv[b][mask[b] == 0] == 0).all()


def test_group_baselines_by_hand():
    score = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])
    rloo = leave_one_out(score, 3)
    assert torch.allclose(rloo, torch.tensor([1 - 0.25, 0 - 0.75, 0.5 - 0.5, 0.5 - 3.0, 2 - 2.25, 4 - 1.25]))
    grpo = group_normalised(score, 2)
    std = math.sqrt(0.5)  # unbiased std of {1, 0}
    assert torch.allclose(grpo[:2], torch.tensor([0.5 / std, -0.5 / std]), atol=1e-4)
    assert torch.allclose(grpo[2:4], torch.zeros(2))


def _ppo_reference(seq, logp_new, old, ref, score, values, values_new, kl_coef, clip, vclip):
    """PPO actor/critic losses as straightforward loops: KL-penalised rewards, GAE
    (gamma 1, lam 0.95), batch-whitened advantages, token mean over the batch."""
    advs, rets, olds, toks = [], [], [], []
    for b in range(B):
        idx = seq["response_mask"][b].nonzero().flatten().tolist()
        rewards = [-kl_coef * (old[b, t] - ref[b, t]).item() for t in idx]
        rewards[-1] += score[b].item()
        v = [values[b, t - 1].item() for t in idx]
        a, r = _ref_gae(rewards, v, 1.0, 0.95)
        advs += a; rets += r; olds += v; toks += [(b, t) for t in idx]
    mean = sum(advs) / len(advs)
    std = math.sqrt(sum((a - mean) ** 2 for a in advs) / len(advs) + 1e-8)
    actor = critic = 0.0
    for (b, t), a, r, ov in zip(toks, advs, rets, olds):
        a = (a - mean) / std
        ratio = math.exp(logp_new[b, t].item() - old[b, t].item())
        actor += max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
        v = values_new[b, t - 1].item()
        vc = ov + min(max(v - ov, -vclip), vclip)
        critic += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
    return actor / len(toks), critic / len(toks)


def test_ppo_losses_match_reference_and_split_additively():
    seq = _seq()
    mask = seq["response_mask"].float()
    old, ref = -torch.rand(B, T) * 3 * mask, -torch.rand(B, T) * 3 * mask
    new = old + 0.3 * torch.randn(B, T) * mask
    score, values, values_new = torch.rand(B), torch.randn(B, T), torch.randn(B, T)
    overrides = {"kl_coef": 0.1, "clip": 0.2, "value_clip": 0.2}
    ref_actor, ref_critic = _ppo_reference(seq, new, old, ref, score, values, values_new, 0.1, 0.2, 0.2)
    for name, out, expected in (("ppo_actor", zero_entropy(new), ref_actor),
                                ("ppo_critic", {"values": values_new}, ref_critic)):
        iface = REGISTRY[name]
        hyper = settings(name, **{k: v for k, v in overrides.items() if k in INTERFACES[name].defaults()})
        batch = prepared(name, [seq, old, ref, score, values], hyper)
        loss, _ = iface.loss(out, batch, hyper)
        assert abs(loss.item() - expected) < 1e-4, name
        parts = split_rows({**batch, **{f"out_{k}": v for k, v in out.items()}}, 3)
        total = sum(iface.loss({k: p[f"out_{k}"] for k in out}, p, hyper)[0] for p in parts)
        assert abs(total.item() - expected) < 1e-4, name


def test_grpo_loss_with_k3_kl():
    seq = _seq()
    mask = seq["response_mask"].float()
    old, ref = -torch.rand(B, T) * mask, -torch.rand(B, T) * mask
    new = old + 0.1 * torch.randn(B, T) * mask
    score = torch.tensor([1.0, 0.0, 0.3, 0.9])
    hyper = settings("grpo_actor", kl_coef=0.05, clip=0.2, group_size=2)
    iface = REGISTRY["grpo_actor"]
    loss, _ = iface.loss(zero_entropy(new), prepared("grpo_actor", [seq, old, ref, score], hyper), hyper)
    total, n = 0.0, 0
    for b in range(B):
        g = score[(b // 2) * 2:(b // 2) * 2 + 2]
        a = (score[b] - g.mean()) / (g.std() + 1e-6)
        for t in mask[b].nonzero().flatten().tolist():
            ratio = math.exp(new[b, t] - old[b, t])
            pg = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            d = ref[b, t].item() - new[b, t].item()
            total += pg + 0.05 * (math.exp(d) - d - 1)
            n += 1
    assert abs(loss.item() - total / n) < 1e-4


def test_remax_and_rloo_advantages():
    seq = _seq()
    mask = seq["response_mask"].float()
    logp = -torch.rand(B, T) * mask
    ref = logp.clone()  # zero KL: advantages are pure baselines
    score, base = torch.tensor([1.0, 0.2, 0.6, 0.0]), torch.tensor([0.5, 0.5, 0.1, 0.3])
    remax = REGISTRY["remax_actor"].prepare(bind("remax_actor", [seq, logp, ref, score, base]), settings("remax_actor"))
    assert torch.allclose(remax["advantages"], ((score - base)[:, None] * mask))
    rloo = REGISTRY["rloo_actor"].prepare(bind("rloo_actor", [seq, logp, ref, score]), settings("rloo_actor", group_size=2))
    expected = torch.tensor([0.8, -0.8, 0.6, -0.6])[:, None] * mask
    assert torch.allclose(rloo["advantages"], expected)


def _pairs():
    seq = _seq()
    return {k: v.reshape(2, 2, T) for k, v in seq.items()}


def test_dpo_and_bradley_terry_per_pair_formulas():
    pairs = _pairs()
    flat_mask = pairs["response_mask"].reshape(-1, T).float()
    logp = -torch.rand(4, T)
    ref = torch.tensor([[-3.0, -4.0], [-2.0, -1.0]])
    iface = REGISTRY["dpo"]
    loss, metrics = iface.loss({"logp": logp}, prepared("dpo", [pairs, ref], {}), settings("dpo", beta=0.5))
    pi = (logp * flat_mask).sum(-1).reshape(2, 2)
    expected = sum(math.log(1 + math.exp(-0.5 * ((pi[i, 0] - ref[i, 0]) - (pi[i, 1] - ref[i, 1])).item()))
                   for i in range(2)) / 2
    assert abs(loss.item() - expected) < 1e-5
    values = torch.randn(4, T)
    iface = REGISTRY["pairwise_reward"]
    loss, _ = iface.loss({"values": values}, prepared("pairwise_reward", [pairs], {}), {})
    attn = pairs["attention_mask"].reshape(-1, T)
    last = [max(attn[r].nonzero().flatten().tolist()) for r in range(4)]
    s = [values[r, last[r]].item() for r in range(4)]
    expected = sum(math.log(1 + math.exp(-(s[2 * i] - s[2 * i + 1]))) for i in range(2)) / 2
    assert abs(loss.item() - expected) < 1e-5


def test_sft_loss_is_masked_next_token_cross_entropy():
    seq = _seq()
    logits = torch.randn(B, T, 32)
    logp = token_logprobs(logits, seq["input_ids"])
    iface = REGISTRY["sft"]
    loss, _ = iface.loss({"logp": logp}, prepared("sft", [seq], {}), {})
    labels = seq["input_ids"][:, 1:].masked_fill(seq["response_mask"][:, 1:] == 0, -100)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), labels.reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-5)
