"""The half of the vLLM weight sync that runs inside vLLM's worker process.

vLLM mixes `WeightSync` into its worker (`worker_extension_cls`), and the trainer side
(`engines.vllm_engine`) reaches it through `LLM.collective_rpc`. The weights travel as
one safetensors blob (tensors and their names only: nothing is unpickled) and go in
through vLLM's own `reload_weights`, which renames and fuses them (q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`, the vocabulary padded) and repacks them for
its kernels, as loading a checkpoint does (a tied LM head goes in too: vLLM's
Llama and Qwen keep it as a parameter that a reload must refill; Gemma's engine model
has none and reads the embedding). The worker keeps the version the trainer
gave the weights and their checksums, computed here on what arrived, so the trainer
can tell, before every generate call, that the engine holds exactly its weights.
"""

from __future__ import annotations

import time

import torch

TIED_HEAD = "lm_head.weight"


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per tensor (sum, sum of squares) in float64: the same numbers on both sides of a
    sync for the same values, a different pair for any stale or missing tensor."""
    out = {}
    for name, t in tensors.items():
        x = t.detach().to(torch.float64)
        out[name] = (float(x.sum()), float((x * x).sum()))
    return out


class WeightSync:
    """Methods vLLM adds to its worker: load a version of the weights, report the held one."""

    def rlhfc_load(self, blob: bytes, version: int) -> float:
        """Load `version` of the weights; the seconds vLLM's own `reload_weights` took
        (the floor of a sync: what loading the same tensors costs the engine anyway)."""
        from safetensors.torch import load  # noqa: PLC0415 - the worker process imports it once

        tensors = load(blob)
        self.rlhfc_sums = checksums(tensors)
        if not hasattr(self.model_runner.get_model(), "lm_head"):
            tensors.pop(TIED_HEAD, None)  # Gemma's engine model reads its tied head from the embedding
        start = time.perf_counter()
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.rlhfc_version = version
        return time.perf_counter() - start

    def rlhfc_state(self) -> tuple[int, dict]:
        return getattr(self, "rlhfc_version", 0), getattr(self, "rlhfc_sums", {})
