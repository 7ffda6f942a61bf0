"""Batched autoregressive generation with a KV cache, under any tp/pp layout.

Padding: prompts are LEFT-padded (real tokens end at the same column, so every new
token is appended at one column for the whole batch); responses are RIGHT-padded with
`pad_token_id` after EOS. Every rank of a data-parallel replica calls `generate` with
the same prompts; each replica generates its own prompts independently.

Log-probs are those of the chosen tokens under the model's own distribution (raw
logits: no temperature, top-k or top-p), i.e. what a later forward pass over the
sequence recomputes — the quantity PPO's ratio needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhfc_runtime.model import HeadOutput, ShardedLlama


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each token: greedy, or sampling with temperature / top-k / top-p.

    Sampling draws one uniform number per row of the *global* batch and token from a
    generator seeded with `seed`, and this call's rows are `first_row` onwards of
    `total_rows` (None: the local batch is the whole batch). So a row's tokens depend
    on the seed and the row, not on how the batch is split over data-parallel ranks:
    a plan changes the speed of a run, not its samples."""

    max_new_tokens: int = 16
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    first_row: int = 0
    total_rows: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0


@dataclass(frozen=True)
class Generation:
    """sequences [B, P+N] (left-padded prompt, then response); logprobs [B, N] of the
    response tokens (0 after EOS); attention_mask [B, P+N] real tokens; response_mask
    [B, P+N] generated tokens, EOS included; prompt_len P."""

    sequences: torch.Tensor
    logprobs: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int


def left_pad(prompts: list[list[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask) [B, max_len], padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def choose(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor) -> torch.Tensor:
    """Next tokens [B] from full-vocabulary logits [B, V]; sampling inverts each row's
    cumulative distribution at its `uniform` [B] number in [0, 1)."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= params.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    cdf = logits.softmax(-1).cumsum(-1)
    threshold = uniform.to(cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    return torch.searchsorted(cdf, threshold, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


@torch.no_grad()
def generate(model: ShardedLlama, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             params: SamplingParams) -> Generation:
    """Continue left-padded prompts; collective over the replica's tp*pp ranks.

    The last stage gathers the logits of the newest position over tp, chooses tokens
    (identically on its tp ranks), and broadcasts tokens and log-probs to the replica,
    so the first stage can embed them and every rank sees the same EOS and stops
    together."""
    g = model.groups
    device = model.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch, plen = prompt_ids.shape
    total = plen + params.max_new_tokens
    cache = model.new_cache(batch, total)
    key_valid = torch.cat([prompt_mask.bool(), torch.ones(batch, params.max_new_tokens, dtype=torch.bool, device=device)], 1)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_pos = prompt_mask.long().sum(-1)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logps = [], []
    step_ids, start = prompt_ids, 0
    for step in range(params.max_new_tokens):
        _, hidden = model.pipeline_forward(step_ids, positions, key_valid[:, :start + step_ids.shape[1]], cache, start)
        packed = torch.zeros(batch, 2, device=device, dtype=torch.float64)
        if model.last:
            logits = HeadOutput(model, hidden[:, -1:]).logits()[:, 0].float()
            drawn = torch.rand(params.total_rows or batch, generator=gen, device=device)
            tok = choose(logits, params, drawn[params.first_row:params.first_row + batch])
            lp = logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            packed = torch.stack([tok.double(), lp.double()], 1)
        if len(g.mp_ranks) > 1:
            dist.broadcast(packed, src=g.layout.rank_at(g.layout.pp - 1, g.dp_rank, 0), group=g.mp)
        tok, lp = packed[:, 0].long(), packed[:, 1].float()
        tok = tok.masked_fill(done, params.pad_token_id)
        lp = lp.masked_fill(done, 0.0)
        tokens.append(tok)
        logps.append(lp)
        alive = ~done
        if params.eos_token_id is not None:
            done = done | (tok == params.eos_token_id)
        key_valid[:, plen + step] = alive
        start += step_ids.shape[1]
        step_ids, positions = tok[:, None], (next_pos + step)[:, None]
        if bool(done.all()):
            break
    new = torch.stack(tokens, 1)
    n = new.shape[1]
    response = key_valid[:, plen:plen + n].long()
    sequences = torch.cat([prompt_ids, new], 1)
    attention_mask = torch.cat([prompt_mask.long(), response], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.long), response], 1)
    return Generation(sequences, torch.stack(logps, 1), attention_mask, response_mask, plen)
