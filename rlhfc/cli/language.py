"""`rlhfc check | graph | fmt`: the front end's commands (`compile` and `run` live in cli_run).

Every user error is printed as a diagnostic (exit code 1); no command shows a traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from rlhfc import ir
from rlhfc.cli import options
from rlhfc.frontend.check import check_program
from rlhfc.diagnostics import CompileError, render
from rlhfc.frontend.fmt import format_program
from rlhfc.frontend.graph import dot_available, render_svg, to_dot, to_text
from rlhfc.frontend.parse import parse_text, read_source


def _color() -> bool:
    return sys.stderr.isatty()


def _load(path: Path) -> ir.Dataflow:
    """Check one file, print its warnings; on errors print them all and exit 1."""
    flow, diagnostics = check_program(path)
    if diagnostics:
        typer.echo(render(diagnostics, color=_color()), err=True, nl=False)
    if flow is None:
        raise typer.Exit(1)
    return flow


def _summary(flow: ir.Dataflow) -> str:
    if flow.run is None:
        return f"ok: library ({len(flow.models)} models, {len(flow.datasets)} datasets, no `run`)"
    return f"ok: {len(flow.calls)} calls, {len(flow.edges)} edges"


def check(files: list[Path] = typer.Argument(..., help=".rlhf programs or libraries to check"),
          timing: bool = typer.Option(False, "--time", help="print how long each file took")) -> None:
    """Check programs: names, imports, data keys, interfaces, shapes, pins.

    Prints `FILE: ok: N calls, M edges` per good file, or rustc-style
    diagnostics (all errors of a file at once); exits 1 if any file has errors.

    Examples:

        rlhfc check programs/ppo.rlhf

        rlhfc check programs/*.rlhf stdlib/*.rlhf --time
    """
    failed = False
    for path in files:
        start = time.perf_counter()
        flow, diagnostics = check_program(path)
        elapsed = time.perf_counter() - start
        if diagnostics:
            typer.echo(render(diagnostics, color=_color()), err=True, nl=False)
        suffix = f" ({elapsed * 1000:.1f} ms)" if timing else ""
        if flow is None:
            failed = True
            typer.echo(f"{path}: failed{suffix}")
        else:
            typer.echo(f"{path}: {_summary(flow)}{suffix}")
    if failed:
        raise typer.Exit(1)


def graph(file: Path = typer.Argument(..., help="a .rlhf program with a `run`"),
          dot: Path | None = typer.Option(None, "--dot", callback=options.output, help="write Graphviz DOT here"),
          svg: Path | None = typer.Option(None, "--svg", callback=options.output,
                                          help="write an SVG here (needs Graphviz `dot`)")) -> None:
    """Show the dataflow graph: calls with batch and lengths, data and parameter edges.

    Parameter edges (`param`) order a trainable model's calls around its
    train call; `(next iteration)` marks the train → next-use edges.

    Examples:

        rlhfc graph programs/ppo.rlhf

        rlhfc graph programs/ppo.rlhf --dot ppo.dot --svg ppo.svg
    """
    flow = _load(file)
    typer.echo(to_text(flow), nl=False)
    dot_text = to_dot(flow)
    if svg is not None and not dot_available():
        typer.echo("cannot write SVG: Graphviz `dot` is not on PATH (install graphviz, or use --dot)", err=True)
        raise typer.Exit(1)
    for path, data in ((dot, dot_text), (svg, svg and render_svg(dot_text))):
        if path is not None:
            options.write_or_exit(path, data)
            typer.echo(f"wrote {path}")


def fmt(files: list[Path] = typer.Argument(..., help=".rlhf files to format"),
        check_only: bool = typer.Option(False, "--check", help="exit 1 if a file is not formatted; change nothing"),
        write: bool = typer.Option(False, "--write", help="rewrite the files in place")) -> None:
    """Print programs in canonical layout (or check / rewrite them in place).

    Formatting keeps every comment and never changes meaning: the output
    parses to the same program. Without flags the text goes to stdout.

    Examples:

        rlhfc fmt programs/ppo.rlhf

        rlhfc fmt --check programs/*.rlhf

        rlhfc fmt --write programs/ppo.rlhf
    """
    unformatted = False
    for path in files:
        try:
            text = read_source(path)
            formatted = format_program(parse_text(text, str(path)))
        except CompileError as error:
            typer.echo(render(error.diagnostics, color=_color()), err=True, nl=False)
            raise typer.Exit(1) from None
        if check_only:
            if formatted != text:
                unformatted = True
                typer.echo(f"{path}: would reformat")
        elif write:
            if formatted != text:
                options.write_or_exit(path, formatted)
                typer.echo(f"{path}: reformatted")
        else:
            typer.echo(formatted, nl=False)
    if unformatted:
        raise typer.Exit(1)


# `compile` (check → plan → lower → emit) lives in rlhfc/cli_run.py with `run`.
