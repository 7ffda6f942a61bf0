"""The canonical layout of a `.rlhf` program, printed from its AST (`rlhfc fmt`).

Idempotent, and the output parses to the same AST modulo spans. Comments are kept:
each one is attached to the statement (or call) it precedes or ends the line of, so a
comment inside a reflowed statement moves above that statement, never disappears.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from rlhfc.frontend import ast

MAX_WIDTH = 100
INDENT = "    "
_GROUPED = (ast.Import, ast.ModelDecl, ast.DatasetDecl, ast.PlaceStmt)  # one-liners kept together


def _value(v: ast.Value) -> str:
    if isinstance(v, ast.Number):
        return v.text
    if isinstance(v, ast.String):
        return _string(v.value)
    if isinstance(v, ast.Bool):
        return "true" if v.value else "false"
    if isinstance(v, ast.Name):
        return v.text
    return f"{v.name.text}({', '.join(_option(o) for o in v.kwargs)})"


def _string(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _option(o: ast.Option) -> str:
    return f"{o.key.text} = {_value(o.value)}"


def _arg(a: ast.Arg) -> str:
    return _value(a.value) if a.key is None else f"{a.key.text} = {_value(a.value)}"


def _fill(items: list[str], sep: str, width: int) -> list[str]:
    """Items joined by `sep` into lines of at most `width` (an over-long item gets its own line)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(sep) + len(item) <= width:
            lines[-1] += sep + item
        else:
            lines.append(item)
    return lines


def _block(head: str, items: list[str]) -> list[str]:
    """`head { a  b }` on one line when it fits, else the items filled into indented lines."""
    one_line = f"{head} {{ {'  '.join(items)} }}" if items else f"{head} {{}}"
    if len(one_line) <= MAX_WIDTH:
        return [one_line]
    return [f"{head} {{"] + [INDENT + line for line in _fill(items, "  ", MAX_WIDTH - len(INDENT))] + ["}"]


def _constructor(prefix: str, args: tuple[ast.Arg, ...]) -> list[str]:
    """`prefix(a, b, …)`, continuation lines aligned under the first argument when too long."""
    texts = [_arg(a) for a in args]
    one_line = f"{prefix}({', '.join(texts)})"
    if len(one_line) <= MAX_WIDTH:
        return [one_line]
    pieces = [t + "," for t in texts[:-1]] + [texts[-1] + ")"]
    lines = _fill(pieces, " ", MAX_WIDTH - len(prefix) - 1)
    return [prefix + "(" + lines[0]] + [" " * (len(prefix) + 1) + line for line in lines[1:]]


def _model(s: ast.ModelDecl, pad: int) -> list[str]:
    lines = _constructor(f"model {s.name.text.ljust(pad)} = {s.family.text}", s.args)
    if s.body is None:
        return lines
    items = [i.name if isinstance(i, ast.Flag) else _option(i) for i in s.body]
    return lines[:-1] + _block(lines[-1], items)


def _dataset(s: ast.DatasetDecl, pad: int) -> list[str]:
    return _constructor(f"dataset {s.name.text.ljust(pad)} = {s.format.text}", s.args)


def _mesh(m: ast.MeshRef) -> str:
    return m.base.text if m.start is None else f"{m.base.text}[{m.start}:{m.stop}]"


def _call_parts(c: ast.CallStmt, pad: int) -> tuple[str, str]:
    head = f"{c.name.text.ljust(pad)} = {c.model.text}.{c.kind.text}({', '.join(i.text for i in c.inputs)})"
    tail = ""
    if c.outputs:
        tail += f" -> {', '.join(o.text for o in c.outputs)}"
    if c.interface is not None:
        tail += f"  using {c.interface.text}"
    if c.options is not None:
        tail += "  { " + "  ".join(_option(o) for o in c.options) + " }" if c.options else "  {}"
    return head, tail


@dataclass
class _Notes:
    """Comments attached to one statement or call: above it, and at the end of its line."""

    leading: list[tuple[ast.Comment, bool]] = field(default_factory=list)  # (comment, blank line after)
    trailing: list[ast.Comment] = field(default_factory=list)


def _pos(span) -> tuple[int, int]:
    return span.line, span.col


def _end(span) -> tuple[int, int]:
    return span.end_line, span.end_col


@dataclass(frozen=True)
class _InOrder:
    """Items in source order (they never overlap) with their start and end positions, so the
    item around or next to a comment is a binary search: formatting is linear in comments."""

    items: tuple
    starts: tuple[tuple[int, int], ...]
    ends: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, items) -> _InOrder:
        return cls(tuple(items), tuple(_pos(i.span) for i in items), tuple(_end(i.span) for i in items))

    def around(self, where: tuple[int, int]):
        """The item that starts at or before `where` and ends after it, or None."""
        i = bisect_right(self.starts, where) - 1
        return self.items[i] if i >= 0 and where < self.ends[i] else None

    def ending_before(self, where: tuple[int, int]):
        i = bisect_right(self.ends, where) - 1
        return self.items[i] if i >= 0 else None

    def starting_after(self, where: tuple[int, int]):
        i = bisect_right(self.starts, where)
        return self.items[i] if i < len(self.items) else None


def _attach(program: ast.Program):
    """Assigns every comment to a statement, a call, a dataflow's closing brace, or the file's end."""
    notes: dict[int, _Notes] = {}
    closing: dict[int, list[tuple[ast.Comment, bool]]] = {}
    tail: list[tuple[ast.Comment, bool]] = []
    stmts = _InOrder.of(program.statements)
    calls = {id(s): _InOrder.of(s.calls) for s in stmts.items if isinstance(s, ast.DataflowDecl)}
    starts = sorted([c.span.line for c in program.comments] + [s.span.line for s in stmts.items]
                    + [c.span.line for flow in calls.values() for c in flow.items])
    for comment in program.comments:
        k = bisect_right(starts, comment.span.end_line)  # the next line anything starts on
        blank = k < len(starts) and starts[k] - comment.span.end_line > 1
        where = _pos(comment.span)
        owner = stmts.around(where)
        if isinstance(owner, ast.DataflowDecl) and owner.calls and where > _pos(owner.calls[0].span):
            _place(comment, blank, calls[id(owner)], notes, closing.setdefault(id(owner), []))
        elif isinstance(owner, ast.DataflowDecl) and owner.calls:
            notes.setdefault(id(owner.calls[0]), _Notes()).leading.append((comment, False))
        elif owner is not None:
            notes.setdefault(id(owner), _Notes()).leading.append((comment, False))
        else:
            _place(comment, blank, stmts, notes, tail)
    return notes, closing, tail


def _place(comment: ast.Comment, blank: bool, items: _InOrder, notes: dict[int, _Notes], rest: list) -> None:
    """Trailing comment of the item ending on its line, else leading comment of the next item."""
    where = _pos(comment.span)
    before, after = items.ending_before(where), items.starting_after(where)
    if before is not None and before.span.end_line == comment.span.line:
        notes.setdefault(id(before), _Notes()).trailing.append(comment)
        return
    entry = (comment, blank)
    if after is not None:
        notes.setdefault(id(after), _Notes()).leading.append(entry)
    else:
        rest.append(entry)


def _with_notes(lines: list[str], note: _Notes | None, indent: str) -> list[str]:
    if note is None:
        return [indent + line for line in lines]
    out = _comment_lines(note.leading, indent)
    body = [indent + line for line in lines]
    if note.trailing:
        body[-1] += "  " + "  ".join(c.text for c in note.trailing)
    return out + body


def _comment_lines(entries, indent: str) -> list[str]:
    """Comments on their own lines (block comments keep their inner lines verbatim)."""
    out = []
    for comment, blank in entries:
        out += [indent + part if i == 0 else part for i, part in enumerate(comment.text.split("\n"))]
        if blank:
            out.append("")
    return out


def _statement(s, pad: tuple[int, int], notes, closing) -> list[str]:
    if isinstance(s, ast.Import):
        return [f"import {', '.join(n.text for n in s.names)} from {_string(s.path.value)}"]
    if isinstance(s, ast.ClusterDecl):
        return _block("cluster", [_option(o) for o in s.options])
    if isinstance(s, ast.ModelDecl):
        return _model(s, pad[0])
    if isinstance(s, ast.DatasetDecl):
        return _dataset(s, pad[0])
    if isinstance(s, ast.RunStmt):
        head = f"run {s.dataflow.text}({', '.join(a.text for a in s.args)})"
        return [head] if s.options is None else _block(head, [_option(o) for o in s.options])
    if isinstance(s, ast.PlaceStmt):
        mesh = _mesh(s.mesh).ljust(pad[1])
        return [f"place {s.call.text.ljust(pad[0])} on {mesh}  {'  '.join(_option(o) for o in s.options)}".rstrip()]
    lines = [f"dataflow {s.name.text}({', '.join(p.text for p in s.params)}) {{"]
    width = max((len(c.name.text) for c in s.calls), default=0)
    parts = [_call_parts(c, width) for c in s.calls]
    col = max((len(h) for h, _ in parts), default=0)  # `->` lines up after the longest call
    for call, (head, tail) in zip(s.calls, parts):
        text = head.ljust(col) + tail if call.outputs else head + tail
        lines += _with_notes([text], notes.get(id(call)), INDENT)
    lines += _comment_lines(closing.get(id(s), []), INDENT)
    while lines[-1] == "":
        lines.pop()
    return lines + ["}"]


def _pads(stmts) -> dict[int, tuple[int, int]]:
    """Column widths shared by a run of consecutive models, datasets or pins, for alignment:
    the name width (models, datasets, pinned calls) and the mesh width (pins)."""
    pads, i = {}, 0
    while i < len(stmts):
        j = i
        while j < len(stmts) and type(stmts[j]) is type(stmts[i]):
            j += 1
        run = stmts[i:j]
        if isinstance(stmts[i], (ast.ModelDecl, ast.DatasetDecl)):
            widths = (max(len(s.name.text) for s in run), 0)
            pads.update({id(s): widths for s in run})
        elif isinstance(stmts[i], ast.PlaceStmt):
            widths = (max(len(s.call.text) for s in run), max(len(_mesh(s.mesh)) for s in run))
            pads.update({id(s): widths for s in run})
        i = j
    return pads


def format_program(program: ast.Program) -> str:
    """The canonical text of a program (ends with exactly one newline)."""
    notes, closing, tail = _attach(program)
    pads = _pads(program.statements)
    out: list[str] = []
    previous = None
    for s in program.statements:
        lines = _statement(s, pads.get(id(s), (0, 0)), notes, closing)
        together = (previous is not None and type(previous) is type(s) and isinstance(s, _GROUPED)
                    and not (notes.get(id(s)) and notes[id(s)].leading))
        if previous is not None and not together:
            out.append("")
        out += _with_notes(lines, notes.get(id(s)), "")
        previous = s
    if tail:
        if out:
            out.append("")
        out += _comment_lines(tail, "")
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n" if out else ""
