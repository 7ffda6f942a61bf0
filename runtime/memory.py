"""Measured peak memory of one call on this rank, to log beside the plan's estimate.

On CUDA it is the allocator's own figure (`torch.cuda.max_memory_allocated`). On CPU
no allocator statistic exists, so `LiveBytes` counts it: a dispatch mode that sees
every tensor an op creates, charges its storage once (views and in-place results of a
tracked storage are not new memory), and releases it when the last tensor on it dies
(weak-reference finalizers; autograd keeps saved tensors alive, so activations count
until backward frees them). Both add the bytes the model copy already held when the
call began (parameters, gradients, and for a train call the optimizer state; a
generate or inference call on a trainable model's home reads only its weights): the
figure is what the call needs on the device, the quantity the cost model prices.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """What a model copy holds between calls: parameters, gradients, optimizer state."""
    params = list(module.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for s in (optimizer.state.values() if optimizer else ()) for v in s.values()]
    return tensor_bytes(params + grads + [v for v in states if isinstance(v, torch.Tensor)])


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes of live tensors created while active (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors on it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or nbytes == 0:
            return
        entry = self.live.get(ptr)
        if entry is None:
            if ptr in inputs:  # a view or in-place result of memory that existed before
                return
            entry = self.live[ptr] = [nbytes, 0]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]


class CallMemory:
    """`with CallMemory(device, resident, active):` … `.peak_bytes`: the call's measured
    peak (nothing is counted, at no cost, when not `active`)."""

    def __init__(self, device: torch.device, resident: int, active: bool = True) -> None:
        self.device, self.resident, self.active = device, resident, active
        self.peak_bytes = 0
        self._mode: LiveBytes | None = None
        self._start = 0

    def __enter__(self) -> CallMemory:
        if not self.active:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = LiveBytes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            grown = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._mode.__exit__(*exc)
            grown = self._mode.peak
        self.peak_bytes = self.resident + grown
