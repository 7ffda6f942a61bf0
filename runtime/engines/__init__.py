"""Rollout engines: what decodes a generate call's tokens.

A generate call names its engine (`engine`, a setting of the contract: `contract.engines`).
Every engine takes the same inputs and returns the same `Generation` (left-padded
prompts, right-padded responses, raw log-probs of the sampled tokens, per-row EOS), so
`calls.generate_batch` and everything after it are the same whichever engine decoded:

- `OwnLoop`: rlhfc's own loop (`rlhfc_runtime.generate`), collective over the call's
  tp * pp ranks, weights read directly from the sharded model;
- `VllmRollout` (`engines.vllm_engine`): vLLM, fed the call's current weights before
  every call and verified to hold them.

A second engine (SGLang) is one more `RolloutEngine` subclass and one more entry of
`contract.engines.ENGINES`; nothing else changes.
"""

from __future__ import annotations

from rlhfc_runtime.contract.engines import OWN
from rlhfc_runtime.generate import Generation, SamplingParams, generate


class RolloutEngine:
    """What every engine does: continue `prompt_ids` (left-padded, [B, P]) under
    `params` with `module`'s current weights, on every rank of the module's layout
    (each dp replica its own rows). `settings` are the call's (its `precision`, `n_mbs`,
    and the plan's decisions for the engine). `stats` are the engine's numbers of its
    last call (start-up and sync seconds), logged with the call's metrics."""

    name = ""

    def __init__(self):
        self.stats: dict[str, float] = {}

    def generate(self, module, prompt_ids, prompt_mask, params: SamplingParams, settings: dict) -> Generation:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds outside this process (none for the own loop)."""


class OwnLoop(RolloutEngine):
    """rlhfc's own decoding loop: one pipeline forward per token over a static batch."""

    name = OWN

    def generate(self, module, prompt_ids, prompt_mask, params, settings):
        return generate(module, prompt_ids, prompt_mask, params, str(settings["precision"]), int(settings["n_mbs"]))


_BUILT: dict[str, RolloutEngine] = {}


def engine(name: str) -> RolloutEngine:
    """The engine `name` of this process, made on first use and kept for the run (an
    engine such as vLLM starts once: a minute on CPU)."""
    if name not in _BUILT:
        if name == OWN:
            _BUILT[name] = OwnLoop()
        elif name == "vllm":
            from rlhfc_runtime.engines.vllm_engine import VllmRollout  # imports vllm: only when asked for
            _BUILT[name] = VllmRollout()
        else:
            raise ValueError(f"unknown generation engine {name!r}: a compiler bug (the checker resolves `engine`)")
    return _BUILT[name]


def close_engines() -> None:
    """Close every engine of this process (a worker's last act: spawned workers skip
    `atexit`, and vLLM's engine process would outlive them)."""
    while _BUILT:
        _BUILT.popitem()[1].close()
