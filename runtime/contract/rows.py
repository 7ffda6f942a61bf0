"""Dataset rows as the checker and the runtime both validate them: every error starts
with FILE:LINE (JSONL) or FILE:row N, names no file contents, and needs no traceback.

`rlhfc check` scans JSONL files up to `CHECK_SCAN_BYTES` whole (larger ones: the first
row), the runtime scans every file before the first step. Pure Python, no torch."""

from __future__ import annotations

import codecs
import json
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

CHECK_SCAN_BYTES = 64 << 20


class DataError(ValueError):
    """A located problem with a dataset or tokenizer file (the message starts with FILE:LINE)."""

    located = True  # a worker reports the message alone, its traceback would add nothing


def regular(path: Path, what: str, directory_ok: bool = False) -> None:
    """Refuse, without opening it, a path that is missing, a FIFO, a device, or a directory
    (unless `directory_ok`): opening a FIFO would block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError(f"{path}:1: {what} not found") from None
    except OSError as e:
        raise DataError(f"{path}:1: cannot read the {what}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode) and not directory_ok:
        raise DataError(f"{path}:1: the {what} is a directory; give a file")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{path}:1: the {what} is not a regular file (a FIFO, socket or device)")


MAX_DEPTH = 100  # arrays and objects a row may nest: deeper ones are refused, never parsed recursively


def parse_row(line: bytes, path: Path, line_no: int) -> dict:
    """One JSONL row (line 1 may start with a UTF-8 byte order mark, which is skipped)."""
    if line_no == 1 and line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8):]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_no}:{e.start + 1}: not UTF-8 text (byte 0x{line[e.start]:02x})") from None
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and (col := _too_deep(text)):
        raise DataError(f"{path}:{line_no}:{col}: the row nests arrays or objects more than {MAX_DEPTH} levels deep")
    try:
        row = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{line_no}:1: a row must be a JSON object, not {type(row).__name__}"
                        f" (hint: one object per line, such as {{\"prompt\": \"…\"}})")
    return row


def _too_deep(text: str) -> int | None:
    """The column of the bracket that opens nesting level MAX_DEPTH + 1 of `text` (JSON), or
    None; a loop, so no depth of nesting can exhaust the stack."""
    depth, in_string, escaped = 0, False, False
    for col, ch in enumerate(text, 1):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return col
        elif ch in "]}":
            depth -= 1
    return None


def check_row(row: dict, required: Sequence[str], where: str) -> None:
    missing = [k for k in required if not isinstance(row.get(k), str)]
    if missing:
        raise DataError(f"{where}: missing string field(s) {', '.join(missing)} "
                        f"(the row has: {', '.join(row) or 'no fields'}; hint: set the dataset's field names to these keys)")


def scan_jsonl(path: Path, required: Sequence[str], limit: int | None = None) -> Iterator[tuple[int, int, dict]]:
    """(byte offset, line number, row) of every non-blank line, each checked; stops after
    `limit` bytes when given. DataError at the first bad line."""
    regular(path, "dataset file")
    with open(path, "rb") as f:
        offset = 0
        for line_no, line in enumerate(f, 1):
            if limit is not None and offset >= limit:
                return
            if line.strip():
                row = parse_row(line, path, line_no)
                check_row(row, required, f"{path}:{line_no}")
                yield offset, line_no, row
            offset += len(line)


TOKENIZER_BYTES = 512 << 20


def tokenizer_file(path: Path) -> Path:
    """The tokenizer.json of a tokenizer path (the file, or the one in a directory); DataError
    naming the directory and what it lacks when it holds none (the runtime loads fast
    tokenizers from tokenizer.json only: without one, transformers would try sentencepiece)."""
    regular(path, "tokenizer", directory_ok=True)
    if not os.path.isdir(path):
        return Path(path)
    file = Path(path) / "tokenizer.json"
    if not os.path.exists(file):
        lacks = ("no tokenizer.json" if os.path.exists(Path(path) / "tokenizer_config.json")
                 else "neither tokenizer.json nor tokenizer_config.json")
        try:
            held = sorted(os.listdir(path))
            has = f"it holds {', '.join(held[:6])}{', …' if len(held) > 6 else ''}" if held else "it is empty"
        except OSError as e:
            has = f"it cannot be listed: {e.strerror or e}"
        raise DataError(f"{path}:1: the tokenizer directory has {lacks} ({has})")
    return file


def tokenizer_json(file: Path) -> dict:
    """A tokenizer.json file as a dict; DataError at FILE:LINE:COL when it is not one."""
    regular(file, "tokenizer")
    if os.stat(file).st_size > TOKENIZER_BYTES:
        raise DataError(f"{file}:1: the tokenizer is larger than {TOKENIZER_BYTES >> 20} MiB")
    data = Path(file).read_bytes()
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{file}:1:{e.start + 1}: the tokenizer is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}:{e.colno}: the tokenizer is not JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{file}:1:1: the tokenizer nests arrays or objects too deeply to read") from None
    if not isinstance(doc, dict):
        raise DataError(f"{file}:1:1: the tokenizer must be a JSON object, not {type(doc).__name__}")
    return doc
