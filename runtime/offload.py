"""Offload a model's shards to host memory while another call uses the devices, and
bring them back before the model runs again.

Host copies are pinned when CUDA is available, so the copies back to the device can be
asynchronous; on CPU-only runs the copy is a plain clone (the shards must not alias the
dict the caller keeps mutating).
"""

from __future__ import annotations


def offload(shards: dict) -> dict:
    """Host copies of `shards` (name -> tensor), pinned on CUDA machines; the caller
    drops its device tensors afterwards to free device memory."""
    import torch

    pin = torch.cuda.is_available()
    host = {}
    for name, t in shards.items():
        h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
        h.copy_(t, non_blocking=pin and t.is_cuda)
        host[name] = h
    if pin:
        torch.cuda.synchronize()  # the host copies must be complete before devices are reused
    return host


def reload(host: dict, device) -> dict:
    """Device copies of host shards made by `offload`, on `device`."""
    import torch

    device = torch.device(device)
    out = {name: t.to(device, non_blocking=t.is_pinned(), copy=True) for name, t in host.items()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out
