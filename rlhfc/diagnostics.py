"""Compiler diagnostics: codes, messages, spans, hints, and their rustc-style rendering.

Every user-facing error of the front end is a `Diagnostic`; `CompileError` carries all
of a file's diagnostics at once so the user fixes them in one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from rlhfc.ir import Span


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


# One line per code: the catalogue `docs/language.md` documents and the tests cover.
CODES: dict[str, str] = {
    "E001": "syntax error",
    "E002": "undefined name",
    "E003": "duplicate name",
    "E004": "data key consumed but never produced",
    "E005": "data key produced more than once",
    "E006": "cycle within one iteration",
    "E007": "train call on a frozen model",
    "E008": "unknown interface",
    "E009": "unknown rule",
    "E010": "interface arity mismatch",
    "E011": "interface / model head mismatch",
    "E012": "call kind not allowed here",
    "E013": "wrong number of arguments in `run`",
    "E014": "tensor parallel degree does not divide the head count",
    "E015": "mesh outside the cluster",
    "E016": "dp * tp * pp differs from the mesh size",
    "E017": "missing or unreadable checkpoint config, or a hub id that cannot be resolved",
    "E018": "bad cluster value",
    "E019": "unknown device",
    "E020": "cannot read file or import",
    "E021": "import cycle",
    "E022": "unknown key or bad value",
    "E023": "argument of the wrong sort (model vs dataset)",
    "E024": "missing required value",
    "E025": "unknown model preset",
    "E026": "sequence longer than the model's max_positions",
    "E027": "no plan fits the cluster",
    "E028": "two train calls on one model",
    "E029": "reward function or score key not found (or its file does not parse)",
    "E030": "dataset field missing, or its file unreadable",
    "E031": "tokenizer does not fit the model, or has no chat template",
    "E032": "nothing to plan: a dataflow without calls, or a program without `run`",
    "E033": "the generate call's engine cannot run this model here (family, head_dim on CPU, package missing)",
    "E034": "max_staleness needs a generate call whose model a train call updates",
    "W001": "dataset file not found at check time",
    "W002": "model or dataset declared but not used by the `run`",
}


@dataclass(frozen=True)
class Diagnostic:
    """One finding: `line_text` is the source line of `span.line`, captured when made."""

    severity: Severity
    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    line_text: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR


def located(severity: Severity, code: str, message: str, span: Span | None, hint: str | None = None) -> Diagnostic:
    """A diagnostic made after parsing (planner): its source line read back from the span's file."""
    line_text = None
    if span is not None:
        try:
            with open(span.file, encoding="utf-8", errors="replace") as f:
                line_text = next((ln.rstrip("\n") for i, ln in enumerate(f, 1) if i == span.line), None)
        except (OSError, ValueError):
            pass
    return Diagnostic(severity, code, message, span, hint, line_text)


@dataclass
class CompileError(Exception):
    """The program has errors; `diagnostics` holds all of them (and any warnings)."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __str__(self) -> str:
        return render(self.diagnostics)


_COLORS = {Severity.ERROR: "\x1b[1;31m", Severity.WARNING: "\x1b[1;33m"}
_BLUE, _BOLD, _RESET = "\x1b[1;34m", "\x1b[1m", "\x1b[0m"


def render_one(d: Diagnostic, color: bool = False) -> str:
    """rustc-style text: header, `--> file:line:col`, the source line, carets, hint."""

    def paint(text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    head = paint(f"{d.severity.value}[{d.code}]", _COLORS[d.severity]) + paint(f": {d.message}", _BOLD)
    lines = [head]
    if d.span is not None:
        gutter = " " * len(str(d.span.line))
        lines.append(f"{gutter}{paint('-->', _BLUE)} {d.span.file}:{d.span.line}:{d.span.col}")
        if d.line_text is not None:
            raw = d.line_text.rstrip("\r")
            start = max(d.span.col - 1, 0)
            end = d.span.end_col - 1 if d.span.end_line == d.span.line else len(raw)
            # Tabs become spaces; measure the caret's offset and width after expansion.
            before = len(raw[:start].expandtabs(4))
            width = max(1, len(raw[:max(end, start)].expandtabs(4)) - before)
            lines.append(f"{gutter} {paint('|', _BLUE)}")
            lines.append(f"{paint(str(d.span.line), _BLUE)} {paint('|', _BLUE)} {raw.expandtabs(4)}")
            carets = paint("^" * width, _COLORS[d.severity])
            lines.append(f"{gutter} {paint('|', _BLUE)} {' ' * before}{carets}")
    if d.hint:
        pad = " " * (len(str(d.span.line)) if d.span else 0)
        lines.append(f"{pad} = hint: {d.hint}")
    return "\n".join(lines)


def render(diagnostics, color: bool = False) -> str:
    """All diagnostics, blank-line separated, plus an error count line when there are errors."""
    parts = [render_one(d, color) for d in diagnostics]
    n_errors = sum(d.is_error for d in diagnostics)
    if n_errors:
        parts.append(f"error: could not compile: {n_errors} error{'s' if n_errors != 1 else ''}")
    return "\n\n".join(parts) + ("\n" if parts else "")
