"""A dataset's tokenizer at check time: a tokenizer.json (a directory without one is E031,
naming what it lacks), its size against every model's vocabulary (E031), its chat
template when `chat = true` (E031), and, for a vocabulary without an unknown token, that
it maps every text of the rows (E030 at the row's FILE:LINE), which the runtime would
otherwise find at the first step that samples the row."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhfc import ir
from rlhfc.frontend.check.common import Reporter, display
from rlhfc_runtime.contract.rows import CHECK_SCAN_BYTES, DataError, scan_jsonl, tokenizer_file, tokenizer_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Models that raise on a word outside the vocabulary unless it holds their unknown token.
_STRICT_MODELS = ("WordLevel", "WordPiece")


def check_tokenizer(ds: ir.Dataset, where: Path, models: dict[str, ir.Model], rep: Reporter) -> None:
    """Every check of `ds.tokenizer` (found at `where`: its path, or a hub id's snapshot)
    against the models and the rows."""
    try:
        file = tokenizer_file(where)
        doc = tokenizer_json(file)
        size = _size(doc, file)
    except DataError as e:
        rep.error("E031", f"the tokenizer of `{ds.name}`: {e}", ds.span,
                  "a Hugging Face tokenizer.json, or a directory holding tokenizer.json and tokenizer_config.json")
        return
    for m in models.values():
        if size and m.shape is not None and size > m.shape.vocab:
            rep.error("E031", f"the tokenizer of `{ds.name}` has {size} tokens, more than the "
                              f"{m.shape.vocab} of `{m.name}`'s vocabulary", ds.span,
                      "use the model's own tokenizer, or a model with a larger vocabulary")
            break
    if ds.chat and not has_chat_template(where):
        rep.error("E031", f"`{ds.name}` has `chat = true` but its tokenizer has no chat template", ds.span,
                  "use a tokenizer directory whose tokenizer_config.json has `chat_template`")
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    if ds.format == "jsonl" and model.get("type") in _STRICT_MODELS and model.get("unk_token") not in (
            model.get("vocab") or {}):
        _check_rows_map(ds, file, model["type"], rep)


def _size(doc: dict, file: Path) -> int | None:
    """Token ids the tokenizer can produce (vocabulary and added tokens)."""
    try:
        vocab = doc["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in doc.get("added_tokens") or []]
        return max(ids) + 1 if ids else None
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{file}:1: not a tokenizer.json (no `model.vocab` of token ids)") from None


def has_chat_template(path: Path) -> bool:
    if not path.is_dir():
        return False
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _check_rows_map(ds: ir.Dataset, file: Path, kind: str, rep: Reporter) -> None:
    """The first text of the rows (first CHECK_SCAN_BYTES) the tokenizer cannot map, as E030."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        rep.error("E031", f"the tokenizer of `{ds.name}`: {file}:1: cannot load it ({e})", ds.span)
        return
    try:
        for _, line_no, row in scan_jsonl(Path(ds.path), [c for _, c in ds.fields], limit=CHECK_SCAN_BYTES):
            for _, column in ds.fields:
                bad = unmappable(tok, row[column])
                if bad is not None:
                    rep.error("E030", f"`{display(Path(ds.path))}:{line_no}`: the tokenizer of `{ds.name}` cannot map "
                                      f"{bad!r} in field `{column}`: its {kind} vocabulary has no unknown token",
                              ds.span,
                              f"remove or replace the character in the data, or use a tokenizer that knows it "
                              f"({display(file)})")
                    return
    except (DataError, OSError):
        return  # a bad row is the row scan's error (`data._scan_rows`), reported once


def unmappable(tok, text: str) -> str | None:
    """None when `tok` encodes `text`, else the first piece of it that it cannot encode."""
    if _maps(tok, text):
        return None
    added = [t.content for t in tok.get_added_tokens_decoder().values()]
    for part in re.split("|".join(map(re.escape, added)), text) if added else [text]:
        normal = tok.normalizer.normalize_str(part) if tok.normalizer else part
        pieces = tok.pre_tokenizer.pre_tokenize_str(normal) if tok.pre_tokenizer else [(normal, None)]
        bad = next((p for p, _ in pieces if not _maps(tok, p)), None)
        if bad is not None:
            return bad
    return text


def _maps(tok, text: str) -> bool:
    try:
        tok.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exceptions
        return False
    return True
