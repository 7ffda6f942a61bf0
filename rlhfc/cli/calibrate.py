"""`rlhfc calibrate runs/NAME/metrics.jsonl …`: fit the cost model's coefficients to the
call times that runs measured, and show each call's error before and after the fit.

Bad input (a missing file, bad JSON, a run without cost inputs) is one line on stderr
and exit status 1.
"""

from __future__ import annotations

import statistics
from dataclasses import fields
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rlhfc.cli import options
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS, Coefficients
from rlhfc.planner.cost.fit import (
    FIT_FIELDS, FitError, Sample, calibrate_runs, coefficients_to_json, load_coefficients, relative_error,
)


def error_table(samples: list[Sample], before: Coefficients, after: Coefficients) -> Table:
    """Measured and predicted milliseconds per call, with the relative errors."""
    table = Table(title="per-call time (ms): measured vs predicted")
    for col in ("run:call", "measured", "before", "err", "after", "err"):
        table.add_column(col, justify="left" if col == "run:call" else "right", no_wrap=True)
    for s in samples:
        b, a = s.priced.seconds(before), s.priced.seconds(after)
        table.add_row(s.name, f"{s.measured * 1e3:.2f}", f"{b * 1e3:.2f}", f"{relative_error(b, s.measured):.0%}",
                      f"{a * 1e3:.2f}", f"{relative_error(a, s.measured):.0%}")
    return table


def median_error(samples: list[Sample], c: Coefficients) -> float:
    return statistics.median(relative_error(s.priced.seconds(c), s.measured) for s in samples)


def calibrate_command(
    metrics: list[Path] = typer.Argument(..., help="metrics.jsonl files of runs (`rlhfc run` writes them)"),
    out: Path = typer.Option(None, "--out", callback=options.output, help="write the fitted coefficients (JSON) here"),
    start: Path = typer.Option(None, "--coefficients", help="start from these coefficients, not the defaults"),
) -> None:
    """Fit the cost model's time coefficients to measured per-call times."""
    console, err = Console(), Console(stderr=True)
    try:
        before = load_coefficients(start) if start else DEFAULT_COEFFICIENTS
        samples, after = calibrate_runs(metrics, before)
    except FitError as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        raise typer.Exit(1)
    console.print(error_table(samples, before, after))
    console.print(f"median abs error over {len(samples)} calls: {median_error(samples, before):.1%} before → "
                  f"{median_error(samples, after):.1%} after")
    changed = [f.name for f in fields(Coefficients) if f.name in FIT_FIELDS + ("move_latency",)]
    console.print("fitted: " + ", ".join(f"{n} {getattr(before, n):.3g} → {getattr(after, n):.3g}" for n in changed))
    lengths = sorted({s.priced.call.settings for s in samples if s.priced.call.settings})
    if lengths:
        console.print(f"responses measured: {dict(lengths[0])['response_len']} tokens expected; set "
                      f"`response_len = {dict(lengths[0])['response_len']}` in the run block to plan with it")
    if out:
        options.write_or_exit(out, coefficients_to_json(after))
        console.print(f"wrote {out}; use it with `rlhfc plan|compile|run --coefficients {out}`")
