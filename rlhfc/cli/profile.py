"""`rlhfc profile`: measure this machine (rlhfc_runtime.profile) and write the hardware
profile the planner prices with (rlhfc.planner.profile.derive)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rlhfc.cli import options
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.profile import derive, physical_cores
from rlhfc_runtime.profile import Measurement, plan_cases, run_case


def profile_command(
    devices: int = typer.Option(2, "--devices", help="largest process group to measure collectives over (≥ 2)"),
    out: Path = typer.Option(Path("hw.json"), "--out", callback=options.output,
                             help="where to write the hardware profile (JSON)"),
) -> None:
    """Measure matmul, memory, collective and decode-step speed here; write a hardware profile."""
    import torch

    err = Console(stderr=True)
    if devices < 2:
        err.print("error: --devices must be at least 2 (collectives need two processes)")
        raise typer.Exit(1)
    torch.set_num_threads(1)  # as one `rlhfc run` worker
    cases = plan_cases(devices)
    measured: list[Measurement] = []
    columns = [TextColumn("[bold]profile"), BarColumn(bar_width=24), TextColumn("{task.description}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("", total=len(cases))
        for what, case in cases:
            bar.update(task, description=f"{what} {'x'.join(map(str, case))}")
            measured += run_case(what, case)
            bar.advance(task)
    doc = derive(measured, cores=physical_cores())
    options.write_or_exit(out, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    d, c = doc["device"], doc["coefficients"]
    err.print(f"matmul {d['flops'] / 1e9:.1f} GFLOP/s peak ({d['achievable']:.0%} on average), "
              f"memory {d['mem_bandwidth'] * DEFAULT_COEFFICIENTS.mem_bandwidth_efficiency / 1e9:.1f} GB/s, "
              f"all-reduce {c['collective_latency'] * 1e6:.0f} µs + "
              f"{d['intra_bandwidth'] * DEFAULT_COEFFICIENTS.link_efficiency / 1e9:.2f} GB/s, "
              f"decode step overhead {c['decode_step_overhead'] * 1e6:.0f} µs, "
              f"{d.get('cores', '?')} cores")
    err.print(f"wrote {out}; use it with `rlhfc plan --hardware {out}` or `cluster {{ hardware = \"{out}\" }}`")
