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


def _s(name, type_, default, doc, low=None, high=None, choices=()):
    return Setting(name, type_, default, doc, low, high, tuple(choices))


# Settings of every sampling / greedy generate call (`max_new_tokens` has no default:
# the checker requires it).
GENERATE_SETTINGS: tuple[Setting, ...] = (
    _s("group_size", int, 1, "samples per prompt (consecutive rows); greedy generation draws one", 1),
    _s("temperature", float, 1.0, "sampling temperature", 1e-6),
    _s("top_p", float, 1.0, "nucleus sampling: keep the smallest set of tokens with this mass", 1e-6, 1.0),
    _s("top_k", int, 0, "keep the k most likely tokens (0: all)", 0),
)
# Settings of every call on a neural model (not rule rewards). `precision`'s default is
# the checker's: "fp32" on a `cpu` cluster, else this one.
MODEL_SETTINGS: tuple[Setting, ...] = (
    _s("precision", str, "bf16", "compute precision: bf16 compute with fp32 master weights for training and "
       "bf16 weights for inference / generation copies, or fp32 throughout", choices=("bf16", "fp32")),
)
_KL = _s("kl_coef", float, 0.05, "weight of the KL to the reference (reward penalty, or loss term)", 0.0)
_CLIP = _s("clip", float, 0.2, "policy ratio clip epsilon", 0.0)
_PPO_ADV = (
    _KL,
    _s("kl_mode", str, "reward", "PPO: the KL as a per-token reward penalty, or as a k3 loss term",
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
        return MODEL_SETTINGS + (GENERATE_SETTINGS if self.kind is CallKind.GENERATE else ()) + self.settings

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
                  (*_PPO_ADV, _CLIP, _s("adv_norm", int, 1, "whiten advantages over the batch (1) or not (0)", 0, 1))),
        Interface("ppo_critic", _T, ("seq", "logp", "ref_logp", "score", "values"), (), Head.VALUE,
                  "PPO clipped value loss against GAE returns",
                  (*_PPO_ADV, _s("value_clip", float, 0.2, "critic value clip", 0.0))),
        Interface("grpo_actor", _T, ("seq", "logp", "ref_logp", "score"), (), Head.LM,
                  "GRPO: group-normalised advantages, clipped loss, KL to the reference", (_KL, _CLIP, _GROUP)),
        Interface("rloo_actor", _T, ("seq", "logp", "ref_logp", "score"), (), Head.LM,
                  "RLOO: leave-one-out baseline within each group", (_KL, _CLIP, _GROUP)),
        Interface("remax_actor", _T, ("seq", "logp", "ref_logp", "score", "base_score"), (), Head.LM,
                  "ReMax: REINFORCE with the greedy response's reward as baseline", (_KL, _CLIP)),
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
