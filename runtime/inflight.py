"""Rollouts in flight at a step boundary: in an asynchronous program the ops that run
ahead have already made (part of) the next iterations' data when step t ends. A
checkpoint keeps them, so a resume continues with exactly the batches the run would
have trained on, sampled by the policies that sampled them.

Each rank keeps its own: data tensors go into its `rank{R}.safetensors` (`inflight.N`),
the rest (which iteration, key, layout and field each tensor is; row counts, dataset
rows drawn, the policy version each batch was sampled with, metrics not yet logged,
sample log-probs) into its `rank{R}.json`. JSON and safetensors only: nothing unpickled.
"""

from __future__ import annotations

import torch


def pack(engine) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON state, tensors) of what this rank holds for iterations after `engine.step`."""
    e, later = engine, engine.step
    index, tensors = [], {}
    for (it, key, layout), fields in sorted(e.data.items()):
        if it < later:
            continue
        for field, value in sorted(fields.items()):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"in-flight data {key!r} field {field!r} is {type(value).__name__}, not a tensor")
            name = f"inflight.{len(tensors)}"
            tensors[name] = value.detach().clone()  # its own storage: safetensors refuses shared views
            index.append([it, key, layout, field, name])
    state = {
        "data": index,
        "rows": [[it, key, n] for (it, key), n in sorted(e.rows.items()) if it >= later],
        "drawn": [[it, name, rows] for (it, name), rows in sorted(e.drawn.items()) if it >= later],
        "sampled": [[it, v] for it, v in sorted(e.sampled.items()) if it >= later],
        "stats": [[it, s] for it, s in sorted(e.stats.items()) if it >= later],
        "generated": [g for g in e.generated if g["step"] > later],
    }
    return state, tensors


def unpack(engine, state: dict, read) -> None:
    """Put `pack`'s state back into `engine`; `read(name)` gives a tensor of the file."""
    e = engine
    for it, key, layout, field, name in state.get("data", ()):
        e.data.setdefault((it, key, layout), {})[field] = read(name).to(e.device)
    e.rows.update({(it, key): n for it, key, n in state.get("rows", ())})
    e.drawn.update({(it, name): rows for it, name, rows in state.get("drawn", ())})
    e.sampled.update({it: v for it, v in state.get("sampled", ())})
    e.stats.update({it: s for it, s in state.get("stats", ())})
    e.generated += state.get("generated", [])
