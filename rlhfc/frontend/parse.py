"""Text → AST: the lark LALR parser for `.rlhf` and the tree transformer.

Syntax errors become `E001` diagnostics naming the expected tokens; no input, however
malformed (binary, huge, deeply nested), escapes as a Python exception.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from rlhfc.frontend import ast
from rlhfc.diagnostics import CompileError, Diagnostic, Severity
from rlhfc.ir import Span

MAX_SOURCE_BYTES = 1 << 20  # a real program is a few KB; this bounds time and memory

_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE = re.compile(r"^(-?[0-9]+(?:\.[0-9]+)?)([KMGT]i?B)(/s)?$")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}

# Friendlier names for the grammar's regex terminals in "expected ..." hints.
_TERMINAL_NAMES = {"IDENT": "a name", "INT": "an integer", "FLOAT": "a number", "SIZE": "a size",
                   "STRING": "a string", "TRUE": "`true`", "FALSE": "`false`",
                   "TRAINABLE": "`trainable`", "$END": "end of file"}


class _CommentSink:
    """Where the lexer callbacks put comments during one parse (the parser is shared)."""

    comments: list[Token] = []


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    """The LALR parser, built once per process from the shipped grammar."""
    grammar = resources.files("rlhfc_grammar").joinpath("rlhf.lark").read_text(encoding="utf-8")
    def keep(token: Token) -> Token:
        _CommentSink.comments.append(token)
        return token

    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={"LINE_COMMENT": keep, "BLOCK_COMMENT": keep}, cache=True)


def _span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _unescape(literal: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES[m.group(1)], literal[1:-1])


MAX_NUMBER_DIGITS = 30


class _BadLiteral(Exception):
    """A token the grammar accepts but no value fits (a 5000-digit number)."""

    def __init__(self, token: Token, message: str):
        super().__init__(message)
        self.token = token


def _number(token: Token) -> int | float:
    """The value of a number token: sizes in bytes (bandwidths in bytes per second)."""
    text = str(token)
    if sum(c.isdigit() for c in text) > MAX_NUMBER_DIGITS:
        raise _BadLiteral(token, f"number literal longer than {MAX_NUMBER_DIGITS} digits")
    match = _SIZE.match(text)
    if match:
        amount = float(match.group(1)) * _UNITS[match.group(2)]
        return int(amount) if amount == int(amount) else amount
    if token.type == "INT":
        return int(text)
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadLiteral(token, f"number literal `{text}` is too large to be a finite number")
    return value


class _ToAst(Transformer):
    """Builds `rlhfc.frontend.ast` nodes from lark trees; every node gets its span."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    @v_args(meta=True)
    def start(self, meta, items):
        span = _span(self.file, meta) if not meta.empty else Span(self.file, 1, 1, 1, 1)
        return ast.Program(tuple(items), (), span)

    def name(self, children):
        (tok,) = children
        return ast.Name(str(tok), self._tok_span(tok))

    def number(self, children):
        (tok,) = children
        return ast.Number(_number(tok), str(tok), self._tok_span(tok))

    def string(self, children):
        (tok,) = children
        return ast.String(_unescape(str(tok)), self._tok_span(tok))

    def true(self, children):
        return ast.Bool(True, self._tok_span(children[0]))

    def false(self, children):
        return ast.Bool(False, self._tok_span(children[0]))

    def flag(self, children):
        return ast.Flag(str(children[0]), self._tok_span(children[0]))

    def names(self, children):
        return tuple(children)

    args = kwargs = names

    def block(self, children):
        return tuple(children)

    model_body = block

    def outputs(self, children):
        return children[0]

    def using(self, children):
        return children[0]

    @v_args(meta=True)
    def option(self, meta, children):
        key, value = children
        return ast.Option(key, value, _span(self.file, meta))

    kwarg = option

    @v_args(meta=True)
    def positional(self, meta, children):
        return ast.Arg(None, children[0], _span(self.file, meta))

    @v_args(meta=True)
    def keyword(self, meta, children):
        return ast.Arg(children[0], children[1], _span(self.file, meta))

    @v_args(meta=True)
    def func(self, meta, children):
        return ast.Func(children[0], children[1] or (), _span(self.file, meta))

    @v_args(meta=True)
    def import_stmt(self, meta, children):
        return ast.Import(tuple(children[:-1]), children[-1], _span(self.file, meta))

    @v_args(meta=True)
    def cluster_stmt(self, meta, children):
        return ast.ClusterDecl(children[0], _span(self.file, meta))

    @v_args(meta=True)
    def model_stmt(self, meta, children):
        name, family, args, body = children
        return ast.ModelDecl(name, family, args or (), body, _span(self.file, meta))

    @v_args(meta=True)
    def dataset_stmt(self, meta, children):
        name, fmt, args = children
        return ast.DatasetDecl(name, fmt, args or (), _span(self.file, meta))

    @v_args(meta=True)
    def dataflow_stmt(self, meta, children):
        name, params, *calls = children
        return ast.DataflowDecl(name, params or (), tuple(calls), _span(self.file, meta))

    @v_args(meta=True)
    def call(self, meta, children):
        name, model, kind, inputs, outputs, interface, options = children
        return ast.CallStmt(name, model, kind, inputs or (), outputs or (), interface, options,
                            _span(self.file, meta))

    @v_args(meta=True)
    def run_stmt(self, meta, children):
        dataflow, args, options = children
        return ast.RunStmt(dataflow, args or (), options, _span(self.file, meta))

    @v_args(meta=True)
    def mesh(self, meta, children):
        base, start, stop = children
        return ast.MeshRef(base, None if start is None else _number(start),
                           None if stop is None else _number(stop), _span(self.file, meta))

    @v_args(meta=True)
    def place_stmt(self, meta, children):
        call, mesh, *options = children
        return ast.PlaceStmt(call, mesh, tuple(options), _span(self.file, meta))


def _describe_expected(expected) -> str:
    """`expected one of: a name, `{`, ...` from lark's terminal names, sorted, deduplicated."""
    terminals = {t.name: t for t in _parser().terminals}
    words = set()
    for name in expected:
        if name in _TERMINAL_NAMES:
            words.add(_TERMINAL_NAMES[name])
        elif name in terminals and isinstance(terminals[name].pattern, lark.lexer.PatternStr):
            words.add(f"`{terminals[name].pattern.value}`")
        else:
            words.add(name.lower())
    return ", ".join(sorted(words))


def _line(text: str, line: int) -> str | None:
    lines = text.split("\n")
    return lines[line - 1] if 0 < line <= len(lines) else None


def syntax_diagnostic(file: str, text: str, error: lark.exceptions.UnexpectedInput) -> Diagnostic:
    """An E001 diagnostic for a lark error: where, what was found, what was expected."""
    line, col = max(getattr(error, "line", 1), 1), max(getattr(error, "column", 1), 1)
    if isinstance(error, lark.exceptions.UnexpectedToken) and error.token.type == "$END":
        lines = text.rstrip().split("\n")  # point just after the last real token
        line, col = len(lines), len(lines[-1]) + 1
        message, width = "unexpected end of file", 1
    elif isinstance(error, lark.exceptions.UnexpectedToken):
        message, width = f"unexpected `{error.token}`", max(len(str(error.token).splitlines()[0]), 1)
    elif isinstance(error, lark.exceptions.UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else "?"
        message, width = f"unexpected character {char!r}", 1
    else:  # UnexpectedEOF
        message, width = "unexpected end of file", 1
    expected = getattr(error, "expected", None) or getattr(error, "allowed", None) or set()
    if isinstance(error, lark.exceptions.UnexpectedToken) and error.interactive_parser is not None:
        expected = error.interactive_parser.accepts() or expected  # exact, unlike LALR's expected set
    hint = f"expected one of: {_describe_expected(expected)}" if expected else None
    if isinstance(error, lark.exceptions.UnexpectedCharacters) and text[error.pos_in_stream:error.pos_in_stream + 1] == '"':
        hint = "strings are double-quoted on one line; escapes are \\\" \\\\ \\n \\t"
    return Diagnostic(Severity.ERROR, "E001", message, Span(file, line, col, line, col + width),
                      hint, _line(text, line))


MAX_SYNTAX_ERRORS = 20
_STATEMENT_START = re.compile(r"^(import|cluster|model|dataset|dataflow|run|place)\b", re.M)


def _error_offset(text: str, error: lark.exceptions.UnexpectedInput) -> int:
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        return error.pos_in_stream
    token = getattr(error, "token", None)
    if token is not None and token.type != "$END" and token.start_pos is not None:
        return token.start_pos
    return len(text)


def _syntax_errors(text: str, file: str, first: lark.exceptions.UnexpectedInput) -> list[Diagnostic]:
    """Every broken statement, not only the first: after an error, blank out the text up to
    the next line that starts a top-level statement (positions stay put) and parse again."""
    diagnostics, error = [syntax_diagnostic(file, text, first)], first
    while len(diagnostics) < MAX_SYNTAX_ERRORS:
        resume = _STATEMENT_START.search(text, _error_offset(text, error) + 1)
        if resume is None:
            break
        blanked = re.sub(r"[^\n]", " ", text[:resume.start()]) + text[resume.start():]
        try:
            _parser().parse(blanked)
            break
        except lark.exceptions.UnexpectedInput as again:
            error = again
            diagnostics.append(syntax_diagnostic(file, text, again))
    return diagnostics


def parse_text(text: str, file: str = "<input>") -> ast.Program:
    """Parse source text; raises `CompileError` with an E001 diagnostic per broken statement."""
    _CommentSink.comments = []
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as error:
        raise CompileError(_syntax_errors(text, file, error)) from None
    finally:
        tokens, _CommentSink.comments = _CommentSink.comments, []
    try:
        program = _ToAst(file).transform(tree)
    except lark.exceptions.VisitError as error:
        if not isinstance(error.orig_exc, _BadLiteral):
            raise
        tok = error.orig_exc.token
        raise CompileError([Diagnostic(Severity.ERROR, "E001", str(error.orig_exc),
                                       Span(file, tok.line, tok.column, tok.end_line, tok.end_column),
                                       "write a smaller number, or a size with a unit (80GiB)",
                                       _line(text, tok.line))]) from None
    comments = tuple(ast.Comment(str(t), Span(file, t.line, t.column, t.end_line, t.end_column))
                     for t in tokens)
    return ast.Program(program.statements, comments, program.span)


def read_source(path, display: str | None = None) -> str:
    """A program's text, or a `CompileError` (E020) if it is missing, a directory, binary or huge."""
    path = Path(path)
    shown = display or str(path)

    def fail(message: str, hint: str | None = None):
        return CompileError([Diagnostic(Severity.ERROR, "E020", message, Span(shown, 1, 1, 1, 1), hint)])

    from rlhfc.files import FileProblem, read_bytes

    try:
        if path.is_dir():
            raise fail(f"`{shown}` is a directory, not a .rlhf file")
        data = read_bytes(path, MAX_SOURCE_BYTES, "program")
    except CompileError:
        raise
    except FileProblem as error:
        raise fail(str(error).replace(str(path), shown)) from None
    except (OSError, ValueError) as error:
        raise fail(f"cannot read `{shown}`: {getattr(error, 'strerror', None) or error}") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise fail(f"`{shown}` is larger than {MAX_SOURCE_BYTES // 1024} KiB", "is this really a .rlhf program?")
    if b"\x00" in data:
        raise fail(f"`{shown}` is a binary file, not a .rlhf program")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise fail(f"`{shown}` is not UTF-8 text (byte {error.start})") from None


def parse_file(path, display: str | None = None) -> tuple[str, ast.Program]:
    """Read and parse one file: (text, program), or `CompileError`."""
    text = read_source(path, display)
    return text, parse_text(text, display or str(path))
