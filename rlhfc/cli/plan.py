"""`rlhfc plan FILE`: check a program, solve its placement and show the plan.

Errors (program errors, no plan fits, a bad --cluster) are printed as diagnostics and
exit with status 1; never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from rlhfc.driver import pricing, with_hardware
from rlhfc.cli import options
from rlhfc.hardware import ProfileError
from rlhfc.planner.cost.fit import FitError

def plan_command(
    file: Path = typer.Argument(..., help="the .rlhf program"),
    cluster: str = typer.Option(None, "--cluster", callback=options.cluster,
                                help="override the cluster, e.g. 16x8:H100-80GB"),
    json_out: Path = typer.Option(None, "--json", callback=options.output, help="write the versioned plan JSON here"),
    svg: Path = typer.Option(None, "--svg", callback=options.output, help="write a per-device Gantt chart (SVG)"),
    png: Path = typer.Option(None, "--png", callback=options.output, help="write a per-device Gantt chart (PNG)"),
    time_limit: str = typer.Option("10", "--time-limit", callback=options.seconds, metavar="SECONDS",
                                   help="CP-SAT time limit, seconds"),
    workers: str = typer.Option("8", "--workers", callback=options.at_least_one, metavar="N",
                                help="CP-SAT workers"),
    hardware: Path = typer.Option(None, "--hardware", help="price with a measured profile from `rlhfc profile`"),
    coefficients: Path = typer.Option(None, "--coefficients", help="cost-model coefficients from `rlhfc calibrate`"),
    explain: bool = typer.Option(False, "--explain", help="show the terms of every call's estimate"),
) -> None:
    """Choose every call's devices and dp/tp/pp with CP-SAT and print the plan."""
    from rlhfc.frontend.check import load_program
    from rlhfc.diagnostics import CompileError, render
    from rlhfc.planner.cost.coefficients import estimate_meaning
    from rlhfc.planner.explain import explain_plan, print_explanation, roofline_seconds
    from rlhfc.planner.report import gantt_bytes, print_plan
    from rlhfc.planner.solve import plan_dataflow

    # piped or redirected output gets whole tables, not 80-column abridged ones
    out, err = Console(width=None if sys.stdout.isatty() else 120), Console(stderr=True)
    try:
        coeffs = pricing(hardware, coefficients)
        dataflow = with_hardware(load_program(str(file), cluster_override=cluster, need_run=True), hardware)
        plan = plan_dataflow(dataflow, time_limit=time_limit, workers=workers, coeffs=coeffs)
    except (ProfileError, FitError) as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        raise typer.Exit(1)
    except CompileError as e:
        err.print(render(e.diagnostics), markup=False, highlight=False, soft_wrap=True)  # paths unbroken
        raise typer.Exit(1)
    print_plan(plan, dataflow, out)
    if explain:
        print_explanation(explain_plan(dataflow, plan, coeffs), out)
        floor, _ = roofline_seconds(dataflow, plan, coeffs)
        out.print(f"iteration {plan.iteration_time:.3f} s estimated ({estimate_meaning(dataflow.cluster.device, coeffs)}); "
                  f"physical roofline of the same plan {floor:.3f} s"
                  + (" (its strategies run synchronously)" if plan.max_staleness else ""), markup=False, highlight=False)
    if json_out:
        options.write_or_exit(json_out, plan.to_json())
    for path, kind in ((svg, "svg"), (png, "png")):
        if path:
            options.write_or_exit(path, gantt_bytes(plan, kind))
