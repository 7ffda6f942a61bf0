"""Single-process PPO on the bundled tiny task: evidence that the task is learnable
from a random tiny LLaMA with the registry's losses (the default main job's setup).

    python bench/tiny_task_ppo.py [--steps 80] [--batch 32] [--max-new-tokens 12]

Plain transformers models on one CPU process, no rlhfc compiler: the actor and a
value-head critic (copies of one random init), a frozen reference, and the
`pattern_reward` rule, wired through `rlhfc_runtime.algorithms.registry` exactly as
the generated programs do (bind → prepare → loss). Prints the mean reward per step.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

from rlhfc_runtime.contract.interfaces import INTERFACES
from rlhfc_runtime.algorithms.batch import build_sequences
from rlhfc_runtime.algorithms.ops import token_logprobs
from rlhfc_runtime.algorithms.registry import REGISTRY, bind, rule_scores
from rlhfc_runtime.data import tiny
from rlhfc_runtime.data.loaders import JsonlLoader
from rlhfc_runtime.data.tokenizer import load_tokenizer

TINY_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny"


def tiny_config() -> LlamaConfig:
    """The default main job's inline shape: layers 2, hidden 64, heads 4, kv 2."""
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=tiny.MODEL_VOCAB,
                       max_position_embeddings=64, pad_token_id=tiny.PAD_ID, bos_token_id=tiny.BOS_ID,
                       eos_token_id=tiny.EOS_ID, num_labels=1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def forward_logp(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `ids` (registry alignment)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    return token_logprobs(logits, ids)


def forward_values(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position value-head outputs [B, T]."""
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[..., 0].float()


@torch.no_grad()
def sample(model, prompts: dict, max_new_tokens: int, generator: torch.Generator) -> dict:
    """Temperature-1 sampling without a KV cache (sequences are a few dozen tokens)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1]
        token = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
        new.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return build_sequences(prompts["input_ids"], prompts["attention_mask"], torch.cat(new, 1),
                           tiny.EOS_ID, tiny.PAD_ID)


def train_step(model, optimizer, name: str, args: list, hyper: dict) -> dict:
    """One registry train call: bind, prepare and weigh the whole batch (one mini-batch),
    loss, one Adam step."""
    interface = REGISTRY[name]
    defaults = INTERFACES[name].defaults()
    hyper = {**defaults, "max_new_tokens": args[0]["input_ids"].shape[1],
             **{k: v for k, v in hyper.items() if k in defaults}}
    hyper.update(clip_low=hyper.get("clip", 0.2), clip_high=hyper.get("clip", 0.2))
    batch = interface.weigh(interface.prepare(bind(name, args), hyper), hyper)
    inputs = interface.model_inputs(batch)
    if interface.head.value == "lm":
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=_positions(inputs["attention_mask"])).logits
        probs = torch.log_softmax(logits[:, :-1].float(), -1)
        entropy = torch.nn.functional.pad(-(probs.exp() * probs).sum(-1), (1, 0))
        outputs = {"logp": token_logprobs(logits, inputs["input_ids"]), "entropy": entropy}
    else:
        outputs = {"values": forward_values(model, inputs["input_ids"], inputs["attention_mask"])}
    loss, metrics = interface.loss(outputs, batch, hyper)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {k: float(v) for k, v in metrics.items()}


def run(steps: int, batch_size: int, max_new_tokens: int, seed: int = 0, lr: float = 2e-3,
        kl_coef: float = 0.0, log=print) -> list[float]:
    """PPO on the tiny task; returns the mean `pattern_reward` of each step's samples."""
    torch.manual_seed(seed)
    actor = LlamaForCausalLM(tiny_config())
    critic = LlamaForTokenClassification(tiny_config())
    critic.model.load_state_dict(actor.model.state_dict())
    ref = copy.deepcopy(actor).eval()
    actor_opt = torch.optim.Adam(actor.parameters(), lr=lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=lr)
    loader = JsonlLoader(TINY_DIR / "prompts.jsonl", load_tokenizer(TINY_DIR), {"prompt": "prompt"},
                         max_len=16, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    hyper = {"kl_coef": kl_coef, "max_new_tokens": max_new_tokens}
    rewards = []
    for step in range(steps):
        t0 = time.perf_counter()
        seq = sample(actor, loader.next_batch(batch_size), max_new_tokens, generator)
        score = rule_scores("pattern_reward", seq, max_new_tokens, tiny.EOS_ID)
        with torch.no_grad():
            ids, mask = seq["input_ids"], seq["attention_mask"]
            logp = forward_logp(actor, ids, mask) * seq["response_mask"]
            ref_logp = forward_logp(ref, ids, mask) * seq["response_mask"]
            values = REGISTRY["values"].compute({"values": forward_values(critic, ids, mask)}, seq)[0]
        args = [seq, logp, ref_logp, score, values]
        actor_metrics = train_step(actor, actor_opt, "ppo_actor", args, hyper)
        critic_metrics = train_step(critic, critic_opt, "ppo_critic", args, hyper)
        rewards.append(float(score.mean()))
        log(json.dumps({"step": step, "reward": round(rewards[-1], 4), "seconds": round(time.perf_counter() - t0, 3),
                        **{k: round(v, 4) for k, v in {**actor_metrics, **critic_metrics}.items()}}))
    return rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-coef", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rewards = run(args.steps, args.batch, args.max_new_tokens, args.seed, args.lr, args.kl_coef)
    k = max(1, len(rewards) // 10)
    print(f"mean reward: first {k} steps {sum(rewards[:k]) / k:.3f}, last {k} steps {sum(rewards[-k:]) / k:.3f}")


if __name__ == "__main__":
    main()
