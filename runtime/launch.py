"""The entry point of a generated program: options, the run directory's lock, the
choice of checkpoint to resume, the local world (or one torchrun worker), signals, and
one line at the end saying what happened.

Exit status: 0 done, 1 an error (one located message; a worker's traceback goes to
stderr above it, which `rlhfc run` keeps in OUT/worker.log), 128 + signal when stopped
by SIGINT (130) or SIGTERM (143), after a checkpoint at the step boundary.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from rlhfc_runtime import ckpt_store, signals
from rlhfc_runtime import dist as rdist
from rlhfc_runtime.contract.hub import HubError
from rlhfc_runtime.contract.rundir import RunDirError, RunLock, check_fresh, has_checkpoint, step_dir_name
from rlhfc_runtime.contract.resume import resolve_paths
from rlhfc_runtime.engine import Engine
from rlhfc_runtime.engines import close_engines
from rlhfc_runtime.errors import RunError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse(program, argv) -> dict:
    parser = argparse.ArgumentParser(description=f"RLHF job compiled from {program.source}")
    parser.add_argument("--out", default="runs/latest", help="run directory: metrics, checkpoints")
    parser.add_argument("--steps", type=_positive, default=None, help="stop after this many steps")
    parser.add_argument("--save-every", type=_positive, default=None, help="checkpoint every K steps")
    parser.add_argument("--keep", type=_positive, default=None, help="keep the last K checkpoints (default 2)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run directory with a checkpoint")
    parser.add_argument("--wandb", default=None, metavar="PROJECT", help="also log metrics and samples to Weights & Biases")
    return vars(parser.parse_args(argv))


def _worker(program, layouts, groups, ops, options) -> dict:
    stop = signals.StopFlag().install()
    try:
        return Engine(program, layouts, groups, options).run(ops, stop)
    finally:  # an engine's own processes (vLLM's) end with the run, failed or not
        close_engines()


def stop_line(signum: int, step: int, saved: int, resume: str) -> str:
    """What a stop did, and how to continue."""
    if saved >= step and step > 0:
        kept = f"checkpoint {step_dir_name(saved)} written, nothing lost"
    elif step == 0:
        kept = "no step had finished, nothing to save"
    else:
        kept = f"steps {saved + 1}..{step} are lost (the last checkpoint is step {saved})"
    return f"rlhfc: stopped by {signals.name(signum)} after step {step}; {kept}; resume with: {resume}"


def _summary(failure: rdist.WorkerFailed) -> str:
    line = failure.summary.strip()
    for prefix in ("rlhfc_runtime.errors.RunError: ", "RunError: "):
        if line.startswith(prefix):
            return line[len(prefix):]
    return line


def main(program, layouts, groups, ops, here: str, argv=None) -> None:
    """Parse options, then run as one torchrun worker, or the local world (one process:
    in this one; more: spawned)."""
    options = parse(program, argv)
    try:
        program = resolve_paths(program, Path(here).resolve().parent)
    except HubError as e:
        print(f"rlhfc: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    out = Path(options["out"])
    resume = f"python {shlex.quote(here)} --out {shlex.quote(str(out))} --resume"
    if "RANK" in os.environ:
        _torchrun_worker(program, layouts, groups, ops, options, out, resume)
        return
    lock = RunLock(out)
    try:
        lock.acquire()
        check_fresh(out, options["resume"], options["overwrite"])
        if options["resume"]:
            directory, notes = ckpt_store.prepare(out, program)
            for note in notes:
                print(f"rlhfc: {note}", file=sys.stderr, flush=True)
            options["checkpoint"] = str(directory) if directory else None
            options["resume"] = directory is not None
        forward = signals.Forwarder().install()
        try:
            results = _local_world(program, layouts, groups, ops, options, forward)
        except rdist.WorkerFailed as e:
            print(str(e), file=sys.stderr, flush=True)  # the traceback, for the log
            if forward.signum:
                print(f"rlhfc: stopped by {signals.name(forward.signum)} before a step boundary; the steps after "
                      f"the last checkpoint are lost; resume with: {resume}", file=sys.stderr)
                raise SystemExit(128 + forward.signum) from None
            after = (f"rerun with --resume to continue from the last checkpoint: {resume}" if has_checkpoint(out)
                     else "no checkpoint was written yet: fix the cause and run it again")
            print(f"rlhfc: error: {_summary(e)}\nrlhfc: the run stopped; {after}", file=sys.stderr)
            raise SystemExit(1) from None
    except (RunDirError, RunError) as e:
        print(f"rlhfc: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        lock.release()
    _finish(results[0], resume)


def _local_world(program, layouts, groups, ops, options, forward: signals.Forwarder) -> list[dict]:
    """Each rank's result: one process runs in this one (its StopFlag takes the signals
    directly), more are spawned, with the launcher forwarding signals to them."""
    args = (program, layouts, groups, ops, options)
    if program.world_size == 1:
        return [rdist.run_here(_worker, *args)]
    return rdist.spawn(_worker, program.world_size, *args, on_start=forward.pids.extend)


def _torchrun_worker(program, layouts, groups, ops, options, out, resume) -> None:
    lock = RunLock(out)
    try:
        if os.environ["RANK"] == "0":
            lock.acquire()
            check_fresh(out, options["resume"], options["overwrite"])
        rdist.use_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        result = _worker(program, layouts, groups, ops, options)
    except (RunDirError, RunError) as e:
        print(f"rlhfc: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        rdist.leave_world()
        lock.release()
    if os.environ["RANK"] == "0" or result["stopped"]:
        _finish(result, resume, quiet=os.environ["RANK"] != "0")


def _finish(result: dict, resume: str, quiet: bool = False) -> None:
    if result["stopped"]:
        if not quiet:
            print(stop_line(result["stopped"], result["step"], result["saved"], resume), file=sys.stderr)
        raise SystemExit(128 + result["stopped"])
