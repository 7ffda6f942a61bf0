"""Multi-node launch: an sbatch script that runs a generated program on the cluster
block's nodes, one `srun` task a node, each a `torchrun` that starts that node's
workers; the nodes find each other through torchrun's c10d rendezvous on the job's first
host (`scontrol show hostnames`), so there is no launcher of our own.

Every path and value that reaches the script is shell-quoted (`shlex.quote`); the
`#SBATCH` lines, which sbatch parses before any shell, hold only numbers and a job name
reduced to `[A-Za-z0-9._-]`. Paths are made absolute: a job runs wherever Slurm starts
it, and a batch script is copied away from where it was written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from rlhfc.backend.emit import TEMPLATES
from rlhfc.backend.lower import OpProgram


def job_name(stem: str) -> str:
    """A Slurm job name from a program's file name: safe characters only, never empty."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:64] or "rlhfc"


def sbatch_script(prog: OpProgram, program: Path, run_dir: Path) -> str:
    """The sbatch script that runs the generated `program` into `run_dir` on the nodes
    and devices of the program's cluster block (GPUs requested unless it is `cpu`)."""
    cluster = prog.dataflow.cluster
    return TEMPLATES.get_template("sbatch.sh.j2").render(
        job_name=job_name(Path(prog.dataflow.source or "rlhfc").stem),
        nodes=int(cluster.nodes),
        devices=int(cluster.devices_per_node),
        gpus=cluster.device != "cpu",
        program=shlex.quote(str(program.resolve())),
        run_dir=shlex.quote(str(run_dir.resolve())),
    )


def sbatch_path(program: Path) -> Path:
    """Where the script goes: beside the generated program, `NAME.sbatch`."""
    return program.with_suffix(".sbatch")
