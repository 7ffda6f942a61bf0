"""Hugging Face export of trained models: OUT/hf/MODEL/ after every checkpoint and at
the end, from the full weights the checkpoint gathers (whatever the layout).

config.json (architectures `*ForCausalLM`, or `*ForTokenClassification` for a value
head, saved as `score.weight`), model.safetensors (files of at most `max_shard_bytes`
with an index when larger), generation_config.json, and the tokenizer: the files of the
model's own checkpoint directory when it has them, else the dataset's tokenizer.json.
The directory is staged beside the old one and swapped in only when its checkpoint is
complete, so a reader sees one complete export, of the newest checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhfc_runtime.checkpoint import _write
from rlhfc_runtime.contract.atomic import write_atomic
from rlhfc_runtime.calls import model_config
from rlhfc_runtime.contract.hub import TOKENIZER_FILES

MAX_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained


def stage(out: Path, name: str, spec: dict, weights: dict, tokenizer: str | None, specials: dict,
          max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write OUT/hf/NAME.tmp from full `weights` (HF names); `publish` swaps it in once the
    checkpoint it belongs to is complete. A failed write removes it."""
    tmp = Path(out) / "hf" / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = model_config(spec)
    for key, special in (("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        if specials.get(special) is not None:
            cfg[key] = int(specials[special])
    try:
        _write(tmp, cfg, spec["head"], dict(weights), max_shard_bytes)
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


def _copy_tokenizer(spec: dict, tokenizer: str | None, into: Path) -> None:
    source = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
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
