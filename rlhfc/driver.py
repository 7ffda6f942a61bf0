"""The compiler as one function: check → plan → lower → emit, and the pricing helpers
that the commands share. Tests, benchmarks and the CLI all reach the compiler here.
"""

from __future__ import annotations

from collections.abc import Callable
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


def priced_by(cluster: ir.Cluster, hardware: Path | None, coefficients: Path | None, measured: bool) -> str:
    """Which source priced a plan, in words (the plan and the program's header say it)."""
    if coefficients:
        return f"fitted coefficients {coefficients}" + (f" on the profile {hardware}" if hardware else "")
    if hardware:
        return f"this machine's profile, measured once ({hardware})" if measured else f"the profile {hardware}"
    if any(k == "flops" for k, _ in cluster.overrides):
        return "the cluster block's hardware profile"
    return f"the catalog's `{cluster.device}` defaults"


def needs_measurement(cluster: ir.Cluster) -> bool:
    """A `cpu` cluster that no measured figures describe: its catalog entry is a guess."""
    return cluster.device == "cpu" and not any(k == "flops" for k, _ in cluster.overrides)


def compile_program(path: Path, devices: int | None = None, symmetric: bool = False,
                    time_limit: float = 10.0, output: Path = Path("build/program.py"),
                    hardware: Path | None = None, coefficients: Path | None = None,
                    measure: Callable[[ir.Cluster], Path] | None = None) -> tuple[OpProgram, str]:
    """check → plan → lower → emit, for a file to be written at `output`; `devices`
    replaces the cluster with N local CPU processes; `hardware` and `coefficients` price
    the plan with a measured profile and fitted coefficients; with neither, a `cpu`
    cluster without measured figures is priced on `measure(cluster)`'s profile of this
    machine where given (`rlhfc run`). Raises CompileError on a bad program, PlanError
    when nothing fits, ProfileError / FitError on a bad file."""
    pricing(hardware, coefficients)  # a bad file fails before the program is checked
    override = None if devices is None else ir.Cluster(nodes=1, devices_per_node=devices, device="cpu")
    dataflow = load_program(str(path), cluster_override=override, need_run=True)
    measured = measure is not None and not (hardware or coefficients) and needs_measurement(dataflow.cluster)
    if measured:
        hardware = measure(dataflow.cluster)
    coeffs = pricing(hardware, coefficients)
    source = priced_by(dataflow.cluster, hardware, coefficients, measured)
    dataflow = with_hardware(dataflow, hardware)
    plan = symmetric_plan(dataflow, coeffs) if symmetric else plan_dataflow(dataflow, time_limit=time_limit, coeffs=coeffs)
    prog = lower(dataflow, replace(plan, priced_by=source))
    return prog, emit(prog, str(output))
