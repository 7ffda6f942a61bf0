"""Hugging Face export of trained models: OUT/hf/MODEL/ after every checkpoint and at
the end, streamed from the shards tensor by tensor (`hf_stream`: whatever the layout,
no process holds more than its shards plus one full tensor).

config.json (architectures `*ForCausalLM`, or `*ForTokenClassification` for a value
head, saved as `score.weight`), model.safetensors (or one file per writer, each of at
most `max_shard_bytes`, with model.safetensors.index.json), generation_config.json, and the tokenizer: the files of the
model's own checkpoint directory when it has them, else the dataset's tokenizer.json.
The directory is staged beside the old one and swapped in only when its checkpoint is
complete, so a reader sees one complete export, of the newest checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rlhfc_runtime import hf_stream
from rlhfc_runtime.checkpoint import hf_config
from rlhfc_runtime.hf_stream import MAX_SHARD_BYTES
from rlhfc_runtime.contract.atomic import write_atomic
from rlhfc_runtime.calls import model_config
from rlhfc_runtime.contract.hub import TOKENIZER_FILES
from rlhfc_runtime.contract.program import ModelSpec


def stage_tensors(out: Path, name: str, module, write: bool = True,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[Path, list, OSError | None]:
    """Stream the model's tensors into OUT/hf/NAME.tmp (collective over its mesh: each
    writer its own files, `hf_stream`); returns (that directory, the plan, this rank's
    OSError or None). `finish` completes it on the mesh's first rank once every rank's
    files are complete; `publish` swaps it in once its checkpoint is."""
    tmp = Path(out) / "hf" / (name + ".tmp")
    plan = hf_stream.plan_of(module, max_shard_bytes)
    hf_stream.prepare_dir(module, tmp, fresh=True)
    return tmp, plan, hf_stream.stream(module, tmp, plan, write=write)


def is_finisher(module) -> bool:
    return module.groups.rank == module.groups.layout.ranks[0]


def finish(tmp: Path, plan: list, module, spec: ModelSpec, tokenizer: str | None, specials: dict) -> Path:
    """The index, config.json, generation_config.json and tokenizer of a staged export,
    written last; a failed write removes the directory."""
    cfg = model_config(spec)
    for key, special in (("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        if specials.get(special) is not None:
            cfg[key] = int(specials[special])
    try:
        hf_stream.write_index(tmp, plan, torch.empty((), dtype=module.dtype).element_size())
        write_atomic(tmp / "config.json", hf_config(cfg, spec.head))
        generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        write_atomic(tmp / "generation_config.json", (json.dumps(generation, indent=2) + "\n").encode())
        _copy_tokenizer(spec, tokenizer, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def publish(staged: Path) -> Path:
    """Swap a staged OUT/hf/NAME.tmp in for OUT/hf/NAME; returns the final directory."""
    final = staged.with_name(staged.name[:-len(".tmp")])
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _copy_tokenizer(spec: ModelSpec, tokenizer: str | None, into: Path) -> None:
    source = Path(spec.checkpoint) if spec.checkpoint else None
    if source is not None and (source / "tokenizer.json").is_file():
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                _copy(source / file, into / file)
        return
    if not tokenizer:
        return
    path = Path(tokenizer)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        return
    _copy(path, into / "tokenizer.json")
    if path.parent != path and (path.parent / "tokenizer_config.json").is_file():
        _copy(path.parent / "tokenizer_config.json", into / "tokenizer_config.json")
    else:
        write_atomic(into / "tokenizer_config.json",
                     (json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n").encode())


def _copy(source: Path, target: Path) -> None:
    """A tokenizer file copied whole (a failed write names the target and the bytes needed)."""
    write_atomic(target, source.read_bytes())
