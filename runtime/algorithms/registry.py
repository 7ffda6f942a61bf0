"""The runtime side of the interface catalog (`rlhfc_runtime.contract.interfaces`): for each name a
small object that says what the model must compute and how to turn that into the
call's outputs or loss.

The worker's protocol for a call `model.KIND(args…) using NAME`:
1. `batch = bind(NAME, args)`: positional inputs to one flat dict (see `batch`).
2. train only, once on the whole batch: `batch = iface.prepare(batch, hyper)`
   (advantages, returns; group baselines need whole groups); then per mini-batch (of
   `mini_batches` per epoch, `ppo_epochs` epochs) `iface.weigh(mini_batch, hyper)` (the
   loss normalisation over the whole mini-batch).
3. per shard / micro-batch: run the model on `iface.model_inputs(batch)` and collect
   `outputs = {"logp": [N, T]}` for `head = lm` or `{"values": [N, T]}` for
   `head = value` (alignment as in `ops`), plus `{"entropy": [N, T]}` where the
   interface's `entropy` flag asks for it; then `iface.outputs(outputs, batch)` for
   inference, or `iface.loss(outputs, batch, hyper) -> (loss, metrics)` for train.
Losses and metrics are *contributions*: their sums over any row split of the batch
(micro-batches, data-parallel ranks) equal the full-batch values, so gradients are
summed, not averaged, across data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rlhfc_runtime.contract.interfaces import INTERFACES, NO_CORRECTION, TIS, Interface
from rlhfc_runtime.algorithms.advantages import (
    gae, group_normalised, kl_penalised_rewards, leave_one_out, returns_to_go,
)
from rlhfc_runtime.algorithms.batch import flatten_pairs
from rlhfc_runtime.algorithms.losses import (
    behaviour_weights, bradley_terry_loss, clipped_policy_loss, clipped_value_loss, dpo_loss,
)
from rlhfc_runtime.algorithms.ops import (
    aggregation_weights, kl_estimate, kl_k1, last_index, masked_sum, masked_whiten, sequence_score, state_values,
)
from rlhfc_runtime.algorithms.rules import RULE_FUNCTIONS

Batch = dict[str, torch.Tensor]
Hyper = Mapping[str, float | int | str]
Metrics = dict[str, torch.Tensor]
# The batch key of the trainer's own log-probs before a train call's first update (one
# no-grad forward, where `contract.interfaces.recomputes_old_logp`): the off-policy
# corrections' old policy, beside the rollout's `logp` (the behaviour policy's).
OLD_LOGP = "old_logp"


def hyper_value(hyper: Hyper, key: str):
    """A resolved setting of the call (`rlhfc_runtime.contract.interfaces`): the compiler
    gives every one the interface declares, so a missing key is a compiler bug."""
    return hyper[key]


def _token_weight(response_mask: torch.Tensor) -> torch.Tensor:
    """Per-token loss weights that make a shard's weighted sum its share of the
    full batch's token mean."""
    mask = response_mask.float()
    return mask / mask.sum().clamp(min=1)


def _row_weight(n_rows: int, like: torch.Tensor) -> torch.Tensor:
    """Per-row weights 1/B: sequence-level losses as contributions to the batch mean."""
    return torch.full((n_rows,), 1.0 / max(n_rows, 1), dtype=torch.float32, device=like.device)


@dataclass(frozen=True)
class _Implementation:
    """The runtime's implementation of a contract interface: its name, kind, inputs,
    outputs and head are the contract's (`contract.interfaces.INTERFACES`), declared once."""

    spec: Interface

    name = property(lambda self: self.spec.name)
    kind = property(lambda self: self.spec.kind)
    inputs = property(lambda self: self.spec.inputs)
    outputs = property(lambda self: self.spec.outputs)
    head = property(lambda self: self.spec.head)
    pairs = property(lambda self: "pairs" in self.spec.inputs)  # rows flattened to [2B, T]


@dataclass(frozen=True)
class GenerateInterface(_Implementation):
    """Sampling (or greedy decoding) from an LM; the generation engine implements it."""

    greedy: bool


@dataclass(frozen=True)
class _ModelInterface(_Implementation):
    """Shared part of inference and train interfaces: which rows the model must run on."""

    def model_inputs(self, batch: Batch) -> Batch:
        """`input_ids` and `attention_mask` [N, T] to run the model on."""
        rows = flatten_pairs(batch) if self.pairs else batch
        return {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]}


@dataclass(frozen=True)
class InferenceInterface(_ModelInterface):
    """A forward-only call whose results become data keys."""

    compute_fn: Callable[[Batch, Batch], tuple[torch.Tensor, ...]]

    def compute(self, model_outputs: Batch, batch: Batch) -> tuple[torch.Tensor, ...]:
        """The call's outputs, in the order of `outputs`."""
        return self.compute_fn(model_outputs, batch)


@dataclass(frozen=True)
class TrainInterface(_ModelInterface):
    """A loss: `prepare` once on the whole batch, `weigh` once per mini-batch (the loss
    normalisation over the whole mini-batch), then `loss` per shard of it."""

    prepare_fn: Callable[[Batch, Hyper], Batch]
    weight_fn: Callable[[Batch, Hyper], Batch]
    loss_fn: Callable[[Batch, Batch, Hyper], tuple[torch.Tensor, Metrics]]
    entropy: bool = False  # the loss reads the model's per-token entropy too

    def prepare(self, batch: Batch, hyper: Hyper) -> Batch:
        """The batch with the targets the loss needs (advantages, returns), on all rows.
        Per-prompt inputs (ReMax's greedy baseline: one row per group of samples) are
        consumed here and left out, so every key has the call's rows."""
        out = {**batch, **self.prepare_fn(batch, hyper)}
        rows = max(v.shape[0] for v in out.values())
        return {k: v for k, v in out.items() if v.shape[0] == rows}

    def weigh(self, batch: Batch, hyper: Hyper) -> Batch:
        """A whole (mini-)batch with its loss weights, so shards' losses add up to its loss."""
        return {**batch, **self.weight_fn(batch, hyper)}

    def loss(self, model_outputs: Batch, batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, Metrics]:
        """(loss contribution, metric contributions) of this shard of a weighed batch."""
        loss, metrics = self.loss_fn(model_outputs, batch, hyper)
        return loss, {k: v.detach() for k, v in metrics.items()}


def rollout_kl(batch: Batch) -> float:
    """The batch's mean per-sequence KL of the rollout policy to the reference (summed k1
    over the response): what adaptive KL steers."""
    mask = batch["response_mask"].float()
    return float(masked_sum(kl_k1(batch["logp"], batch["ref_logp"]), mask, dim=-1).mean())


# --- inference -------------------------------------------------------------------

def _response_logprobs(model_outputs: Batch, batch: Batch) -> tuple[torch.Tensor, ...]:
    """Per-token log-probs, zero outside the response (the form `generate` returns)."""
    return (model_outputs["logp"] * batch["response_mask"],)


def _filled_values(model_outputs: Batch, batch: Batch) -> tuple[torch.Tensor, ...]:
    """Per-token values; positions after the last real token repeat its value, so the
    last column is the sequence's score whoever reads it (`ops.sequence_score`)."""
    values = model_outputs["values"].float()
    last = last_index(batch["attention_mask"]).unsqueeze(-1)
    final = values.gather(-1, last)
    positions = torch.arange(values.shape[-1], device=values.device)
    return (torch.where(positions > last, final, values),)


def _pair_response_logprobs(model_outputs: Batch, batch: Batch) -> torch.Tensor:
    """Summed response log-probs per pair member, [B, 2]."""
    mask = flatten_pairs(batch)["response_mask"]
    return masked_sum(model_outputs["logp"], mask, dim=-1).reshape(-1, 2)


def _pair_logprobs(model_outputs: Batch, batch: Batch) -> tuple[torch.Tensor, ...]:
    return (_pair_response_logprobs(model_outputs, batch),)


# --- policy-gradient actors ------------------------------------------------------

def _broadcast(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence advantage on every response token."""
    return per_sequence.unsqueeze(-1) * response_mask.float()


def _ppo_advantages(batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, old state values) by GAE on KL-penalised rewards; the
    actor and the critic both call this, so they train on the same targets."""
    mask = batch["response_mask"].float()
    kl_coef = float(hyper_value(hyper, "kl_coef")) if hyper_value(hyper, "kl_mode") == "reward" else 0.0
    score = sequence_score(batch["score"]).float()
    rewards = kl_penalised_rewards(score, batch["logp"], batch["ref_logp"], mask, kl_coef,
                                   str(hyper_value(hyper, "kl_estimator")))
    old_values = state_values(batch["values"].float()) * mask
    advantages, returns = gae(rewards, old_values, mask, float(hyper_value(hyper, "gamma")),
                              float(hyper_value(hyper, "lam")))
    return advantages, returns, old_values


def _ppo_actor_prepare(batch: Batch, hyper: Hyper) -> Batch:
    advantages, _, _ = _ppo_advantages(batch, hyper)
    if int(hyper_value(hyper, "adv_norm")):
        advantages = masked_whiten(advantages, batch["response_mask"].float())
    return {"advantages": advantages}


def _grpo_prepare(batch: Batch, hyper: Hyper) -> Batch:
    score = sequence_score(batch["score"]).float()
    advantages = group_normalised(score, int(hyper_value(hyper, "group_size")),
                                  scale=str(hyper_value(hyper, "scale_rewards")))
    return {"advantages": _broadcast(advantages, batch["response_mask"])}


def _rloo_prepare(batch: Batch, hyper: Hyper) -> Batch:
    mask = batch["response_mask"].float()
    kl = masked_sum(kl_estimate(str(hyper_value(hyper, "kl_estimator")), batch["logp"], batch["ref_logp"]),
                    mask, dim=-1)
    reward = sequence_score(batch["score"]).float() - float(hyper_value(hyper, "kl_coef")) * kl
    advantages = leave_one_out(reward, int(hyper_value(hyper, "group_size")))
    return {"advantages": _broadcast(advantages, mask)}


def _remax_prepare(batch: Batch, hyper: Hyper) -> Batch:
    mask = batch["response_mask"].float()
    score = sequence_score(batch["score"]).float()
    rewards = kl_penalised_rewards(score, batch["logp"], batch["ref_logp"], mask,
                                   float(hyper_value(hyper, "kl_coef")), str(hyper_value(hyper, "kl_estimator")))
    baseline = sequence_score(batch["base_score"]).float()
    baseline = baseline.repeat_interleave(score.shape[0] // baseline.shape[0])  # one greedy row per prompt
    advantages = (returns_to_go(rewards, mask) - baseline.unsqueeze(-1)) * mask
    return {"advantages": advantages}


def _policy_weights(batch: Batch, hyper: Hyper) -> Batch:
    return {"token_weight": aggregation_weights(str(hyper_value(hyper, "loss_agg")), batch["response_mask"],
                                                int(hyper_value(hyper, "max_new_tokens")))}


def _token_mean_weights(batch: Batch, hyper: Hyper) -> Batch:
    return {"token_weight": _token_weight(batch["response_mask"])}


def _policy_loss(kl_loss_coef: Callable[[Hyper], float]):
    """A clipped policy-gradient loss on prepared advantages (clip-higher, dual-clip; with
    an `off_policy` correction its ratio is to the trainer's pre-update policy, `OLD_LOGP`,
    and each token weighted by `behaviour_weights`), minus entropy_coef times the entropy,
    plus a KL-to-reference term (the chosen estimator) weighted by `kl_loss_coef(hyper)`
    (0 where the KL sits in the reward)."""

    def loss_fn(model_outputs: Batch, batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, Metrics]:
        logp, weight = model_outputs["logp"], batch["token_weight"]
        correction = str(hyper_value(hyper, "off_policy"))
        old = batch["logp"] if correction == NO_CORRECTION else batch[OLD_LOGP]
        per_token, clipped = clipped_policy_loss(
            logp, old, batch["advantages"], float(hyper_value(hyper, "clip_low")),
            float(hyper_value(hyper, "clip_high")), float(hyper_value(hyper, "dual_clip")))
        metrics: Metrics = {}
        if correction != NO_CORRECTION:
            truncate = float(hyper_value(hyper, "tis_cap")) if correction == TIS else None
            is_weight, w, capped = behaviour_weights(old, batch["logp"], truncate,
                                                     float(hyper_value(hyper, "ratio_cap")))
            per_token = per_token * is_weight
            metrics = {"is_weight": (w * weight).sum(), "is_capped_frac": (capped * weight).sum()}
        policy_loss = (per_token * weight).sum()
        kl = (kl_estimate(str(hyper_value(hyper, "kl_estimator")), logp, batch["ref_logp"]) * weight).sum()
        entropy = (model_outputs["entropy"] * weight).sum()
        metrics |= {"policy_loss": policy_loss, "clip_frac": (clipped * weight).sum(),
                    "approx_kl": ((old - logp) * weight).sum(), "ref_kl": kl, "entropy": entropy}
        loss = policy_loss + kl_loss_coef(hyper) * kl - float(hyper_value(hyper, "entropy_coef")) * entropy
        return loss, metrics

    return loss_fn


def _ppo_kl_loss_coef(hyper: Hyper) -> float:
    return float(hyper_value(hyper, "kl_coef")) if hyper_value(hyper, "kl_mode") == "loss" else 0.0


def _grpo_kl_loss_coef(hyper: Hyper) -> float:
    return float(hyper_value(hyper, "kl_coef"))


def _no_kl_loss(hyper: Hyper) -> float:
    return 0.0


# --- critic, reward model, DPO, SFT ----------------------------------------------

def _ppo_critic_prepare(batch: Batch, hyper: Hyper) -> Batch:
    _, returns, old_values = _ppo_advantages(batch, hyper)
    return {"returns": returns, "old_values": old_values}


def _ppo_critic_loss(model_outputs: Batch, batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, Metrics]:
    values = state_values(model_outputs["values"].float())
    per_token, clipped = clipped_value_loss(values, batch["old_values"], batch["returns"],
                                            float(hyper_value(hyper, "value_clip")))
    weight = batch["token_weight"]
    loss = (per_token * weight).sum()
    return loss, {"value_loss": loss, "value_clip_frac": (clipped * weight).sum()}


def _nothing(batch: Batch, hyper: Hyper) -> Batch:
    return {}


def _pair_weights(batch: Batch, hyper: Hyper) -> Batch:
    return {"pair_weight": _row_weight(batch["input_ids"].shape[0], batch["input_ids"])}


def _dpo_loss(model_outputs: Batch, batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, Metrics]:
    logp, ref = _pair_response_logprobs(model_outputs, batch), batch["ref_logp"]
    per_pair, margin = dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1],
                                float(hyper_value(hyper, "beta")))
    weight = batch["pair_weight"]
    loss = (per_pair * weight).sum()
    return loss, {"dpo_loss": loss, "reward_margin": (margin * weight).sum(),
                  "reward_accuracy": ((margin > 0).float() * weight).sum()}


def _pairwise_reward_loss(model_outputs: Batch, batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, Metrics]:
    rows = flatten_pairs(batch)
    (values,) = _filled_values(model_outputs, rows)
    scores = sequence_score(values).reshape(-1, 2)
    weight = batch["pair_weight"]
    loss = (bradley_terry_loss(scores[:, 0], scores[:, 1]) * weight).sum()
    return loss, {"reward_loss": loss,
                  "reward_accuracy": ((scores[:, 0] > scores[:, 1]).float() * weight).sum()}


def _sft_loss(model_outputs: Batch, batch: Batch, hyper: Hyper) -> tuple[torch.Tensor, Metrics]:
    loss = -(model_outputs["logp"] * batch["token_weight"]).sum()
    return loss, {"sft_loss": loss}


_I = INTERFACES

REGISTRY: dict[str, GenerateInterface | InferenceInterface | TrainInterface] = {
    i.name: i
    for i in (
        GenerateInterface(_I["generate"], greedy=False),
        GenerateInterface(_I["generate_greedy"], greedy=True),
        InferenceInterface(_I["logprobs"], _response_logprobs),
        InferenceInterface(_I["values"], _filled_values),
        InferenceInterface(_I["pair_logprobs"], _pair_logprobs),
        TrainInterface(_I["ppo_actor"], _ppo_actor_prepare, _policy_weights, _policy_loss(_ppo_kl_loss_coef), True),
        TrainInterface(_I["ppo_critic"], _ppo_critic_prepare, _token_mean_weights, _ppo_critic_loss),
        TrainInterface(_I["grpo_actor"], _grpo_prepare, _policy_weights, _policy_loss(_grpo_kl_loss_coef), True),
        TrainInterface(_I["rloo_actor"], _rloo_prepare, _policy_weights, _policy_loss(_no_kl_loss), True),
        TrainInterface(_I["remax_actor"], _remax_prepare, _policy_weights, _policy_loss(_no_kl_loss), True),
        TrainInterface(_I["dpo"], _nothing, _pair_weights, _dpo_loss),
        TrainInterface(_I["sft"], _nothing, _token_mean_weights, _sft_loss),
        TrainInterface(_I["pairwise_reward"], _nothing, _pair_weights, _pairwise_reward_loss),
    )
}


def bind(name: str, args: Sequence[torch.Tensor | Mapping[str, torch.Tensor]]) -> Batch:
    """The flat batch of a call's positional inputs: dict values (`seq`, `pairs`,
    `data`, `prompts`) are merged, tensors are named as the interface names them."""
    interface = REGISTRY[name]
    if len(args) != len(interface.inputs):
        raise TypeError(f"{name} takes {len(interface.inputs)} inputs "
                        f"({', '.join(interface.inputs)}), got {len(args)}")
    batch: Batch = {}
    for key, value in zip(interface.inputs, args):
        if isinstance(value, Mapping):
            batch.update(value)
        else:
            batch[key] = value
    return batch


def rule_scores(name: str, seq: Mapping[str, torch.Tensor], max_new_tokens: int, eos_id: int) -> torch.Tensor:
    """A rule reward on every row of a sequence batch: [B] float scores. The prompt is
    the real non-response tokens, the response the generated ones before `eos_id`."""
    rule = RULE_FUNCTIONS[name]
    scores = []
    for ids, real, response in zip(seq["input_ids"].tolist(), seq["attention_mask"].tolist(),
                                   seq["response_mask"].tolist()):
        prompt = [t for t, r, g in zip(ids, real, response) if r and not g]
        answer = [t for t, g in zip(ids, response) if g]
        if answer and answer[-1] == eos_id:
            answer = answer[:-1]
        scores.append(rule(prompt, answer, max_new_tokens))
    return torch.tensor(scores, dtype=torch.float32, device=seq["input_ids"].device)
