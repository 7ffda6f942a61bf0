"""Off-policy corrections (`off_policy`, `tis_cap`, `ratio_cap`) against references
written here from their papers' formulas, per token on hand-chosen values, and the
decoupled loss through the real train call on a tiny model."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhfc_runtime.algorithms.losses import behaviour_weights
from rlhfc_runtime.algorithms.registry import OLD_LOGP, REGISTRY
from rlhfc_runtime.contract.interfaces import ENGINE_LOGP_OF, INTERFACES

EPS, C, CAP = 0.2, 2.0, 5.0
# Per token: behaviour log-prob (the sampler's), old (the trainer's before the update),
# current, advantage. Token 0 is the prompt (masked out of the loss).
BEHAV = [0.0, -1.0, -2.0, -1.0, -0.5, -3.0, -3.0]
OLD = [0.0, -1.0, -1.0, -1.5, -0.3, -1.0, -1.0]
NOW = [0.0, -0.9, -1.0, -1.2, -0.8, -0.5, -1.1]
ADV = [0.0, 1.0, 1.0, -1.0, 2.0, 1.0, -1.0]
MASK = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
# w = old / behav: 1 (on-policy), e (above C, below CAP), e^-0.5, e^0.2, e^2 twice (above both)
W = [math.exp(o - b) for o, b in zip(OLD, BEHAV)]


def _row(values, grad=False):
    return torch.tensor([values], dtype=torch.float64, requires_grad=grad)


def _ppo_term(now, old, adv):
    """One token of the clipped surrogate to maximise, min(r A, clip(r, 1 - eps, 1 + eps) A),
    r = pi / pi_old (Schulman et al. 2017, eq. 7)."""
    r = math.exp(now - old)
    return min(r * adv, min(max(r, 1 - EPS), 1 + EPS) * adv)


def _reference(correction, ratio_cap=0.0):
    """Per-token losses from the papers' formulas, one token at a time in plain Python:
    decoupled PPO (Fu et al. 2025, AReaL eq. 5; Hilton et al. 2022): -(pi_prox / pi_behav)
    * min(r A, clip(r) A) with r = pi / pi_prox; TIS (Yao et al. 2025): the same with the
    weight min(pi_old / pi_behav, C); AReaL's behav_imp_weight_cap: weight 0 above it."""
    out = []
    for b, o, n, a, m in zip(BEHAV, OLD, NOW, ADV, MASK):
        w = math.exp(o - b)
        weight = min(w, C) if correction == "tis" else w
        if ratio_cap and w > ratio_cap:
            weight = 0.0
        out.append(-weight * _ppo_term(n, o, a) * m)
    return out


def _hyper(correction, ratio_cap=0.0):
    return {**INTERFACES["grpo_actor"].defaults(), "clip_low": EPS, "clip_high": EPS, "kl_coef": 0.0,
            "off_policy": correction, "tis_cap": C, "ratio_cap": ratio_cap}


def _registry_loss(correction, ratio_cap=0.0, old=OLD):
    """The grpo_actor loss of the one row, each response token weighted 1 (a sum), and
    its gradient per token."""
    now = _row(NOW, grad=True)
    batch = {"logp": _row(BEHAV), OLD_LOGP: _row(old), "advantages": _row(ADV), "token_weight": _row(MASK),
             "ref_logp": _row(NOW)}
    loss, metrics = REGISTRY["grpo_actor"].loss({"logp": now, "entropy": torch.zeros_like(now)}, batch,
                                                _hyper(correction, ratio_cap))
    loss.backward()
    return loss, metrics, now.grad[0]


@pytest.mark.parametrize("correction,ratio_cap", [("decoupled", 0.0), ("tis", 0.0), ("decoupled", CAP),
                                                  ("tis", CAP)])
def test_corrections_match_their_papers_per_token(correction, ratio_cap):
    reference = _reference(correction, ratio_cap)
    loss, metrics, grad = _registry_loss(correction, ratio_cap)
    assert float(loss.detach()) == pytest.approx(sum(reference), rel=1e-12)
    assert float(metrics["is_weight"]) == pytest.approx(sum(W[1:]), rel=1e-12)
    truncated = {"tis": [w > C for w in W], "decoupled": [False] * len(W)}[correction]
    dropped = [bool(ratio_cap) and w > ratio_cap for w in W]
    assert float(metrics["is_capped_frac"]) == sum(t or d for t, d in zip(truncated, dropped))
    # the gradient by autograd through the reference formula, token by token
    for t in range(1, len(NOW)):
        now = torch.tensor(NOW[t], dtype=torch.float64, requires_grad=True)
        w = math.exp(OLD[t] - BEHAV[t])
        weight = 0.0 if ratio_cap and w > ratio_cap else min(w, C) if correction == "tis" else w
        r = torch.exp(now - OLD[t])
        (-weight * torch.minimum(r * ADV[t], r.clamp(1 - EPS, 1 + EPS) * ADV[t])).backward()
        assert float(grad[t]) == pytest.approx(float(now.grad), rel=1e-12, abs=1e-15), t


def test_where_each_cap_binds_and_the_gradient_points():
    _, _, plain = _registry_loss("decoupled")
    _, _, tis = _registry_loss("tis")
    _, _, capped = _registry_loss("decoupled", CAP)
    # token 1: on-policy (w = 1), in the clip range, A > 0: every variant pushes pi up alike
    assert plain[1] < 0 and tis[1] == plain[1] == capped[1]
    # token 2: w = e, above C only: TIS scales its gradient by C / w, the cap keeps it
    assert plain[2] < 0 and float(tis[2] / plain[2]) == pytest.approx(C / math.e) and capped[2] == plain[2]
    # token 3: A < 0, ratio above 1 + eps on the unclipped side: pushes pi down, weight e^-0.5 < C
    assert plain[3] > 0 and tis[3] == plain[3] == capped[3]
    # token 5: ratio clipped (no gradient), w = e^2 above both caps
    assert plain[5] == tis[5] == capped[5] == 0
    # token 4: w = e^0.2, below every cap, A > 0 below 1 - eps unclipped: pushes pi up
    assert plain[4] < 0 and tis[4] == plain[4] == capped[4]
    # token 6: A < 0 inside the clip range pushes pi down, w = e^2: TIS scales, the cap drops it
    assert plain[6] > 0 and float(tis[6] / plain[6]) == pytest.approx(C / math.e ** 2) and capped[6] == 0
    # the dropped token leaves the loss itself, not only its gradient
    loss_capped, _, _ = _registry_loss("decoupled", CAP)
    assert float(loss_capped.detach()) == pytest.approx(sum(_reference("decoupled", CAP)))
    assert _reference("decoupled", CAP)[5] == 0 and _reference("decoupled")[5] != 0


def test_on_policy_rollout_makes_every_correction_the_plain_loss():
    """behaviour == old: every weight is exactly 1 and the ratio's denominator is the
    same, so decoupled and tis equal `none` (whose old log-probs are the rollout's)."""
    none, m_none, g_none = _registry_loss("none", old=BEHAV)
    for correction in ("decoupled", "tis"):
        loss, metrics, grad = _registry_loss(correction, old=BEHAV)
        assert float(loss.detach()) == float(none.detach()) and torch.equal(grad, g_none)
        assert float(metrics["is_weight"]) == sum(MASK) and float(metrics["is_capped_frac"]) == 0
        assert set(metrics) == set(m_none) | {"is_weight", "is_capped_frac"}


def test_behaviour_weights_are_detached_and_the_cap_must_exceed_one():
    old, behav = _row(OLD, grad=True), _row(BEHAV)
    weight, w, capped = behaviour_weights(old, behav, C, 0.0)
    assert not weight.requires_grad and not w.requires_grad
    assert_close(weight[0], torch.tensor([min(x, C) for x in W], dtype=torch.float64))
    assert capped[0].tolist() == [float(x > C) for x in W]
    with pytest.raises(ValueError, match="exceed 1"):
        behaviour_weights(old, behav, None, 1.0)
    huge, _, _ = behaviour_weights(_row([100.0]), _row([-100.0]), None, 0.0)  # log-ratio clamped at 20
    assert float(huge) == pytest.approx(math.exp(20.0))


SHAPE = {"vocab": 48, "hidden": 32, "intermediate": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "max_positions": 64, "tied_embeddings": False}


def _train_calls():
    """In a one-process world: the rollout's log-probs are the policy's own (behaviour ==
    current), then shifted by a seeded noise (a stale rollout); grpo_actor trained on them
    through `calls.run_call` with each correction, from the same initial weights."""
    from rlhfc_runtime import calls
    from rlhfc_runtime.contract.layout import Layout
    from rlhfc_runtime.dist import ensure_groups, rank_groups

    layout = Layout((0,), 1, 1, 1)
    ensure_groups([layout])
    groups = rank_groups(layout)
    from rlhfc_runtime.contract.program import ModelSpec
    from rlhfc_runtime.contract.shapes import ModelShape

    spec = ModelSpec("llama", shape=ModelShape(**SHAPE), trainable=True, optimizer={"name": "adam", "lr": 1e-3})
    gen = torch.Generator().manual_seed(5)
    rows, prompt, response = 4, 5, 6
    mask = torch.ones(rows, prompt + response, dtype=torch.long)
    seq = {"input_ids": torch.randint(3, SHAPE["vocab"], mask.shape, generator=gen), "attention_mask": mask,
           "response_mask": torch.cat([torch.zeros(rows, prompt, dtype=torch.long),
                                       torch.ones(rows, response, dtype=torch.long)], 1)}
    settings = {**INTERFACES["grpo_actor"].defaults(), "rows": rows, "n_mbs": 2, "token_budget": 0,
                "recompute": False, "precision": "fp32", "group_size": 2, "step": 0, "steps": 1, "seed": 0,
                "max_new_tokens": response, "kl_coef": 0.0}
    own, _ = calls.run_call("inference", "logprobs", calls.build_model(spec, layout), spec, {"seq": seq},
                            ("logp",), settings, groups)
    stale = own["logp"]["logp"] + 0.5 * torch.randn(mask.shape, generator=gen) * seq["response_mask"]
    score = torch.tensor([1.0, 0.0, 0.0, 1.0])
    out = {}
    for name, behaviour in (("own", own["logp"]["logp"]), ("stale", stale)):
        for correction in ("none", "decoupled", "tis"):
            batch = {"seq": seq, "logp": {"logp": behaviour}, "ref_logp": {"ref_logp": behaviour},
                     "score": {"score": score}}
            _, metrics = calls.run_call("train", "grpo_actor", calls.build_model(spec, layout), spec, batch, (),
                                        {**settings, "off_policy": correction}, groups)
            out[name, correction] = metrics
    # the stale log-probs as an engine's (`rollout_logp = "engine"`): the train call's
    # forward checks them against its own, written here as the mean over response tokens
    batch = {"seq": seq, "logp": {"logp": stale}, "ref_logp": {"ref_logp": stale}, "score": {"score": score}}
    engine_settings = {**settings, "off_policy": "tis", ENGINE_LOGP_OF: "gen"}
    _, out["engine"] = calls.run_call("train", "grpo_actor", calls.build_model(spec, layout), spec, batch, (),
                                      engine_settings, groups)
    response = seq["response_mask"].bool()
    out["diff"] = float((stale - own["logp"]["logp"])[response].abs().mean())
    out["keys"] = [calls.metric_key("a_tr", k, engine_settings) for k in ("logprob_diff", "loss")]
    return out


def test_decoupled_and_tis_through_the_train_call():
    from rlhfc_runtime.dist import spawn

    (out,) = spawn(_train_calls, 1)
    none = out["own", "none"]
    assert "is_weight" not in none  # `none` logs what it always did
    for correction in ("decoupled", "tis"):
        on_policy = out["own", correction]
        assert on_policy["loss"] == pytest.approx(none["loss"], rel=1e-6, abs=1e-9)
        assert on_policy["policy_loss"] == pytest.approx(none["policy_loss"], rel=1e-6, abs=1e-9)
        assert on_policy["is_weight"] == pytest.approx(1.0, abs=1e-6) and on_policy["is_capped_frac"] == 0
        stale = out["stale", correction]
        assert stale["is_weight"] != pytest.approx(1.0, abs=1e-3)
        assert stale["loss"] != pytest.approx(out["stale", "none"]["loss"], rel=1e-4)
    assert out["stale", "tis"]["is_capped_frac"] > 0 and out["stale", "decoupled"]["is_capped_frac"] == 0
    # the engine's log-probs: the same TIS loss, and their distance to the trainer's logged
    engine = out.pop("engine")
    assert engine.pop("logprob_diff") == pytest.approx(out["diff"], rel=1e-6) and out["diff"] > 0.1
    assert engine == out["stale", "tis"]
    assert out["keys"] == ["gen/logprob_diff", "a_tr/loss"]  # logged under the generate call
    assert "logprob_diff" not in out["stale", "tis"]
