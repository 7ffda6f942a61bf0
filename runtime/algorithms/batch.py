"""The tensors a sequence batch carries between calls, and how generation builds one.

A `seq` (or `data`) value is a dict of [B, T] tensors:
- `input_ids`: left-padded prompt, then the response, then right padding;
- `attention_mask`: 1 on real tokens (prompt and response);
- `response_mask`: 1 on generated tokens, the end-of-sequence token included.
A `pairs` value holds the same keys with shape [B, 2, T]: index 0 is the chosen
sequence, 1 the rejected one, so splitting along dim 0 never separates a pair.
Per-token tensors (`logp`, `values`) are [B, T] in the alignment of `ops`.
"""

from __future__ import annotations

import torch

SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask")


def build_sequences(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
    eos_id: int, pad_id: int,
) -> dict[str, torch.Tensor]:
    """A sequence batch from left-padded prompts [B, P] and raw sampled tokens [B, R]:
    everything after a row's first `eos_id` becomes padding and leaves the masks."""
    is_eos = response_ids == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    response = response_ids.masked_fill(after_eos, pad_id)
    return {
        "input_ids": torch.cat([prompt_ids, response], dim=1),
        "attention_mask": torch.cat([prompt_mask.long(), response_mask], dim=1),
        "response_mask": torch.cat([torch.zeros_like(prompt_mask, dtype=torch.long), response_mask], dim=1),
    }


def flatten_pairs(pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[B, 2, T] pair tensors as a [2B, T] sequence batch (chosen, rejected, chosen, …)."""
    return {k: pairs[k].reshape(-1, pairs[k].shape[-1]) for k in SEQUENCE_KEYS}


def split_rows(batch: dict[str, torch.Tensor], n_parts: int) -> list[dict[str, torch.Tensor]]:
    """A batch cut into `n_parts` contiguous row ranges (data-parallel shards or
    micro-batches); the registry's losses summed over the parts equal the whole."""
    size = next(iter(batch.values())).shape[0]
    bounds = [size * i // n_parts for i in range(n_parts + 1)]
    return [{k: v[lo:hi] for k, v in batch.items()} for lo, hi in zip(bounds, bounds[1:])]
