"""Command-line values checked while the arguments are parsed, before any work: counts,
time limits, `--cluster`, output paths. A bad value is one line naming the option and
what it takes, exit status 1, never a traceback."""

from __future__ import annotations

import math
import re
from pathlib import Path

import typer

from rlhfc import ir
from rlhfc.files import FileProblem, writable_target, write_output
from rlhfc.hardware import DEVICE_NAMES, out_of_range


class BadValue(typer.BadParameter):
    """A value the option cannot take (exit status 1, as for every other user error)."""

    exit_code = 1


def at_least_one(text: str | None) -> int | None:
    """For counts (--devices, --steps, --keep, --save-every, --workers); None is the default.
    Options take text and convert it here, so a non-number is exit 1 like a bad number."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise BadValue(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise BadValue(f"must be at least 1, got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadValue(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise BadValue(f"must be a finite number of seconds above 0, got {text!r}")
    return value


_CLUSTER = re.compile(r"^(\d+)x(\d+):(.+)$")


def cluster(text: str | None) -> ir.Cluster | None:
    """`16x8:H100-80GB` → 16 nodes of 8 H100-80GB."""
    if text is None:
        return None
    m = _CLUSTER.match(text)
    if not m or m.group(3) not in DEVICE_NAMES:
        raise BadValue(f"expected NODESxDEVICES:DEVICE with DEVICE one of {', '.join(DEVICE_NAMES)}, got {text!r}")
    counts = {"nodes": m.group(1), "devices_per_node": m.group(2)}
    problems = [why for key, digits in counts.items() if (why := out_of_range(key, float(digits)))]
    if problems:
        raise BadValue(f"{'; '.join(problems)} in {text!r}")
    return ir.Cluster(int(counts["nodes"]), int(counts["devices_per_node"]), m.group(3))


def output(path: Path | None) -> Path | None:
    """An output file: not a directory, a device or below a file (its directory may be made)."""
    if path is None:
        return None
    try:
        writable_target(path)
    except FileProblem as e:
        raise BadValue(str(e)) from None
    return path


def write_or_exit(path: Path, data: str | bytes) -> None:
    """Write an output file whole; a failure (a full disk) is one line naming the path and
    the bytes needed, exit status 1."""
    try:
        write_output(path, data)
    except FileProblem as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
