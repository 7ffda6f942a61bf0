"""`rlhfc plan FILE`: check a program, solve its placement and show the plan.

Errors (program errors, no plan fits, a bad --cluster) are printed as diagnostics and
exit with status 1; never a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console

from rlhfc import ir
from rlhfc.cli import app
from rlhfc.hardware import DEVICE_NAMES

_CLUSTER = re.compile(r"^(\d+)x(\d+):(.+)$")


def parse_cluster(text: str) -> ir.Cluster:
    """`16x8:H100-80GB` → 16 nodes of 8 H100-80GB."""
    m = _CLUSTER.match(text)
    if not m or m.group(3) not in DEVICE_NAMES or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise typer.BadParameter(f"expected NODESxDEVICES:DEVICE with DEVICE one of {', '.join(DEVICE_NAMES)}, got {text!r}")
    return ir.Cluster(int(m.group(1)), int(m.group(2)), m.group(3))


@app.command("plan")
def plan_command(
    file: Path = typer.Argument(..., help="the .rlhf program"),
    cluster: str = typer.Option(None, "--cluster", help="override the cluster, e.g. 16x8:H100-80GB"),
    json_out: Path = typer.Option(None, "--json", help="write the versioned plan JSON here"),
    svg: Path = typer.Option(None, "--svg", help="write a per-device Gantt chart (SVG)"),
    png: Path = typer.Option(None, "--png", help="write a per-device Gantt chart (PNG)"),
    time_limit: float = typer.Option(10.0, "--time-limit", help="CP-SAT time limit, seconds"),
    workers: int = typer.Option(8, "--workers", help="CP-SAT workers"),
) -> None:
    """Choose every call's devices and dp/tp/pp with CP-SAT and print the plan."""
    from rlhfc.check import load_program
    from rlhfc.diagnostics import CompileError, render
    from rlhfc.report import print_plan, save_gantt
    from rlhfc.solve import PlanError, plan_dataflow

    out, err = Console(), Console(stderr=True)
    try:
        override = parse_cluster(cluster) if cluster else None
        dataflow = load_program(str(file), cluster_override=override)
        plan = plan_dataflow(dataflow, time_limit=time_limit, workers=workers)
    except CompileError as e:
        err.print(render(e.diagnostics), markup=False, highlight=False)
        raise typer.Exit(1)
    except PlanError as e:
        where = f"{e.span.file}:{e.span.line}:{e.span.col}: " if e.span else ""
        err.print(f"error[plan]: {where}{e}", markup=False, highlight=False)
        raise typer.Exit(1)
    print_plan(plan, out)
    if json_out:
        json_out.write_text(plan.to_json())
    for path in (svg, png):
        if path:
            save_gantt(plan, str(path))
