"""`dataset` declarations: format, fields, columns, tokenizer and chat template.

    dataset prompts = jsonl("math.jsonl", field = "question", max_len = 64, chat = true,
                            system = "Answer with a number.")
    dataset pairs   = data("prefs.parquet", prompt = "p", chosen = "c", rejected = "r", max_len = 64)

`jsonl`, `parquet` and `datasets` (Hugging Face `datasets`, memory-mapped) name the format;
`data(...)` picks it from the suffix or a `format = "…"` key. Every field of a row that is
not a role becomes a column (passed to reward functions and written to samples). When the
file exists, its first row (or schema) is read here so a field it lacks is a located error
listing the fields it has. The tokenizer (a path, or a hub id: `contract.hub`) defaults to the
actor checkpoint's; a tokenizer larger than a model's vocabulary, or `chat = true` without a
template, is an error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rlhfc import ir
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import (
    DATASET_FIELDS, Reporter, Unit, Values, display, path_exists, resolved_path,
)
from rlhfc.frontend.check.declarations import split_args
from rlhfc_runtime.contract import hub
from rlhfc_runtime.contract.hub import TOKENIZER_MAIN
from rlhfc.frontend.check.tokens import check_tokenizer
from rlhfc_runtime.contract.rows import CHECK_SCAN_BYTES, DataError, regular, scan_jsonl

FORMATS = ("jsonl", "parquet", "datasets")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "datasets"}
KEYS = DATASET_FIELDS + ("max_len", "tokenizer", "chat", "system", "format")
FIRST_ROW_BYTES = 1 << 20


def check_dataset(decl: ast.DatasetDecl, unit: Unit, rep: Reporter, val: Values) -> ir.Dataset:
    where = f"dataset `{decl.name.text}`"
    positional, keywords = split_args(decl.args, rep, where)
    path_text = val.string(positional[0]) if positional else None
    if len(positional) != 1:
        rep.error("E024" if not positional else "E022", f"{where} takes one positional argument, the file path",
                  decl.format.span)
    fields, max_len, tokenizer, chat, system, fmt = [], 0, None, False, None, None
    for key, opt in keywords.items():
        if key in DATASET_FIELDS:
            column = val.string(opt)
            if column is not None:
                fields.append((key, column))
        elif key == "max_len":
            max_len = val.positive_int(opt) or 0
        elif key in ("tokenizer", "system", "format"):
            text = val.string(opt)
            tokenizer, system, fmt = ((text, system, fmt) if key == "tokenizer" else
                                      (tokenizer, text, fmt) if key == "system" else (tokenizer, system, text))
        elif key == "chat":
            chat = _bool(opt, rep)
        else:
            val.unknown(opt.key, KEYS, where)
    fmt = _format(decl, fmt, path_text, keywords, rep)
    names = {k for k, _ in fields}
    if "max_len" not in keywords:
        rep.error("E024", f"{where} needs `max_len`", decl.span, "max_len = N: prompt (or pair) tokens")
    if not names & {"field", "prompt"}:
        rep.error("E024", f"{where} needs `field` or `prompt`", decl.span,
                  'field = "prompt" names the key holding the text')
    if ("chosen" in names) != ("rejected" in names):
        rep.error("E024", f"{where} has only one of `chosen` / `rejected`", decl.span, "pair data needs both")
    if system is not None and not chat:
        rep.error("E022", "`system` needs `chat = true`", keywords["system"].key.span,
                  "the system message is part of the chat template")
    resolved = {}
    hub_tokenizer = _hub_tokenizer(tokenizer, unit, keywords, rep)
    for label, text, span in (("dataset file", path_text, positional[0].span if positional else None),
                              ("tokenizer", None if hub_tokenizer else tokenizer,
                               keywords["tokenizer"].value.span if tokenizer else None)):
        if text is None:
            continue
        resolved[label] = resolved_path(unit.path.parent / text)
        if not path_exists(resolved[label]):
            rep.warning("W001", f"{label} `{text}` not found (yet)", span,
                        "paths are relative to the program file; it must exist when the program runs")
    columns: tuple[str, ...] = ()
    data_path = resolved.get("dataset file")
    if data_path is not None and path_exists(data_path) and fmt:
        have = _file_fields(data_path, fmt, positional[0].span, rep)
        if have is not None:
            for role, key in fields:
                if key not in have:
                    rep.error("E030", f"`{display(data_path)}:1`: rows have no field `{key}` ({role})",
                              keywords[role].value.span, f"the rows have: {', '.join(have) or 'no fields'}")
            used = {key for _, key in fields}
            columns = tuple(k for k in have if k not in used)
            if fmt == "jsonl" and all(key in have for _, key in fields):
                _scan_rows(data_path, [key for _, key in fields], positional[0].span, rep)
    tok = hub_tokenizer or (str(resolved["tokenizer"]) if "tokenizer" in resolved else None)
    return ir.Dataset(decl.name.text, fmt or decl.format.text, str(data_path or ""), tuple(fields), max_len,
                      decl.name.span, tok, chat, system, columns)


def _hub_tokenizer(text: str | None, unit: Unit, keywords, rep: Reporter) -> str | None:
    """`tokenizer = "owner/name"`: the hub id, its tokenizer files resolved (E017 where they
    cannot be); None for a path."""
    try:
        ref = hub.hub_id(text, unit.path.parent) if text is not None else None
        if ref is not None:
            hub.resolve_tokenizer(ref)
    except hub.HubError as error:
        rep.error("E017", error.args[0], keywords["tokenizer"].value.span, error.hint)
        return text if text.startswith(hub.PREFIX) else f"{hub.PREFIX}{text}"  # an id, not a path to look for
    return None if ref is None else str(ref)


def local_tokenizer(value: str) -> Path | None:
    """Where a tokenizer (a path, or a hub id's snapshot) is on this machine; None when absent."""
    if hub.is_hub(value):
        try:
            return hub.resolve_tokenizer(value)
        except hub.HubError:
            return None
    return Path(value) if path_exists(Path(value)) else None


def _bool(opt: ast.Option, rep: Reporter) -> bool:
    if isinstance(opt.value, ast.Bool):
        return opt.value.value
    rep.error("E022", f"`{opt.key.text}` must be true or false", opt.value.span)
    return False


def _format(decl: ast.DatasetDecl, fmt: str | None, path_text: str | None, keywords, rep: Reporter) -> str | None:
    """The file format: the constructor's name, or for `data(...)` the `format` key or the suffix."""
    ctor = decl.format.text
    if ctor in FORMATS:
        if fmt is not None:
            rep.error("E022", f"`{ctor}(...)` already names the format", keywords["format"].key.span,
                      'use data("FILE", format = "…") to choose it by key')
        return ctor
    if ctor != "data":
        rep.error("E022", f"unknown dataset format `{ctor}`", decl.format.span,
                  f"formats: {', '.join(FORMATS)}, or data(\"FILE\") to choose by suffix or `format`")
        return None
    if fmt is not None:
        if fmt not in FORMATS:
            rep.error("E022", f"unknown format `{fmt}`", keywords["format"].value.span, f"formats: {', '.join(FORMATS)}")
            return None
        return fmt
    suffix = Path(path_text or "").suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if path_text is not None:
        rep.error("E022", f"cannot tell the format of `{path_text}` from its suffix", decl.format.span,
                  f'suffixes: {", ".join(SUFFIXES)}; or add format = "{FORMATS[0]}"')
    return None


_ROWS_HINT = "JSONL: one JSON object per line; parquet or a `datasets` directory otherwise"


def _file_fields(path: Path, fmt: str, span: ir.Span, rep: Reporter) -> list[str] | None:
    """The fields of the file's rows, from its first row or schema, without reading it all."""
    try:
        regular(path, "dataset file", directory_ok=fmt == "datasets")
        if path.is_dir():
            info = path / "dataset_info.json"
            return list(json.loads(info.read_text(encoding="utf-8"))["features"])
        if fmt == "parquet" or path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                rep.error("E030", f"reading `{display(path)}` needs pyarrow", span, "pip install 'rlhfc[data]'")
                return None
            return list(pq.read_schema(path).names)
        first = next(scan_jsonl(path, ()), None)
        if first is not None:
            return list(first[2])
        rep.error("E030", f"`{display(path)}` has no rows", span, "one JSON object per line")
    except DataError as e:
        rep.error("E030", str(e), span, _ROWS_HINT)
    except (OSError, ValueError, KeyError, TypeError) as e:
        rep.error("E030", f"`{display(path)}`: cannot read its first row ({e})", span, _ROWS_HINT)
    return None


def _scan_rows(path: Path, required: list[str], span: ir.Span, rep: Reporter) -> None:
    """Every row of a JSONL file (its first CHECK_SCAN_BYTES; the runtime checks the rest
    before the first step): UTF-8, a JSON object, the fields present as strings."""
    try:
        for _ in scan_jsonl(path, required, limit=CHECK_SCAN_BYTES):
            pass
    except DataError as e:
        rep.error("E030", str(e), span, _ROWS_HINT)
    except OSError as e:
        rep.error("E030", f"`{display(path)}`: cannot read it ({e.strerror or e})", span, _ROWS_HINT)


def finish_datasets(datasets: dict[str, ir.Dataset], models: dict[str, ir.Model], rep: Reporter) -> dict:
    """Defaults and checks that need the models: the tokenizer (default: the first trainable,
    else first, checkpoint holding one), checked by `tokens.check_tokenizer`."""
    ckpts = sorted((m for m in models.values() if m.checkpoint and m.kind == "llama"),
                   key=lambda m: (not m.trainable, m.head is not ir.Head.LM))
    default = next((m.checkpoint for m in ckpts if (where := local_tokenizer(m.checkpoint)) is not None
                    and any(path_exists(where / f) for f in TOKENIZER_MAIN)), None)
    out = {}
    for name, ds in datasets.items():
        if ds.tokenizer is None and default is not None:
            ds = dataclasses.replace(ds, tokenizer=default)
        where = local_tokenizer(ds.tokenizer) if ds.tokenizer else None
        if where is not None:
            check_tokenizer(ds, where, models, rep)
        elif ds.chat and ds.tokenizer is None:
            rep.error("E024", f"`{name}` has `chat = true` but no tokenizer", ds.span,
                      'tokenizer = "DIR" (a Hugging Face tokenizer directory with a chat template)')
        out[name] = ds
    return out
