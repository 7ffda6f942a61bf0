"""Generation engines: which engine a generate call decodes with, and what each can run.

`engine` is a generate-call setting (`interfaces.GENERATE_SETTINGS`: a call option or a
run-block key; "rlhfc" by default, the runtime's own decoding loop). Every other engine
is a package the runtime drives in-process (`rlhfc_runtime.engines`). The checker asks
`engine_problem` for every generate call and refuses, located at the setting, what the
engine cannot run: a family it does not run, a head_dim its CPU kernels do not take,
or an engine whose package is not installed. Pure Python, no torch, nothing imported:
whether a package is installed is `importlib.util.find_spec`, which runs none of its code.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from rlhfc_runtime.contract.shapes import ModelShape

OWN = "rlhfc"


@dataclass(frozen=True)
class EngineSpec:
    """One engine: the package it needs (None: built in), the families rlhfc drives it
    with (its weight names and fused tensors verified against the runtime's forward
    pass), the smallest head_dim it runs on CPU, and how to install it."""

    name: str
    package: str | None = None
    families: tuple[str, ...] = ()  # empty: every family the runtime runs
    min_cpu_head_dim: int = 0
    install: str = ""
    tied_families: tuple[str, ...] = ()  # the engine's model has no LM head of its own: it reads the embedding


ENGINES: dict[str, EngineSpec] = {e.name: e for e in (
    EngineSpec(OWN),
    # vLLM's CPU attention kernels take head sizes of 32 and up. Families: those whose
    # sync and rollouts are tested against the trainer and the own loop
    # (tests/runtime_model/test_vllm_engine.py, test_vllm_families.py).
    EngineSpec("vllm", "vllm", ("llama", "qwen3", "phi3", "gemma2"), 32, 'pip install "rlhfc[vllm]"', ("gemma2",)),
)}


def installed(package: str) -> bool:
    """Whether `package` can be imported here (its code is not run)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def engine_problem(name: str, shape: ModelShape | None, device: str | None) -> str | None:
    """Why engine `name` cannot generate with a model of `shape` on `device` (None: it can)."""
    spec = ENGINES[name]
    if shape is not None and spec.families and shape.family not in spec.families:
        return f"engine {name!r} does not run the {shape.family!r} family here (it runs: {', '.join(spec.families)})"
    if shape is not None and shape.family in spec.tied_families and not shape.tied_embeddings:
        return (f"engine {name!r} ties the {shape.family!r} LM head to the embedding, and this model's are "
                f"separate (tie_word_embeddings = false)")
    if shape is not None and device in (None, "cpu") and shape.head_dim < spec.min_cpu_head_dim:
        return (f"engine {name!r} needs head_dim >= {spec.min_cpu_head_dim} on CPU, and this model's head_dim is "
                f"{shape.head_dim} (hidden {shape.hidden} / {shape.n_heads} heads)")
    if spec.package and not installed(spec.package):
        return f"engine {name!r} needs the `{spec.package}` package, which is not installed ({spec.install})"
    return None
