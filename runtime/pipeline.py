"""Pipeline schedules of a sharded model: stages own layer ranges and exchange
activations (forward) and their gradients (backward) with batched point-to-point
messages (`dist.exchange`: one `batch_isend_irecv` per step, so NCCL posts a send and
a receive together and neither side blocks the other).

Two schedules over the micro-batches of one data-parallel replica's batch:
- GPipe: every forward, then every backward (keeps all micro-batches' activations);
- 1F1B (PipeDream-flush, as Megatron's non-interleaved schedule): after `pp - stage - 1`
  warm-up forwards each stage alternates one forward and one backward, so at most
  `pp - stage` micro-batches' activations are alive. Same gradients as GPipe up to the
  order of the float sums over micro-batches.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from rlhfc_runtime.contract.budget import fill
from rlhfc_runtime.dist import exchange
from rlhfc_runtime.packing import Packing, plan_packing

SCHEDULES = ("1f1b", "gpipe")


class PipelineStage:
    """The pipeline half of `ShardedDecoder` (a mixin): it needs `groups`, `device`,
    `dtype`, `cfg`, `first`, `last`, `stage_forward` and `head_output`. Padded
    micro-batches run packed (`packing`) unless `pack` is False (the padded reference)."""

    pack = True

    def _neighbour(self, step: int) -> int:
        g = self.groups
        return g.layout.rank_at(g.pp_rank + step, g.dp_rank, g.tp_rank)

    def send_next(self, hidden):
        """Send this stage's output activations to the next stage (same dp, tp)."""
        exchange(sends=[(hidden.detach().contiguous(), self._neighbour(+1))])

    def recv_prev(self, shape):
        """Receive the previous stage's output activations (same dp, tp)."""
        buf = torch.empty(shape, device=self.device, dtype=self.dtype)
        exchange(recvs=[(buf, self._neighbour(-1))])
        return buf

    def _activation(self, mb):
        """The buffer of a micro-batch's stage input: its packed shape where it runs packed."""
        rows, width = mb["_packing"].shape if "_packing" in mb else mb["input_ids"].shape
        return torch.empty((rows, width, self.cfg.shape.hidden), device=self.device, dtype=self.dtype)

    def pipeline_forward(self, ids, position_ids, key_valid, cache=None, start=0):
        """Pass one micro-batch through the whole pipeline; returns (stage input,
        stage output): the last stage's output is the final hidden state."""
        if self.first:
            inp = ids
        else:
            inp = self.recv_prev((ids.shape[0], ids.shape[1], self.cfg.shape.hidden))
            inp.requires_grad_(torch.is_grad_enabled())
        out = self.stage_forward(inp, position_ids, key_valid, cache, start)
        if not self.last:
            self.send_next(out)
        return inp, out

    def run_pipeline(
        self,
        input_ids,
        attention_mask=None,
        fn: Callable[[object, dict], object] | None = None,
        n_micro: int = 1,
        extra: dict | None = None,
        backward: bool = False,
        schedule: str = "1f1b",
        recompute: bool = False,
        token_budget: int = 0,
    ):
        """Micro-batches of one data-parallel replica's batch through the pipeline.

        `fn(head_output, micro_batch)` runs on the last stage per micro-batch; the
        micro-batch dict holds input_ids, attention_mask, position_ids and the rows of
        every tensor in `extra`. Forward only: fn returns a tensor, and the
        concatenation over micro-batches comes back on every stage. backward=True: fn
        returns the micro-batch's mean loss; gradients of the batch-mean loss
        accumulate into .grad (not yet averaged over dp, see `reduce_gradients`) under
        `schedule` ("1f1b" or "gpipe"), with each layer's activations recomputed in
        the backward pass when `recompute`; the loss comes back. A `token_budget`
        (the plan's) fills each micro-batch with whole sequences up to that many tokens
        (real ones when packed), in place of `n_micro` equal parts."""
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r} (expected one of {SCHEDULES})")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = attention_mask is not None and not bool(attention_mask.all())
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, **(extra or {})}
        rows = input_ids.shape[0]
        if token_budget:
            micro = _by_budget(batch, mask if padded and self.pack else torch.ones_like(mask), token_budget)
        else:
            micro = [dict(zip(batch, parts)) for parts in zip(*(t.tensor_split(n_micro) for t in batch.values()))]
        micro = [m for m in micro if m["input_ids"].shape[0]]
        if padded and self.pack:
            micro = [{**m, "_packing": plan_packing(m["attention_mask"])} for m in micro]
        width = input_ids.shape[1]

        def forward(mb, inp):
            pk: Packing | None = mb.get("_packing")
            if pk is None:
                out = self.stage_forward(mb["input_ids"] if self.first else inp, mb["position_ids"],
                                         mb["attention_mask"] if padded else None)
                hidden, view = out, mb
            else:
                x = pk.pack(mb["input_ids"][:, pk.lo:pk.hi]) if self.first else inp
                out = self.stage_forward(x, pk.positions, None, packing=pk)
                hidden, view = (pk.unpack(out), _window(mb, pk, width)) if self.last else (out, mb)
            if not self.last:
                return out, None
            r = fn(self.head_output(hidden), view)
            if backward:
                return out, r * (mb["input_ids"].shape[0] / rows)
            return out, (r if pk is None else _widen(r, pk, width))

        self._recompute = recompute and backward
        try:
            if not backward:
                results = []
                with torch.no_grad():
                    for mb in micro:
                        out, r = forward(mb, self._recv_input(mb))
                        if not self.last:
                            self.send_next(out)
                        results.append(r)
                return self._from_last_stage(torch.cat(results) if self.last else None)
            run = self._one_f_one_b if schedule == "1f1b" else self._gpipe
            return self._from_last_stage(run(micro, forward))
        finally:
            self._recompute = False

    def _recv_input(self, mb):
        if self.first:
            return None
        buf = self._activation(mb)
        exchange(recvs=[(buf, self._neighbour(-1))])
        return buf.requires_grad_(torch.is_grad_enabled())

    def _backward(self, kept, loss, grad):
        """Backward of the oldest kept micro-batch; returns d(loss)/d(its stage input)."""
        inp, out, r = kept.pop(0)
        if self.last:
            r.backward()
            loss += r.detach().float()
        else:
            out.backward(grad)
        return None if self.first else inp.grad.contiguous()

    def _gpipe(self, micro, forward):
        kept = []
        loss = torch.zeros((), device=self.device)
        for mb in micro:
            inp = self._recv_input(mb)
            out, r = forward(mb, inp)
            if not self.last:
                self.send_next(out)
            kept.append((inp, out, r))
        kept.reverse()  # backward from the last micro-batch, as GPipe does
        while kept:
            grad = None
            if not self.last:
                grad = torch.empty_like(kept[0][1])
                exchange(recvs=[(grad, self._neighbour(+1))])
            g_in = self._backward(kept, loss, grad)
            if not self.first:
                exchange(sends=[(g_in, self._neighbour(-1))])
        return loss

    def _one_f_one_b(self, micro, forward):
        g = self.groups
        n = len(micro)
        warm = min(g.layout.pp - g.pp_rank - 1, n)
        kept = []
        loss = torch.zeros((), device=self.device)
        nxt = None if self.last else self._neighbour(+1)
        prev = None if self.first else self._neighbour(-1)
        for mb in micro[:warm]:
            inp = self._recv_input(mb)
            out, r = forward(mb, inp)
            if nxt is not None:
                exchange(sends=[(out.detach().contiguous(), nxt)])
            kept.append((inp, out, r))
        inp = self._recv_input(micro[warm]) if warm < n else None
        for i in range(warm, n):
            out, r = forward(micro[i], inp)
            kept.append((inp, out, r))
            grad = None
            if nxt is not None:  # send this forward's output, receive the oldest's gradient
                grad = torch.empty_like(kept[0][1])
                exchange(sends=[(out.detach().contiguous(), nxt)], recvs=[(grad, nxt)])
            g_in = self._backward(kept, loss, grad)
            inp = None
            if prev is not None:  # send that gradient back, receive the next forward's input
                if i + 1 < n:
                    inp = self._activation(micro[i + 1])
                    exchange(sends=[(g_in, prev)], recvs=[(inp, prev)])
                    inp.requires_grad_()
                else:
                    exchange(sends=[(g_in, prev)])
        while kept:  # cool-down: the warm-up micro-batches' backwards
            grad = None
            if nxt is not None:
                grad = torch.empty_like(kept[0][1])
                exchange(recvs=[(grad, nxt)])
            g_in = self._backward(kept, loss, grad)
            if prev is not None:
                exchange(sends=[(g_in, prev)])
        return loss

    def _from_last_stage(self, tensor):
        """Broadcast a last-stage tensor to every stage of this replica's pipeline."""
        g = self.groups
        if g.layout.pp == 1:
            return tensor
        meta = [(tuple(tensor.shape), tensor.dtype) if self.last else None]
        src = g.pp_ranks[-1]
        dist.broadcast_object_list(meta, src=src, group=g.pp, device=self.device)
        if not self.last:
            tensor = torch.empty(meta[0][0], dtype=meta[0][1], device=self.device)
        dist.broadcast(tensor.contiguous(), src=src, group=g.pp)
        return tensor


def _window(mb: dict, pk: Packing, width: int) -> dict:
    """A packed micro-batch as its head and loss see it: the per-token tensors (last
    dimension `width`) cut to the columns that hold real tokens; nothing a loss sums
    is lost, since the columns cut are padding in every row."""
    return {k: (v[..., pk.lo:pk.hi] if v.dim() >= 2 and v.shape[-1] == width else v)
            for k, v in mb.items() if k != "_packing"}


def _widen(result, pk: Packing, width: int):
    """A forward result over a packed micro-batch's columns ([B, w, …] per position, or
    [B, w - 1] per next token) back at its place among the batch's `width` columns."""
    cut = pk.hi - pk.lo
    if result.dim() < 2 or result.shape[1] not in (cut, cut - 1):
        return result
    pad = [0, 0] * (result.dim() - 2) + [pk.lo, width - pk.hi]
    return torch.nn.functional.pad(result, pad)


def _by_budget(batch: dict, mask, budget: int) -> list[dict]:
    """Consecutive micro-batches of whole sequences within `budget` tokens each (a pair
    call's rows come two per pair: its per-pair tensors have half the rows, and pairs
    stay whole)."""
    rows = mask.shape[0]
    unit = rows // min(t.shape[0] for t in batch.values())
    lengths = mask.reshape(rows // unit, -1).sum(1).tolist()
    bounds = fill(lengths, budget)
    return [{k: v[lo * v.shape[0] // (rows // unit):hi * v.shape[0] // (rows // unit)] for k, v in batch.items()}
            for lo, hi in zip(bounds, bounds[1:])]
