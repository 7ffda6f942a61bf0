"""The streamed HF export from a sharded model: Phi-3's fused tensors whose parts live on
different tp ranks, a tied embedding, and OLMo 2's / Qwen3's q/k norms (split
differently by family), each written by one writer of a 4-process mesh (tp = 2,
pp = 2), in several files per writer: the same tensors as the source checkpoint, and
`transformers` loads it as the checkpoint's own class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from family_cases import write_family
from rlhfc_runtime import checkpoint as ck
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.dist import ensure_groups, spawn

LAYOUT = Layout((0, 1, 2, 3), 1, 2, 2)


def _save(src: str, dst: str):
    import torch.distributed as dist

    ensure_groups([LAYOUT])
    model = ck.load_checkpoint(src, LAYOUT)
    out = ck.save_checkpoint(model, dst, max_shard_bytes=30_000)
    files = sorted(p.name for p in Path(dst).glob("*.safetensors")) if out else None
    dist.barrier()
    return str(out) if out else None, files


@pytest.mark.parametrize("family", ["phi3", "llama3", "olmo2", "qwen3"])
def test_a_sharded_model_exports_the_checkpoints_own_tensors(tmp_path, family):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = write_family(family, tmp_path / "src")
    written = spawn(_save, 4, str(src), str(tmp_path / "out"))
    out, files = written[0]
    assert all(w == (None, None) for w in written[1:])
    index = json.loads((Path(out) / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == set(files) and len(files) > 4  # every writer, several files each
    got = {k: v for f in files for k, v in load_file(str(Path(out) / f)).items()}
    want = load_file(str(src / "model.safetensors"))
    assert sorted(got) == sorted(want) == sorted(index)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == ck.read_config(src)["architectures"][0]
