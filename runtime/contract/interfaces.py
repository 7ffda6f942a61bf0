"""The registered runtime interfaces a call may name with `using`: what they take,
what they produce, and every setting they read with its type, default and range.

A static table: the checker validates programs against it and resolves every setting
of every call (call option > run block > default) without importing the runtime's
torch code (no code runs at compile time); the op carries the resolved values and the
runtime reads them without defaults of its own. A test checks that the runtime
registers exactly these names with these arities.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc_runtime.contract.engines import ENGINES, OWN
from rlhfc_runtime.contract.kinds import CallKind, Head


@dataclass(frozen=True)
class Setting:
    """One setting a call reads: its type, default, bounds (inclusive) or choices, and why."""

    name: str
    type: type  # int, float or str
    default: int | float | str
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    fallback: str | None = None  # unset: takes this other setting's resolved value

    def problem(self, value) -> str | None:
        """Why `value` is not allowed here, or None when it is."""
        if self.type is str:
            if not isinstance(value, str):
                return f"must be a string, one of {', '.join(map(repr, self.choices))}"
            return None if value in self.choices else f"must be one of {', '.join(map(repr, self.choices))}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"must be {'an integer' if self.type is int else 'a number'}"
        if self.type is int and not isinstance(value, int):
            return "must be an integer"
        if abs(value) == float("inf"):
            return "must be finite"
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"must lie in [{low}, {high}]"
        return None


def _s(name, type_, default, doc, low=None, high=None, choices=(), fallback=None):
    return Setting(name, type_, default, doc, low, high, tuple(choices), fallback)


# Where a generate call's `logp` comes from on an engine other than the own loop
# (`rollout_logp`), and the setting the checker adds to a train call whose `logp` is
# such an engine's: the name of the generate call that made it, under which the train
# call logs `logprob_diff` (the engine's against its own pre-update log-probs).
TRAINER_LOGP, ENGINE_LOGP = "trainer", "engine"
ENGINE_LOGP_OF = "engine_logp_of"


def trainer_recomputes_rollout(settings) -> bool:
    """Whether a generate call with these resolved settings replaces its engine's
    log-probs with the trainer's forward over the sampled sequences (the planner prices
    it as `engine_recompute`, the runtime runs it)."""
    return settings.get("engine", OWN) != OWN and settings.get("rollout_logp", TRAINER_LOGP) == TRAINER_LOGP


# Settings of every sampling / greedy generate call (`max_new_tokens` has no default:
# the checker requires it).
GENERATE_SETTINGS: tuple[Setting, ...] = (
    _s("group_size", int, 1, "samples per prompt (consecutive rows); greedy generation draws one", 1),
    _s("temperature", float, 1.0, "sampling temperature", 1e-6),
    _s("top_p", float, 1.0, "nucleus sampling: keep the smallest set of tokens with this mass", 1e-6, 1.0),
    _s("top_k", int, 0, "keep the k most likely tokens (0: all)", 0),
    _s("engine", str, OWN, "the decoding engine: rlhfc's own loop, or vLLM fed the actor's weights before every "
       "call (`contract.engines`)", choices=tuple(ENGINES)),
    _s("rollout_logp", str, TRAINER_LOGP, "another engine's rollout `logp`: the trainer's recomputation (one "
       "forward in the generate call; verl's default) or the engine's raw log-probs as sampled (no forward: the "
       "behaviour policy of a train call with off_policy = \"tis\" or \"decoupled\")",
       choices=(TRAINER_LOGP, ENGINE_LOGP)),
)
# Compute precisions and the bytes of one value in each: the width of a frozen copy's
# weights, its KV cache and its reallocation traffic (the cost model prices the same).
PRECISION_BYTES: dict[str, int] = {"bf16": 2, "fp32": 4}


def default_precision(device: str | None) -> str:
    """fp32 on CPU clusters (no fast bf16 there), bf16 on accelerators."""
    return "fp32" if device in (None, "cpu") else "bf16"


# Settings of every call on a neural model (not rule rewards). `precision`'s default is
# `default_precision` of the cluster's device; this one is what `rlhfc interfaces` shows.
MODEL_SETTINGS: tuple[Setting, ...] = (
    _s("precision", str, "bf16", "compute precision: bf16 compute with fp32 master weights for training and "
       "bf16 weights for inference / generation copies, or fp32 throughout", choices=tuple(PRECISION_BYTES)),
    _s("packing", str, "packed", "sequences of a forward or train pass: concatenated without padding "
       "(attention kept inside each), or padded to the batch's width (the reference)", choices=("packed", "padded")),
    _s("response_len", int, 0, "expected tokens of a generated response: the planner prices time from the "
       "tokens calls really see (0: max_new_tokens; memory is always priced at the full budget)", 0),
)
# The policy interfaces' input that carries each sequence's reward: the key bound to it
# is the run's reward curve (`reward` in the metrics).
REWARD_INPUT = "score"
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Every train call: optimizer steps per call, gradient clipping, learning-rate schedule.
TRAIN_SETTINGS: tuple[Setting, ...] = (
    _s("ppo_epochs", int, 1, "passes over the call's batch; each shuffles it (seeded) into mini-batches", 1, 64),
    _s("mini_batches", int, 1, "optimizer steps per pass: the batch is cut into this many mini-batches", 1),
    _s("max_grad_norm", float, 0.0, "clip the global gradient norm (over tp, pp, dp) to this (0: off)", 0.0),
    _s("lr_schedule", str, "constant", "learning rate over the run's optimizer steps",
       choices=("constant", "linear", "cosine")),
    _s("warmup_steps", int, 0, "optimizer steps of linear warm-up from 0 before the schedule", 0),
)


def _kl(default_estimator: str) -> tuple[Setting, ...]:
    return (
        _s("kl_coef", float, 0.05, "weight of the KL to the reference (reward penalty, or loss term); "
           "the start value when kl_target is set", 0.0),
        _s("kl_estimator", str, default_estimator, "per-token KL estimator: k1 log(pi/ref), "
           "k2 (log(pi/ref))^2/2, k3 ref/pi - log(ref/pi) - 1 (clamped to [-10, 10])", choices=KL_ESTIMATORS),
        _s("kl_target", float, 0.0, "adaptive KL (Ziegler et al. 2019): steer kl_coef towards this "
           "per-sequence KL (0: fixed kl_coef)", 0.0),
        _s("kl_horizon", float, 10000.0, "adaptive KL horizon: kl_coef *= 1 + clip(KL/target - 1, "
           "-0.2, 0.2) * rows / horizon", 1.0),
    )


# Off-policy corrections of a clipped ratio (`off_policy`), for rollouts a policy behind
# (`max_staleness` >= 1) or sampled by another engine's numerics; see the README.
NO_CORRECTION, DECOUPLED, TIS = "none", "decoupled", "tis"
_OFF_POLICY = (
    _s("off_policy", str, NO_CORRECTION, "off-policy correction: none (the ratio's old log-probs are the "
       "rollout's), decoupled (AReaL: ratio to the trainer's pre-update policy, times its weight over the "
       "rollout's), tis (verl: the same weight truncated at tis_cap); the last two cost one forward",
       choices=(NO_CORRECTION, DECOUPLED, TIS)),
    _s("tis_cap", float, 2.0, "tis: the importance weight pi_old / pi_behav is truncated at this C "
       "(verl's tis_imp_ratio_cap)", 1.0),
    _s("ratio_cap", float, 0.0, "decoupled / tis: tokens whose weight pi_old / pi_behav exceeds this leave "
       "the loss (AReaL's behav_imp_weight_cap; 0: off, else > 1)", 0.0),
)


def recomputes_old_logp(settings) -> bool:
    """Whether a train call with these resolved settings first runs one no-grad forward
    over its batch for the old log-probs (the planner prices it, the runtime runs it)."""
    return settings.get("off_policy", NO_CORRECTION) != NO_CORRECTION


_POLICY = (
    _s("clip", float, 0.2, "policy ratio clip epsilon (sets clip_low and clip_high)", 0.0),
    _s("clip_low", float, 0.2, "ratio clipped below at 1 - clip_low (default: clip)", 0.0, 1.0, fallback="clip"),
    _s("clip_high", float, 0.2, "ratio clipped above at 1 + clip_high (DAPO clip-higher; default: clip)",
       0.0, fallback="clip"),
    _s("dual_clip", float, 0.0, "dual-clip PPO (Ye et al. 2020): bound the loss of negative advantages "
       "at -c * A (0: off; else > 1, e.g. 3)", 0.0),
    _s("entropy_coef", float, 0.0, "entropy bonus weight (the entropy is always logged)", 0.0),
    _s("loss_agg", str, "token-mean", "loss aggregation: over all tokens, per-sequence token means, "
       "per-sequence token sums, or sums / max_new_tokens (Dr.GRPO)", choices=LOSS_AGG),
    *_OFF_POLICY,
)
_PPO_ADV = (
    _s("kl_mode", str, "reward", "PPO: the KL as a per-token reward penalty, or as a loss term",
       choices=("reward", "loss")),
    _s("gamma", float, 1.0, "GAE discount", 0.0, 1.0),
    _s("lam", float, 0.95, "GAE lambda", 0.0, 1.0),
)
_GROUP = _s("group_size", int, 1, "samples per prompt of the rollout (from the generate call)", 1)


@dataclass(frozen=True)
class Interface:
    """What a call using this interface consumes and produces, positionally, and the
    settings it reads besides its kind's (`GENERATE_SETTINGS` for generate calls)."""

    name: str
    kind: CallKind
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    head: Head | None  # the model head it requires, or None for any / rule models
    doc: str
    settings: tuple[Setting, ...] = ()

    def all_settings(self) -> tuple[Setting, ...]:
        kind = {CallKind.GENERATE: GENERATE_SETTINGS, CallKind.TRAIN: TRAIN_SETTINGS}.get(self.kind, ())
        return MODEL_SETTINGS + self.settings + kind

    def defaults(self) -> dict[str, int | float | str]:
        """Every setting at its default (what a program that sets none gets)."""
        return {s.name: s.default for s in self.all_settings()}


_G, _I, _T = CallKind.GENERATE, CallKind.INFERENCE, CallKind.TRAIN

INTERFACES: dict[str, Interface] = {
    i.name: i
    for i in (
        Interface("generate", _G, ("prompts",), ("seq", "logp"), Head.LM,
                  "sample responses (group_size per prompt); token log-probs of the sample"),
        Interface("generate_greedy", _G, ("prompts",), ("seq",), Head.LM,
                  "greedy responses, the ReMax baseline"),
        Interface("logprobs", _I, ("seq",), ("logp",), Head.LM,
                  "per-token log-probs of given sequences"),
        Interface("values", _I, ("seq",), ("values",), Head.VALUE,
                  "per-token scalar outputs: critic values, or a reward model's score"),
        Interface("pair_logprobs", _I, ("pairs",), ("logp",), Head.LM,
                  "summed response log-probs of chosen and rejected sequences"),
        Interface("ppo_actor", _T, ("seq", "logp", "ref_logp", "score", "values"), (), Head.LM,
                  "PPO clipped policy loss on GAE advantages with a KL penalty in the reward",
                  (*_kl("k1"), *_PPO_ADV, *_POLICY,
                   _s("adv_norm", int, 1, "whiten advantages over the batch (1) or not (0)", 0, 1))),
        Interface("ppo_critic", _T, ("seq", "logp", "ref_logp", "score", "values"), (), Head.VALUE,
                  "PPO clipped value loss against GAE returns",
                  (*_kl("k1"), *_PPO_ADV, _s("value_clip", float, 0.2, "critic value clip", 0.0))),
        Interface("grpo_actor", _T, ("seq", "logp", "ref_logp", "score"), (), Head.LM,
                  "GRPO: group-normalised advantages, clipped loss, KL to the reference",
                  (*_kl("k3"), *_POLICY, _GROUP,
                   _s("scale_rewards", str, "group", "divide advantages by the group's reward std, the "
                      "batch's, or not at all (Dr.GRPO)", choices=("group", "batch", "none")))),
        Interface("rloo_actor", _T, ("seq", "logp", "ref_logp", "score"), (), Head.LM,
                  "RLOO: leave-one-out baseline within each group", (*_kl("k1"), *_POLICY, _GROUP)),
        Interface("remax_actor", _T, ("seq", "logp", "ref_logp", "score", "base_score"), (), Head.LM,
                  "ReMax: REINFORCE with the greedy response's reward as baseline", (*_kl("k1"), *_POLICY)),
        Interface("dpo", _T, ("pairs", "ref_logp"), (), Head.LM,
                  "DPO loss on chosen/rejected pairs against reference log-probs",
                  (_s("beta", float, 0.1, "DPO temperature", 1e-9),)),
        Interface("sft", _T, ("data",), (), Head.LM, "next-token cross-entropy on responses"),
        Interface("pairwise_reward", _T, ("pairs",), (), Head.VALUE,
                  "Bradley-Terry loss: chosen scores above rejected"),
    )
}

# Rule-based rewards: `model r = rule("NAME")`, called as r.inference(seq) -> score.
RULES: dict[str, str] = {
    "pattern_reward": "fraction of response tokens that continue the bundled task's target pattern",
    "length_reward": "response length relative to max_new_tokens (a sanity-check reward)",
}


def default_interface(kind: CallKind, head: Head, is_rule: bool) -> str | None:
    """The interface a call uses when it names none; None where `using` is required."""
    if is_rule:
        return None if kind is not CallKind.INFERENCE else "rule"
    if kind is CallKind.GENERATE:
        return "generate"
    if kind is CallKind.INFERENCE:
        return "logprobs" if head is Head.LM else "values"
    return None
