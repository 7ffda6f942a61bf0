"""Tokenizers: Hugging Face fast tokenizers loaded from local files only, and the
character-level tokenizer of the bundled tiny task."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhfc_runtime.contract.rows import DataError, tokenizer_file, tokenizer_json

SPECIAL_NAMES = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}


def char_tokenizer(vocab: Sequence[str], pad: str, bos: str, eos: str) -> Tokenizer:
    """A character-level tokenizer over `vocab` (ids = positions) that prepends `bos`:
    every character is one token, so token ids are the task's symbols."""
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([pad, bos, eos])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab.index(bos))])
    return tok


GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _generic(path: Path) -> PreTrainedTokenizerFast | None:
    """A directory whose tokenizer_config.json declares the generic fast class loads as
    exactly its tokenizer.json (AutoTokenizer would pick the model type's own class from
    a config.json beside it and rebuild the pre-tokenizer)."""
    try:
        declared = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    if declared not in GENERIC_CLASSES or not (path / "tokenizer.json").exists():
        return None
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a `tokenizer.json` file or a local Hugging Face tokenizer
    directory (`AutoTokenizer`, local files only: never the network). For a bare file, `<pad>`/`<bos>`/`<eos>` become the special tokens when
    the vocabulary has them; a missing pad token falls back to eos."""
    path = Path(path)
    file = tokenizer_file(path)  # a directory without tokenizer.json: named, with what it lacks
    tokenizer_json(file)  # FILE:LINE:COL when it is not JSON
    try:
        if path.is_dir():
            tokenizer = _generic(path) or AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            vocab = Tokenizer.from_file(str(path)).get_vocab()
            specials = {k: v for k, v in SPECIAL_NAMES.items() if v in vocab}
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), **specials)
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise plain Exceptions
        raise DataError(f"{file}:1: cannot load the tokenizer: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
