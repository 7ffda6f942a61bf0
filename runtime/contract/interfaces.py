"""The registered runtime interfaces a call may name with `using`, and what they take.

A static table: the checker validates programs against it without importing the
runtime (no code runs at compile time), and a test checks that the runtime registers
exactly these names with these arities.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfc_runtime.contract.kinds import CallKind, Head


@dataclass(frozen=True)
class Interface:
    """What a call using this interface consumes and produces, positionally."""

    name: str
    kind: CallKind
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    head: Head | None  # the model head it requires, or None for any / rule models
    doc: str


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
                  "PPO clipped policy loss on GAE advantages with a KL penalty in the reward"),
        Interface("ppo_critic", _T, ("seq", "logp", "ref_logp", "score", "values"), (), Head.VALUE,
                  "PPO clipped value loss against GAE returns"),
        Interface("grpo_actor", _T, ("seq", "logp", "ref_logp", "score"), (), Head.LM,
                  "GRPO: group-normalised advantages, clipped loss, KL to the reference"),
        Interface("rloo_actor", _T, ("seq", "logp", "ref_logp", "score"), (), Head.LM,
                  "RLOO: leave-one-out baseline within each group"),
        Interface("remax_actor", _T, ("seq", "logp", "ref_logp", "score", "base_score"), (), Head.LM,
                  "ReMax: REINFORCE with the greedy response's reward as baseline"),
        Interface("dpo", _T, ("pairs", "ref_logp"), (), Head.LM,
                  "DPO loss on chosen/rejected pairs against reference log-probs"),
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
