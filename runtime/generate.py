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

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rlhfc_runtime.model import DTYPES, ShardedDecoder

# Steps between checks whether every row has ended (a host sync on CUDA): at most this
# many wasted steps per batch; the result is the same as checking after every token.
EOS_CHECK_EVERY = 8


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
    # the first index whose cumulative mass exceeds the threshold (searchsorted, right=True)
    return (cdf <= threshold).sum(-1).clamp(max=cdf.shape[-1] - 1)


@torch.no_grad()
def generate(model: ShardedDecoder, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
             params: SamplingParams, precision: str | None = None, n_micro: int = 1) -> Generation:
    """Continue left-padded prompts; collective over the replica's tp*pp ranks.

    The batch runs as `n_micro` consecutive micro-batches (each with its own KV cache:
    the memory the plan priced), in `precision` ("bf16" / "fp32"; the weights' dtype
    by default). The last stage gathers the logits of the newest position over tp,
    chooses tokens (identically on its tp ranks), and broadcasts tokens and log-probs
    to the replica, so the first stage can embed them and every rank sees the same EOS
    and stops together."""
    device = model.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    parts = [(lo, ids, mask) for lo, ids, mask in zip(
        torch.arange(prompt_ids.shape[0]).tensor_split(n_micro), prompt_ids.tensor_split(n_micro),
        prompt_mask.tensor_split(n_micro)) if ids.shape[0]]
    dtype = DTYPES[precision] if precision else model.dtype
    with model.compute(precision) if precision else nullcontext():
        outs = [_generate(model, ids, mask, params, int(rows[0]), dtype) for rows, ids, mask in parts]
    if len(outs) == 1:
        return outs[0]
    n = max(o.logprobs.shape[1] for o in outs)
    pad = lambda t, width, value=0: F.pad(t, (0, width - t.shape[1]), value=value)  # noqa: E731
    plen = outs[0].prompt_len
    return Generation(
        torch.cat([pad(o.sequences, plen + n, params.pad_token_id) for o in outs]),
        torch.cat([pad(o.logprobs, n) for o in outs]),
        torch.cat([pad(o.attention_mask, plen + n) for o in outs]),
        torch.cat([pad(o.response_mask, plen + n) for o in outs]),
        plen,
    )


def _generate(model: ShardedDecoder, prompt_ids, prompt_mask, params: SamplingParams, offset: int, dtype) -> Generation:
    """One micro-batch: rows `offset`… of this call's local batch. Every
    `EOS_CHECK_EVERY` steps the rows that ended leave the batch (their KV cache too), so
    a finished row stops costing compute; each row keeps its own random stream (its
    global index), so the tokens do not depend on which rows are still running."""
    g = model.groups
    device = model.device
    batch, plen = prompt_ids.shape
    new = params.max_new_tokens
    cache = model.new_cache(batch, plen + new, dtype)
    key_valid = torch.cat([prompt_mask.bool(), torch.ones(batch, new, dtype=torch.bool, device=device)], 1)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_pos = prompt_mask.long().sum(-1)
    # draws come from a CPU generator: the same samples on every device type
    gen = torch.Generator().manual_seed(params.seed)
    first = params.first_row + offset
    live = torch.arange(batch, device=device)  # the micro-batch rows still generating
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = torch.full((batch, new), params.pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(batch, new, device=device)
    response = torch.zeros(batch, new, dtype=torch.long, device=device)
    step_ids, start, steps = prompt_ids, 0, 0
    for step in range(new):
        _, hidden = model.pipeline_forward(step_ids, positions, key_valid[:, :start + step_ids.shape[1]], cache, start)
        packed = torch.zeros(live.shape[0], 2, device=device, dtype=torch.float64)
        if model.last:
            logits = model.head_output(hidden[:, -1:]).logits()[:, 0].float()
            drawn = None
            if not params.greedy:
                drawn = torch.rand(params.total_rows or (first + batch), generator=gen)[first:first + batch]
                drawn = drawn.to(device)[live]
            tok = choose(logits, params, drawn)
            lp = logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)
            packed = torch.stack([tok.double(), lp.double()], 1)
        if len(g.mp_ranks) > 1:
            dist.broadcast(packed, src=g.layout.rank_at(g.layout.pp - 1, g.dp_rank, 0), group=g.mp)
        tok = packed[:, 0].long().masked_fill(done, params.pad_token_id)
        lp = packed[:, 1].float().masked_fill(done, 0.0)
        alive = done.logical_not()
        tokens[live, step], logps[live, step], response[live, step] = tok, lp, alive.long()
        if params.eos_token_id is not None:
            done = done | (tok == params.eos_token_id)
        key_valid[:, plen + step] = alive
        start += step_ids.shape[1]
        step_ids, positions = tok[:, None], (next_pos + step)[:, None]
        steps = step + 1
        if (step + 1) % EOS_CHECK_EVERY == 0 and bool(done.any()):
            if bool(done.all()):
                break
            keep = done.logical_not().nonzero().flatten()
            live, done, key_valid, step_ids, positions, next_pos = (
                t[keep] for t in (live, done, key_valid, step_ids, positions, next_pos))
            cache.keep_rows(keep)
    # drop the steps after every row ended (at most EOS_CHECK_EVERY - 1)
    n = max(int((response[:, :steps].any(0).long() * torch.arange(1, steps + 1, device=device)).max()), 1)
    response = response[:, :n]
    sequences = torch.cat([prompt_ids, tokens[:, :n]], 1)
    attention_mask = torch.cat([prompt_mask.long(), response], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.long), response], 1)
    return Generation(sequences, logps[:, :n], attention_mask, response_mask, plen)
