"""Packed micro-batches: the real tokens of padded rows, without the padding.

A padded micro-batch [B, T] (left-padded prompts, responses, right padding) becomes
`rows` packed rows [R, W]: W is the longest sequence's length, and each packed row
holds whole sequences one after another (first-fit decreasing), so the stages compute
about as many positions as there are real tokens. Each token keeps its position in its
own sequence, and attention never crosses a sequence boundary: a block-diagonal causal
mask (combined with a layer's sliding window) for SDPA, or `cu_seqlens` for
flash-attn's varlen kernel on CUDA.

The last stage turns its packed hidden states back into the padded layout of the
micro-batch's column window (`unpack`), so heads and losses see exactly the tensors the
padded pass gives them: a packed step equals the padded one within float error.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Packing:
    """How one micro-batch's real tokens are laid out in packed rows.

    lo, hi: the columns [lo, hi) of the padded batch that hold any real token (the
    window heads and losses see); `take` [R*W]: for each packed slot, the index of its
    token in the window flattened [B*(hi-lo)] (0 for an empty slot); `place` [B*(hi-lo)]:
    for each window position, its packed slot (R*W, one past the end, for padding);
    `segment` [R, W]: the sequence (batch row) of each slot, -1 where empty;
    `positions` [R, W]: each token's position in its sequence; `lengths`: the packed
    sequences' lengths in packed order (flash-attn's cu_seqlens)."""

    lo: int
    hi: int
    take: torch.Tensor
    place: torch.Tensor
    segment: torch.Tensor
    positions: torch.Tensor
    lengths: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.segment.shape)

    def pack(self, window_ids: torch.Tensor) -> torch.Tensor:
        """The window's token ids [B, hi-lo] as packed ids [R, W] (0 in empty slots)."""
        return window_ids.reshape(-1)[self.take].masked_fill(self.segment.reshape(-1) < 0, 0).view(self.shape)

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden states [R, W, H] as the window's padded [B, hi-lo, H] (zero on
        padding); differentiable."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
        return flat[self.place].view(-1, self.hi - self.lo, hidden.shape[-1])

    def mask(self, window: int = 0) -> torch.Tensor:
        """Boolean [R, 1, W, W]: a slot sees the earlier slots of its own sequence (the
        last `window` positions of them under a sliding window); every slot sees itself,
        so an empty slot's row is never all-masked."""
        seg, pos = self.segment, self.positions
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
        idx = torch.arange(seg.shape[1], device=seg.device)
        allowed = same & (idx[None, :, None] >= idx[None, None, :])
        if window:
            allowed = allowed & (pos[:, :, None] - pos[:, None, :] < window)
        return (allowed | torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device))[:, None]

    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative lengths [n+1] (int32) of the runs of the flattened packed rows:
        each packed sequence, and each empty slot as a sequence of its own."""
        sizes: list[int] = []
        for row in self.segment.tolist():
            for k, s in enumerate(row):
                if k and s >= 0 and s == row[k - 1]:
                    sizes[-1] += 1
                else:
                    sizes.append(1)
        return torch.tensor([0] + sizes, device=self.segment.device).cumsum(0).to(torch.int32)


@dataclass(frozen=True)
class PackedAttention:
    """What one attention layer over packed sequences needs: the dense block-diagonal
    mask (SDPA, soft-capped eager attention), or the sequence bounds (flash-attn's
    varlen kernel), each built on first use."""

    packing: Packing
    window: int

    @cached_property
    def dense(self) -> torch.Tensor:
        return self.packing.mask(self.window)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        return self.packing.cu_seqlens()


def attention_for(packing: Packing, window: int) -> PackedAttention:
    return PackedAttention(packing, window)


def plan_packing(mask: torch.Tensor) -> Packing:
    """The packing of a padded micro-batch's `mask` [B, T] (1 on real tokens): its
    column window, then its sequences in first-fit-decreasing bins as wide as the
    longest one (ties keep row order: the same layout on every rank)."""
    device = mask.device
    valid = mask.bool().cpu()  # one host copy: the layout is decided on the host
    cols = valid.any(0).nonzero().flatten()
    lo, hi = (int(cols[0]), int(cols[-1]) + 1) if cols.numel() else (0, 1)
    valid = valid[:, lo:hi]
    b, w = valid.shape
    lengths = valid.sum(1).tolist()
    width = max(max(lengths), 1)
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(b), key=lambda r: -lengths[r]):
        if not lengths[row]:
            continue
        for k, free in enumerate(room):
            if free >= lengths[row]:
                bins[k].append(row)
                room[k] -= lengths[row]
                break
        else:
            bins.append([row])
            room.append(width - lengths[row])
    bins = bins or [[]]
    cells = [valid[row].nonzero().flatten() + row * w for row in range(b)]
    take = torch.zeros(len(bins), width, dtype=torch.long)
    segment = torch.full((len(bins), width), -1, dtype=torch.long)
    positions = torch.zeros(len(bins), width, dtype=torch.long)
    place = torch.full((b * w,), len(bins) * width, dtype=torch.long)
    order: list[int] = []
    for k, rows in enumerate(bins):
        at = 0
        for row in rows:
            n = lengths[row]
            take[k, at:at + n] = cells[row]
            segment[k, at:at + n] = row
            positions[k, at:at + n] = torch.arange(n)
            place[cells[row]] = k * width + at + torch.arange(n)
            order.append(n)
            at += n
    return Packing(lo, hi, take.flatten().to(device), place.to(device), segment.to(device), positions.to(device),
                   tuple(order))
