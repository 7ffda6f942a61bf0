"""The compiler as one function: check → plan → lower → emit, and the pricing helpers
that the commands share. Tests, benchmarks and the CLI all reach the compiler here.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlhfc import ir
from rlhfc.backend.emit import emit
from rlhfc.backend.lower import OpProgram, lower
from rlhfc.frontend.check import load_program
from rlhfc.hardware import with_profile
from rlhfc.planner.cost.coefficients import Coefficients
from rlhfc.planner.cost.fit import load_coefficients
from rlhfc.planner.solve import plan_dataflow, symmetric_plan


def pricing(hardware: Path | None, coefficients: Path | None) -> Coefficients | None:
    """The coefficients to plan with: fitted ones, else the profile's measured latencies and
    overheads, else None: the cluster device's defaults (`default_coefficients`; the
    profile is read first so that a bad one fails early)."""
    if hardware:
        with_profile(ir.Cluster(1, 1, "cpu"), hardware)
    chosen = coefficients or hardware
    return load_coefficients(chosen) if chosen else None


def with_hardware(dataflow: ir.Dataflow, hardware: Path | None) -> ir.Dataflow:
    """The dataflow priced on a measured profile (`--hardware`), if one is given."""
    return replace(dataflow, cluster=with_profile(dataflow.cluster, hardware)) if hardware else dataflow


def compile_program(path: Path, devices: int | None = None, symmetric: bool = False,
                    time_limit: float = 10.0, output: Path = Path("build/program.py"),
                    hardware: Path | None = None, coefficients: Path | None = None) -> tuple[OpProgram, str]:
    """check → plan → lower → emit, for a file to be written at `output`; `devices`
    replaces the cluster with N local CPU processes; `hardware` and `coefficients` price
    the plan with a measured profile and fitted coefficients. Raises CompileError on a
    bad program, PlanError when nothing fits, ProfileError / FitError on a bad file."""
    coeffs = pricing(hardware, coefficients)
    override = None if devices is None else ir.Cluster(nodes=1, devices_per_node=devices, device="cpu")
    dataflow = with_hardware(load_program(str(path), cluster_override=override, need_run=True), hardware)
    plan = symmetric_plan(dataflow, coeffs) if symmetric else plan_dataflow(dataflow, time_limit=time_limit, coeffs=coeffs)
    prog = lower(dataflow, plan)
    return prog, emit(prog, str(output))
