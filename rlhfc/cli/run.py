"""`rlhfc compile` and `rlhfc run`: the whole pipeline from a .rlhf file to a training run.

`run` compiles into the run directory (program.py, the plan in its header), starts the generated
program as a child process (it spawns the workers), and follows its metrics file with a
progress bar. A worker that dies stops the run with a clear message; the checkpoint in
the run directory lets `--resume` continue without losing a step.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from rlhfc.backend.lower import OpProgram
from rlhfc.cli import options
from rlhfc.driver import compile_program

_err = Console(stderr=True, soft_wrap=True)


class Launcher(str, Enum):
    """What `rlhfc compile` writes besides the program: nothing (run it with python or
    torchrun), or an sbatch script (`rlhfc.backend.sbatch`)."""

    LOCAL = "local"
    SLURM = "slurm"


def _compile_or_exit(path: Path, **kwargs) -> tuple[OpProgram, str]:
    """The compiled program, or the diagnostics on stderr and exit status 1."""
    from rlhfc.planner.cost.fit import FitError
    from rlhfc.diagnostics import CompileError, render
    from rlhfc.hardware import ProfileError

    try:
        return compile_program(path, **kwargs)
    except (ProfileError, FitError) as e:
        typer.echo(f"error: {e}", err=True)
    except CompileError as e:
        typer.echo(render(e.diagnostics, color=sys.stderr.isatty()), err=True, nl=False)
    raise typer.Exit(1)


def compile_command(
    file: Path = typer.Argument(..., help="the .rlhf program"),
    output: Path = typer.Option(None, "-o", "--output", callback=options.output,
                                help="where to write the Python file (default build/NAME.py)"),
    devices: str = typer.Option(None, "--devices", callback=options.at_least_one, metavar="N",
                                help="plan for N local CPU processes instead of the cluster block"),
    symmetric: bool = typer.Option(False, "--symmetric", help="use the symmetric baseline plan, not the solver"),
    hardware: Path = typer.Option(None, "--hardware", help="price with a measured profile from `rlhfc profile`"),
    coefficients: Path = typer.Option(None, "--coefficients", help="cost-model coefficients from `rlhfc calibrate`"),
    launcher: Launcher = typer.Option(Launcher.LOCAL, "--launcher",
                                      help="slurm: also write NAME.sbatch beside the program (srun torchrun, c10d)"),
    run_dir: Path = typer.Option(None, "--run-dir", help="with --launcher slurm: the run directory the job "
                                 "writes (default runs/NAME)"),
) -> None:
    """Compile a program into one runnable Python file (plan embedded as a comment);
    with `--launcher slurm`, also the sbatch script that runs it on the cluster's nodes."""
    from rlhfc.backend.sbatch import sbatch_path, sbatch_script

    if run_dir is not None and launcher is not Launcher.SLURM:
        typer.echo("error: --run-dir is the sbatch script's run directory; it needs --launcher slurm", err=True)
        raise typer.Exit(1)
    output = options.output(output or Path("build") / f"{file.stem}.py")
    files = [output] + ([options.output(sbatch_path(output))] if launcher is Launcher.SLURM else [])
    prog, text = _compile_or_exit(file, devices=devices, symmetric=symmetric, output=output, hardware=hardware,
                                  coefficients=coefficients)
    texts = [text] + ([sbatch_script(prog, output, run_dir or Path("runs") / file.stem)] if len(files) > 1 else [])
    for path, body in zip(files, texts):
        options.write_or_exit(path, body)
        _err.print(f"wrote {path}", markup=False, highlight=False)
    if len(files) > 1:
        _err.print(f"submit with: sbatch {files[1]}", markup=False, highlight=False)


def run_command(
    file: Path = typer.Argument(..., help="the .rlhf program"),
    devices: str = typer.Option(None, "--devices", callback=options.at_least_one, metavar="N",
                                help="N local CPU processes (default: the cluster block)"),
    steps: str = typer.Option(None, "--steps", callback=options.at_least_one, metavar="N",
                              help="stop after this many steps (default: the run block)"),
    out: Path = typer.Option(None, "--out", help="run directory (default runs/NAME)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run directory's newest intact checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over in a run directory that has a checkpoint"),
    keep: str = typer.Option(None, "--keep", callback=options.at_least_one, metavar="N",
                             help="keep the last K checkpoints (default: the run block, 2)"),
    plot: bool = typer.Option(False, "--plot", help="write reward and KL curves to OUT/curves.png"),
    symmetric: bool = typer.Option(False, "--symmetric", help="use the symmetric baseline plan"),
    save_every: str = typer.Option(None, "--save-every", callback=options.at_least_one, metavar="N",
                                   help="checkpoint every K steps"),
    hardware: Path = typer.Option(None, "--hardware", help="price with a measured profile from `rlhfc profile`"),
    coefficients: Path = typer.Option(None, "--coefficients", help="cost-model coefficients from `rlhfc calibrate`"),
    wandb: str = typer.Option(None, "--wandb", help="also log metrics and samples to this W&B project"),
) -> None:
    """Compile and train: metrics in OUT/metrics.jsonl (measured and estimated time per
    call), the calls' cost inputs for `rlhfc calibrate` in OUT/cost_inputs.json,
    checkpoints in OUT/checkpoint."""
    from rlhfc_runtime.contract.rundir import RunDirError, RunLock, check_fresh

    out = out or Path("runs") / file.stem
    lock = RunLock(out)
    try:
        lock.acquire()  # before anything is written into OUT
        check_fresh(out, resume, overwrite)
    except (RunDirError, OSError) as e:
        lock.release()
        _err.print(f"[red]error[/]: {e}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    try:
        _run_locked(file, out, devices=devices, steps=steps, resume=resume, plot=plot, symmetric=symmetric,
                    save_every=save_every, keep=keep, wandb=wandb, hardware=hardware, coefficients=coefficients)
    finally:
        lock.release()


def _run_locked(file: Path, out: Path, *, devices, steps, resume, plot, symmetric, save_every, keep, wandb,
                hardware, coefficients) -> None:
    from rlhfc.planner.cost.fit import COST_INPUTS_FILE, cost_inputs_json
    from rlhfc_runtime.contract.rundir import has_checkpoint

    from rlhfc.cli.profile import machine_profile

    prog, text = _compile_or_exit(file, devices=devices, symmetric=symmetric, output=out / "program.py",
                                  hardware=hardware, coefficients=coefficients,
                                  measure=lambda cluster: machine_profile(cluster.devices_per_node, _err))
    if resume:
        _refuse_a_changed_program(prog, out)
    out.mkdir(parents=True, exist_ok=True)
    options.write_or_exit(out / "program.py", text)
    options.write_or_exit(out / COST_INPUTS_FILE, cost_inputs_json(prog))
    total = steps or (prog.dataflow.run.steps if prog.dataflow.run else 1)
    cmd = [sys.executable, str(out / "program.py"), "--out", str(out), "--steps", str(total)]
    cmd += ["--resume"] if resume else []
    cmd += ["--save-every", str(save_every)] if save_every else []
    cmd += ["--keep", str(keep)] if keep else []
    cmd += ["--wandb", wandb] if wandb else []
    _err.print(f"[bold]{file}[/]: {prog.world_size} process(es), plan {prog.plan.status}, "
               f"{len(prog.ops)} ops per step → {out}")
    _fetch_hub(prog)
    again = f"rlhfc run {file} --out {out} --resume" + (f" --devices {devices}" if devices else "")
    code, signum = _follow(cmd, out, total)
    if signum:
        _err.print(_stopped(out, signum, again), markup=False, highlight=False)
        raise typer.Exit(128 + signum)
    if code != 0:
        said = [ln[len("rlhfc: "):] for ln in _log_lines(out / "worker.log") if ln.startswith("rlhfc: ")]
        said = [ln for ln in said if not ln.startswith("the run stopped")]
        for line in said[-5:] or _log_lines(out / "worker.log")[-3:]:
            _err.print(line, markup=False, highlight=False)
        after = (f"Continue from the last checkpoint with: {again}" if has_checkpoint(out) else
                 "No checkpoint was written yet: fix the cause and run the same command again.")
        _err.print(f"[red]error[/]: the run stopped (exit code {code}); the log is {out / 'worker.log'}.\n{after}",
                   highlight=False)
        raise typer.Exit(1)
    _err.print(summarize(read_metrics(out / "metrics.jsonl")) + f"; metrics in {out / 'metrics.jsonl'}")
    if plot:
        _err.print(f"wrote {plot_metrics(out / 'metrics.jsonl', out / 'curves.png')}")


def _fetch_hub(prog: OpProgram) -> None:
    """Resolve the program's hub ids here, weights included, before the program starts:
    a download's progress bars then show on this terminal (the program writes to
    worker.log), and the program finds everything in the cache."""
    from rlhfc.backend.emit import program_spec
    from rlhfc_runtime.contract import hub

    try:
        for ref, path in hub.fetch(program_spec(prog)).items():
            _err.print(f"{ref} → {path}", markup=False, highlight=False)
    except hub.HubError as e:
        _err.print(f"[red]error[/]: {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def _refuse_a_changed_program(prog: OpProgram, out: Path) -> None:
    """`--resume` with a program its checkpoint cannot follow (a shape, a head, a dataset,
    the calls, the seed): every change on screen and exit 1, before OUT/program.py is
    replaced or any worker starts. The comparison is the runtime's own (`contract.resume`)."""
    from rlhfc.backend.emit import program_spec
    from rich.markup import escape

    from rlhfc_runtime.contract.resume import check_resumable, resolve_paths
    from rlhfc_runtime.contract.rundir import RunDirError

    program = resolve_paths(program_spec(prog, str(out)), (out / "program.py").resolve().parent)
    try:
        check_resumable(out, program)
    except RunDirError as e:
        _err.print(f"[red]error[/]: {escape(str(e))}", markup=True, highlight=False)
        raise typer.Exit(1) from None


def _log_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return []


def _stopped(out: Path, signum: int, again: str) -> str:
    """The one line after a stop: what was kept, what was lost, how to continue."""
    from rlhfc_runtime.contract.rundir import step_dirs

    done = max((r["step"] for r in read_metrics(out / "metrics.jsonl")), default=0)
    dirs = step_dirs(out)
    saved = int(dirs[0].name.split("-")[1]) if dirs else 0
    if done == 0:
        kept = "no step had finished"
    elif saved >= done:
        kept = f"checkpoint at step {saved}, nothing lost"
    else:
        kept = f"steps {saved + 1}..{done} are lost (the last checkpoint is step {saved})"
    return f"stopped by {signal.Signals(signum).name} after step {done}; {kept}; resume with: {again}"


def summarize(records: list[dict], window: int = 10) -> str:
    """One line saying whether training moved: the mean reward (or loss, where a run has
    no reward) of the first and last `window` steps, and the time per step."""
    if not records:
        return "no steps recorded"
    name = next((n for n in ("reward", "reward_accuracy", "loss") if _pick(records[-1], n) is not None), None)
    line = f"{records[-1]['step']} steps, {statistics.median(r['time/iteration'] for r in records):.3f} s/step (median)"
    if name is None:
        return line
    values = [v for v in (_pick(r, name) for r in records) if v is not None]
    head, tail = values[:window], values[-window:]
    return (f"{line}; {name} {sum(head) / len(head):.3f} (first {len(head)}) "
            f"→ {sum(tail) / len(tail):.3f} (last {len(tail)})")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (empty if it does not exist yet); a line
    being written, or damaged, is skipped."""
    from rlhfc_runtime.contract.rundir import read_metrics_lines

    return read_metrics_lines(path)[0]


def _pick(record: dict, name: str) -> float | None:
    """A metric by its last name part (`reward`, `ref_kl`, `loss`), first call first."""
    keys = sorted(k for k in record if k.split("/")[-1] == name and not k.startswith(("time/", "estimate/")))
    return record[keys[0]] if keys else None


GRACE_S = 60.0  # how long a stopped program may take to reach a step boundary and save


def _follow(cmd: list[str], out: Path, total: int) -> tuple[int, int]:
    """Run the program in its own process group, showing step, reward, KL, loss and time
    per call as it goes; (exit status, the stop signal received or 0). SIGINT / SIGTERM
    go to the whole group (program and workers); whatever is left after GRACE_S, or
    after the program ends, is killed, so no worker outlives the run."""
    metrics = out / "metrics.jsonl"
    step_width = len(f"step {total}/{total}")
    info_width = max(20, _err.width - step_width - 20 - 7 - 3)  # what the bar and the clock leave
    columns = [TextColumn("[bold]step {task.completed:.0f}/{task.total:.0f}",
                          table_column=Column(no_wrap=True, min_width=step_width)),
               BarColumn(bar_width=20), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis",
                                                                     max_width=info_width))]
    got: list[tuple[int, float]] = []

    def forward(signum, frame):
        got.append((signum, time.monotonic()))
        _signal_group(proc.pid, signum)

    with (out / "worker.log").open("w") as log, Progress(*columns, console=_err) as bar:
        task = bar.add_task("train", total=total, info="starting workers…")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            shown = time.monotonic()
            while proc.poll() is None:
                time.sleep(0.2)
                if got and time.monotonic() - got[0][1] > GRACE_S:
                    _signal_group(proc.pid, signal.SIGKILL)
                _update(bar, task, read_metrics(metrics))
                if time.monotonic() - shown > SAMPLE_EVERY_S and (line := recent_sample(out / "samples.jsonl")):
                    bar.console.print(line, markup=False, highlight=False)
                    shown = time.monotonic()
            _update(bar, task, read_metrics(metrics))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _signal_group(proc.pid, signal.SIGKILL)  # no orphans, whatever happened
    return proc.returncode, (got[0][0] if got else 0)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


SAMPLE_EVERY_S = 20.0


def recent_sample(path: Path) -> str | None:
    """The last decoded sample of a run as one line: step, reward, prompt → completion."""
    try:
        last = json.loads(_last_line(path))
    except (OSError, ValueError):
        return None
    prompt = " ".join(str(last.get("prompt", "")).split())[-60:]
    return f"  sample step {last['step']} reward {last['reward']:.2f}: {prompt} → {last.get('completion', '')!r}"


def _last_line(path: Path, chunk: int = 8192) -> bytes:
    """The last non-empty line of a file, read from its end in growing chunks (a sample
    row with its token ids and log-probs can be longer than any fixed tail)."""
    with path.open("rb") as f:
        end = f.seek(0, 2)
        data = b""
        while end > 0 and b"\n" not in data.rstrip(b"\n"):
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start) + data
            end, chunk = start, chunk * 2
    return data.rstrip(b"\n").rsplit(b"\n", 1)[-1]


def _update(bar: Progress, task, records: list[dict]) -> None:
    if not records:
        return
    last = records[-1]
    parts = [f"{name} {v:.3f}" for name, v in
             (("reward", _pick(last, "reward")), ("kl", _pick(last, "ref_kl")), ("loss", _pick(last, "loss")))
             if v is not None]
    calls = [f"{k[5:]} {v:.2f}s" for k, v in last.items()
             if k.startswith("time/") and k != "time/iteration" and " " not in k]
    bar.update(task, completed=last["step"], info="  ".join(parts + calls))


def plot_metrics(metrics: Path, png: Path) -> Path:
    """Reward and KL against step, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, word in zip(axes, ("reward", "ref_kl")):
        points = [(r["step"], _pick(r, word)) for r in records if _pick(r, word) is not None]
        if points:
            ax.plot(*zip(*points))
        ax.set_xlabel("step")
        ax.set_title(word)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


