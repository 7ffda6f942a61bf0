"""Loading: parse a program and the files it imports; one namespace per file; import cycles."""

from __future__ import annotations

import os
from collections.abc import Generator
from importlib import resources
from pathlib import Path

from rlhfc import ir
from rlhfc.diagnostics import CompileError
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import (
    STDLIB_PREFIX,
    Reporter,
    Unit,
    display,
    path_exists,
    resolved_path,
    suggest,
)
from rlhfc.frontend.parse import parse_file


def resolve_import(unit: Unit, literal: str) -> tuple[Path, str]:
    """(real path, display name) of an import: `stdlib/X` is the shipped library."""
    if literal.startswith(STDLIB_PREFIX):
        path = Path(str(resources.files("rlhfc_stdlib").joinpath(literal[len(STDLIB_PREFIX):])))
        return path, display(path)
    path = unit.path.parent / literal
    return path, os.path.normpath(os.path.join(os.path.dirname(unit.display), literal))


class Loader:
    """Parses a program and, transitively, the files it imports; detects import cycles."""

    def __init__(self, rep: Reporter) -> None:
        self.rep = rep
        self.units: dict[Path, Unit] = {}
        self.in_progress: list[Path] = []

    def load(self, path: Path, display: str, origin: ir.Span | None) -> Unit | None:
        """The unit of `path` with its imports loaded, depth first but without recursion (a
        chain of thousands of files is fine): each file's `_collect` yields the imports it
        needs and is resumed with their units."""
        root, fresh = self._open(path, display, origin)
        if not fresh:
            return root
        stack, reply = [self._collect(root)], None
        while stack:
            try:
                path, display, origin = stack[-1].send(reply)
            except StopIteration as done:  # that file is complete: its unit goes to its importer
                stack.pop()
                self.in_progress.pop()
                reply = done.value
                continue
            reply, fresh = self._open(path, display, origin)
            if fresh:
                stack.append(self._collect(reply))
                reply = None
        return root

    def _open(self, path: Path, display: str, origin: ir.Span | None) -> tuple[Unit | None, bool]:
        """(the unit, whether it was just parsed and must be collected); (None, False) after an error."""
        key = resolved_path(path) if path_exists(path) else path
        if key in self.in_progress:
            chain = " -> ".join(self.units[p].display for p in self.in_progress[self.in_progress.index(key):])
            self.rep.error("E021", f"import cycle: {chain} -> {display}", origin,
                           "move the shared dataflows into a third file that both import")
            return None, False
        if key in self.units:
            return self.units[key], False
        try:
            text, program = parse_file(path, display)
        except CompileError as error:
            if origin is not None and error.diagnostics[0].code == "E020":
                self.rep.error("E020", error.diagnostics[0].message, origin,
                               "paths are relative to the importing file; `stdlib/NAME.rlhf` is the shipped library")
            else:
                self.rep.diagnostics.extend(error.diagnostics)
            return None, False
        self.rep.texts[display] = text.split("\n")  # lines as the lexer counts them
        unit = Unit(path, display, program)
        self.units[key] = unit
        self.in_progress.append(key)
        return unit, True

    def _define(self, unit: Unit, table: dict, name: ast.Name, value) -> None:
        if any(name.text in names for names in (unit.dataflows, unit.models, unit.datasets)):
            self.rep.error("E003", f"`{name.text}` is defined more than once", name.span,
                           "models, datasets and dataflows share one namespace per file")
        else:
            table[name.text] = value

    def _collect(self, unit: Unit) -> Generator[tuple[Path, str, ir.Span], Unit | None, Unit]:
        """Define the file's names; yields (path, display, span) of each import and is sent its unit."""
        for stmt in unit.program.statements:
            if isinstance(stmt, ast.Import):
                path, display = resolve_import(unit, stmt.path.value)
                if not stmt.path.value.endswith(".rlhf"):  # never read (or quote) other files
                    self.rep.error("E020", f"`{display}` is not a .rlhf file", stmt.path.span,
                                   "imports name .rlhf programs; `stdlib/NAME.rlhf` is the shipped library")
                    continue
                target = yield path, display, stmt.path.span
                for name in stmt.names:
                    if target is None:
                        continue
                    if name.text not in target.dataflows:
                        self.rep.error("E002", f"`{display}` defines no dataflow `{name.text}`", name.span,
                                       suggest(name.text, target.dataflows) or "only dataflows can be imported")
                    else:
                        self._define(unit, unit.dataflows, name, target.dataflows[name.text])
            elif isinstance(stmt, ast.DataflowDecl):
                self._define(unit, unit.dataflows, stmt.name, (unit, stmt))
            elif isinstance(stmt, ast.ModelDecl):
                self._define(unit, unit.models, stmt.name, stmt)
            elif isinstance(stmt, ast.DatasetDecl):
                self._define(unit, unit.datasets, stmt.name, stmt)
        for kind, word in ((ast.ClusterDecl, "cluster"), (ast.RunStmt, "run")):
            for extra in unit.statements(kind)[1:]:
                self.rep.error("E003", f"more than one `{word}` statement", extra.span,
                               f"a program has at most one `{word}`")
        return unit
