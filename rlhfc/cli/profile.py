"""`rlhfc profile`: measure this machine (rlhfc_runtime.profile) and write the hardware
profile the planner prices with (rlhfc.planner.profile.derive)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rlhfc.cli import options
from rlhfc.hardware import CATALOG, DEVICE_NAMES
from rlhfc.planner.cost.coefficients import DEFAULT_COEFFICIENTS
from rlhfc.planner.profile import catalog_entry, derive
from rlhfc_runtime.contract.cores import physical_cores
from rlhfc_runtime.profile import SIZES, Measurement, plan_cases, run_case


def _fail(err: Console, message: str):
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(1)


def measure(devices: int, device, base: str, err: Console) -> dict:
    """Every case of `plan_cases` on `device`, with a progress bar: the profile document."""
    cases = plan_cases(devices, device)
    measured: list[Measurement] = []
    columns = [TextColumn(f"[bold]profile {device}"), BarColumn(bar_width=24), TextColumn("{task.description}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err) as bar:
        task = bar.add_task("", total=len(cases))
        for what, case, precision in cases:
            bar.update(task, description=f"{what} {'x'.join(map(str, case))} {precision}")
            measured += run_case(what, case, precision, device)
            bar.advance(task)
    return derive(measured, base=base, cores=physical_cores())


def machine_key(processes: int) -> str:
    """What identifies this machine's CPU profile for a run of `processes` local processes:
    host, CPU model, cores, the threads each process computes with (RLHFC_THREADS
    included), torch, the profile schema and what is measured (a change in any re-measures)."""
    import hashlib
    import platform

    import torch

    from rlhfc.hardware import PROFILE_SCHEMA_VERSION
    from rlhfc_runtime.dist import process_threads

    try:
        cpu = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "")
    except OSError:
        cpu = ""
    parts = (platform.node(), platform.machine(), platform.processor(), cpu, physical_cores(), processes,
             process_threads(processes), torch.__version__, PROFILE_SCHEMA_VERSION, SIZES["cpu"])
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where measured machine profiles are kept ($XDG_CACHE_HOME/rlhfc/profiles)."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhfc" / "profiles"


def machine_profile(processes: int, err: Console) -> Path:
    """This machine's CPU profile for `processes` local processes: measured once (a quick
    `rlhfc profile`, as one worker of such a run measures), then read from the cache."""
    from rlhfc_runtime.dist import device_for_rank, use_threads

    path = cache_dir() / f"cpu-{processes}p-{machine_key(processes)}.json"
    if path.exists():
        return path
    err.print(f"measuring this machine once to price CPU plans (cached in {path})", markup=False, highlight=False)
    use_threads(processes)
    doc = measure(processes, device_for_rank(), "cpu", err)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def profile_command(
    devices: int = typer.Option(None, "--devices", min=1, help="processes to measure collectives over (default: "
                                "every GPU here, else 2 CPU processes; 1 measures none)"),
    base: str = typer.Option(None, "--base", help="the catalog device the profile refines (default: named after "
                             "the GPU, else cpu)"),
    out: Path = typer.Option(Path("hw.json"), "--out", callback=options.output,
                             help="where to write the hardware profile (JSON)"),
) -> None:
    """Measure matmul, memory, collective and decode-step speed on this machine's device
    (its GPU under CUDA, else the CPU); write a hardware profile."""
    import torch

    from rlhfc_runtime.dist import device_for_rank, use_threads

    err = Console(stderr=True)
    device = device_for_rank()
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        devices = devices or gpus
        if devices > gpus:
            _fail(err, f"--devices {devices} but {gpus} GPU(s) here: rlhfc runs one process per GPU")
        name = torch.cuda.get_device_name(device)
        base = base or catalog_entry(name, torch.cuda.get_device_properties(device).total_memory)
        if base is None:
            _fail(err, f"no catalog device for GPU `{name}`: name one with --base ({', '.join(DEVICE_NAMES)})")
    else:
        devices, base = devices or 2, base or "cpu"
        use_threads(devices)  # as one worker of a `devices`-process `rlhfc run`
    if base not in CATALOG:
        _fail(err, f"unknown --base `{base}`; one of {', '.join(DEVICE_NAMES)}")
    doc = measure(devices, device, base, err)
    options.write_or_exit(out, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    d, c = doc["device"], doc["coefficients"]
    links = (f"all-reduce {c['collective_latency'] * 1e6:.0f} µs + "
             f"{d['intra_bandwidth'] * DEFAULT_COEFFICIENTS.link_efficiency / 1e9:.2f} GB/s"
             if devices > 1 else "no collectives (one device: catalog link figures kept)")
    host = f", host copy {d['host_bandwidth'] / 1e9:.1f} GB/s" if "host_bandwidth" in d else ""
    err.print(f"{base}: matmul {d['flops'] / 1e9:.1f} GFLOP/s peak ({d['achievable']:.0%} on average), "
              f"memory {d['mem_bandwidth'] * DEFAULT_COEFFICIENTS.mem_bandwidth_efficiency / 1e9:.1f} GB/s{host}, "
              f"{links}, decode step overhead {c['decode_step_overhead'] * 1e6:.0f} µs, "
              f"{d.get('cores', '?')} cores"
              + (f"; whole layers train at {c['compute_efficiency']:.0%} of the matmul rate" if base == "cpu" else ""))
    err.print(f"wrote {out}; use it with `rlhfc plan --hardware {out}` or `cluster {{ hardware = \"{out}\" }}`")
