"""Shared by the checker's passes: the diagnostics reporter, typed option reads, path helpers, names."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhfc import ir
from rlhfc.diagnostics import Diagnostic, Severity
from rlhfc.frontend import ast
from rlhfc.hardware import OVERRIDE_KEYS

# The device names a `cluster` may use, when the planner's hardware catalog is absent.
FALLBACK_DEVICE_NAMES: tuple[str, ...] = ("H100-80GB", "H200", "A100-80GB", "A100-40GB", "cpu")


def device_names() -> tuple[str, ...]:
    """Catalog names accepted by `cluster { device = … }`: the hardware catalog's, one source of truth."""
    try:
        from rlhfc.hardware import DEVICE_NAMES
    except ImportError:
        return FALLBACK_DEVICE_NAMES
    return DEVICE_NAMES


CALL_KINDS = tuple(k.value for k in ir.CallKind)
# A call's own option keys besides the settings its interface reads (the contract's): its
# generation length. Micro-batches are the plan's (the token budget it chooses), pinned
# by `place` only.
CALL_KEYS = ("max_new_tokens",)
CLUSTER_COUNTS = ("nodes", "devices_per_node")
CLUSTER_OVERRIDES = OVERRIDE_KEYS  # device figures a `cluster` block may set: the catalog's own list
DATASET_FIELDS = ("field", "prompt", "chosen", "rejected", "response")
# The constructors of a neural model: `hf(...)`, and `llama(...)`, its older spelling.
DECODERS = ("hf", "llama")
OPTIMIZERS = ("adam", "adamw")
DEFAULT_OPTIMIZER = ir.Optimizer("adam", (("lr", 1e-5),))
STDLIB_PREFIX = "stdlib/"


def display(path: Path) -> str:
    """How a file is named in diagnostics: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def path_exists(path: Path) -> bool:
    """`path.exists()` that treats unusable names (too long, NUL bytes) as absent."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def resolved_path(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError):
        return path


def suggest(word: str, choices) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean `{close[0]}`?" if close else None


class Reporter:
    """Collects diagnostics and the source lines they point at."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []
        self.texts: dict[str, list[str]] = {}

    def add(self, severity: Severity, code: str, message: str, span: ir.Span | None, hint: str | None):
        lines = self.texts.get(span.file, []) if span else []
        line_text = lines[span.line - 1] if span and 0 < span.line <= len(lines) else None
        self.diagnostics.append(Diagnostic(severity, code, message, span, hint, line_text))

    def error(self, code: str, message: str, span: ir.Span | None, hint: str | None = None) -> None:
        self.add(Severity.ERROR, code, message, span, hint)

    def warning(self, code: str, message: str, span: ir.Span | None, hint: str | None = None) -> None:
        self.add(Severity.WARNING, code, message, span, hint)

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.diagnostics)


@dataclass
class Unit:
    """One parsed file and its top-level names."""

    path: Path
    display: str
    program: ast.Program
    dataflows: dict[str, tuple[Unit, ast.DataflowDecl]] = field(default_factory=dict)
    models: dict[str, ast.ModelDecl] = field(default_factory=dict)
    datasets: dict[str, ast.DatasetDecl] = field(default_factory=dict)

    def statements(self, kind):
        return [s for s in self.program.statements if isinstance(s, kind)]






def plain_value(value: ast.Value):
    """A literal's Python value; names become their text; functions are not plain."""
    if isinstance(value, (ast.Number, ast.String, ast.Bool)):
        return value.value
    if isinstance(value, ast.Name):
        return value.text
    return None


def describe(value: ast.Value) -> str:
    return {ast.Number: "a number", ast.String: "a string", ast.Bool: "a boolean",
            ast.Name: "a name", ast.Func: "a function"}[type(value)]


class Values:
    """Typed reads of option values that report E022 instead of failing."""

    def __init__(self, rep: Reporter) -> None:
        self.rep = rep

    def positive_int(self, opt: ast.Option | ast.Arg, code: str = "E022") -> int | None:
        v = opt.value
        if isinstance(v, ast.Number) and isinstance(v.value, int) and v.value >= 1:
            return v.value
        self.rep.error(code, f"`{opt.key.text}` must be a positive integer, not {describe(v)} `{value_text(v)}`",
                       v.span)
        return None

    def natural(self, opt: ast.Option) -> int | None:
        """A non-negative integer (seeds)."""
        if isinstance(opt.value, ast.Number) and isinstance(opt.value.value, int) and opt.value.value >= 0:
            return opt.value.value
        self.rep.error("E022", f"`{opt.key.text}` must be an integer >= 0, not `{value_text(opt.value)}`", opt.value.span)
        return None

    def positive_number(self, opt: ast.Option, code: str = "E022") -> float | int | None:
        v = opt.value
        if isinstance(v, ast.Number) and 0 < v.value < float("inf"):
            return v.value
        self.rep.error(code, f"`{opt.key.text}` must be a positive number, not {describe(v)} `{value_text(v)}`",
                       v.span)
        return None

    def string(self, opt: ast.Option | ast.Arg) -> str | None:
        if isinstance(opt.value, ast.String):
            return opt.value.value
        key = opt.key.text if opt.key else "argument"
        self.rep.error("E022", f"`{key}` must be a string, not {describe(opt.value)}", opt.value.span,
                       'write it in double quotes: "…"')
        return None

    def plain(self, opt: ast.Option):
        if isinstance(opt.value, ast.Func):
            self.rep.error("E022", f"`{opt.key.text}` takes a plain value, not a function", opt.value.span)
            return None
        return plain_value(opt.value)

    def unknown(self, key: ast.Name, known, where: str) -> None:
        hint = suggest(key.text, known) or f"known keys: {', '.join(known)}"
        self.rep.error("E022", f"unknown key `{key.text}` in {where}", key.span, hint)


def value_text(value: ast.Value) -> str:
    if isinstance(value, ast.Number):
        return value.text
    if isinstance(value, ast.String):
        return json.dumps(value.value)
    if isinstance(value, ast.Bool):
        return "true" if value.value else "false"
    if isinstance(value, ast.Name):
        return value.text
    return f"{value.name.text}(…)"


def by_key(opts, rep: Reporter, where: str) -> dict[str, ast.Option]:
    """Options by key, reporting repeated keys (E003)."""
    table: dict[str, ast.Option] = {}
    for opt in opts or ():
        if opt.key.text in table:
            rep.error("E003", f"`{opt.key.text}` is set twice in {where}", opt.key.span)
        else:
            table[opt.key.text] = opt
    return table
