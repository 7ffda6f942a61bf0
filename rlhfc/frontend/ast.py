"""The syntax tree of a `.rlhf` file: what `parse` returns and `check` and `fmt` read.

Frozen dataclasses, one per construct, each with the `Span` it came from so that every
diagnostic can point at source. Values keep their literal text so that `fmt` prints
them exactly as written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rlhfc.ir import Span


@dataclass(frozen=True)
class Name:
    """An identifier where it occurs (a declaration, a reference, a key)."""

    text: str
    span: Span


@dataclass(frozen=True)
class Number:
    """A number literal; sizes (`80GiB`) and bandwidths (`900GB/s`) are numbers too."""

    value: int | float
    text: str
    span: Span


@dataclass(frozen=True)
class String:
    """A string literal, already unescaped; `fmt` escapes it again."""

    value: str
    span: Span


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True)
class Func:
    """A function-like value with keyword arguments: `adam(lr = 1e-6)`."""

    name: Name
    kwargs: tuple[Option, ...]
    span: Span


Value = Number | String | Bool | Name | Func


@dataclass(frozen=True)
class Option:
    """`key = value`, in blocks, keyword arguments and pins."""

    key: Name
    value: Value
    span: Span


@dataclass(frozen=True)
class Arg:
    """A call argument of a `model` / `dataset` constructor: positional (key None) or keyword."""

    key: Name | None
    value: Value
    span: Span


@dataclass(frozen=True)
class Flag:
    """A bare word in a model body: `trainable`."""

    name: str
    span: Span


@dataclass(frozen=True)
class Import:
    names: tuple[Name, ...]
    path: String
    span: Span


@dataclass(frozen=True)
class ClusterDecl:
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True)
class ModelDecl:
    """`model NAME = FAMILY(ARGS) { BODY }`; `body` is None when there are no braces."""

    name: Name
    family: Name
    args: tuple[Arg, ...]
    body: tuple[Flag | Option, ...] | None
    span: Span


@dataclass(frozen=True)
class DatasetDecl:
    name: Name
    format: Name
    args: tuple[Arg, ...]
    span: Span


@dataclass(frozen=True)
class CallStmt:
    """`NAME = MODEL.KIND(INPUTS) -> OUTPUTS using INTERFACE { OPTIONS }` in a dataflow."""

    name: Name
    model: Name
    kind: Name
    inputs: tuple[Name, ...]
    outputs: tuple[Name, ...]
    interface: Name | None
    options: tuple[Option, ...] | None
    span: Span


@dataclass(frozen=True)
class DataflowDecl:
    name: Name
    params: tuple[Name, ...]
    calls: tuple[CallStmt, ...]
    span: Span


@dataclass(frozen=True)
class RunStmt:
    dataflow: Name
    args: tuple[Name, ...]
    options: tuple[Option, ...] | None
    span: Span


@dataclass(frozen=True)
class MeshRef:
    """`node0[0:4]`, `node1` or `nodes[0:2]` as written; the checker interprets it."""

    base: Name
    start: int | None
    stop: int | None
    span: Span


@dataclass(frozen=True)
class PlaceStmt:
    call: Name
    mesh: MeshRef
    options: tuple[Option, ...]
    span: Span


Statement = Import | ClusterDecl | ModelDecl | DatasetDecl | DataflowDecl | RunStmt | PlaceStmt


@dataclass(frozen=True)
class Comment:
    """A comment as written (`// …` or `/* … */`); kept for `fmt`, ignored by `check`."""

    text: str
    span: Span


@dataclass(frozen=True)
class Program:
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...]
    span: Span


def without_spans(node):
    """The node as nested tuples without positions: equal iff two trees mean the same.

    `fmt` must keep this invariant (formatted text parses to the same tree modulo spans
    and comments' positions).
    """
    if isinstance(node, tuple):
        return tuple(without_spans(n) for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, Span):
        return (type(node).__name__,) + tuple(
            without_spans(getattr(node, f.name)) for f in dataclasses.fields(node) if f.name != "span"
        )
    return node
