"""What rank 0 records of a run: OUT/metrics.jsonl (one record per step), OUT/samples.jsonl
(a few prompt / completion / reward rows per step, decoded and as token ids with the
generating policy's log-probs: `rewards.score_rows`, `rewards.with_logprobs`), TensorBoard scalars
(OUT/tensorboard, when tensorboard is installed) and, with `--wandb PROJECT`, Weights &
Biases (when `wandb` is installed; `WANDB_MODE=offline` works without a network).

On resume both files are cut back to the resumed step, so no step appears twice.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rlhfc_runtime.contract.atomic import append_atomic, write_atomic
from rlhfc_runtime.contract.rundir import read_metrics_lines
from rlhfc_runtime.errors import RunError


def _truncate(path: Path, start_step: int) -> None:
    """Keep the records up to `start_step`; lines that are not records (a partial last
    line after a crash) are dropped, saying so. Replaced atomically."""
    records, bad = read_metrics_lines(path)
    if bad:
        print(f"rlhfc: {path}: dropped {len(bad)} damaged line(s) (line {', '.join(map(str, bad[:5]))})",
              file=sys.stderr, flush=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= start_step).encode())


class MetricsLog:
    def __init__(self, out: Path, start_step: int, wandb_project: str | None = None):
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.samples_path = out / "metrics.jsonl", out / "samples.jsonl"
        for path in (self.path, self.samples_path):
            _truncate(path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: JSONL is the record of truth
            self.board = None
        else:
            self.board = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("rlhfc: --wandb needs the wandb package (pip install wandb); logging to files only",
                      file=sys.stderr)
            else:
                self.wandb = wandb.init(project=wandb_project, dir=str(out), resume="allow",
                                        id=os.environ.get("WANDB_RUN_ID"), mode=os.environ.get("WANDB_MODE"))

    def write(self, record: dict, samples: list[dict] = ()) -> None:
        try:
            if samples:
                append_atomic(self.samples_path, "".join(json.dumps(row) + "\n" for row in samples).encode())
            append_atomic(self.path, (json.dumps(record) + "\n").encode())  # last: the step is recorded
        except OSError as err:  # a full disk: the files keep whole lines only
            raise RunError(f"{err.filename}: {err.strerror}; step {record['step']} was not recorded") from None
        if self.board is not None:
            for k, v in record.items():
                self.board.add_scalar(k, v, record["step"])
            self.board.flush()
        if self.wandb is not None:
            logged = {k: v for k, v in record.items() if k != "step"}
            if samples:
                import wandb

                columns = sorted({k for row in samples for k in row}, key=lambda k: (k != "step", k))
                logged["samples"] = wandb.Table(columns=columns,
                                                data=[[_cell(row.get(c)) for c in columns] for row in samples])
            self.wandb.log(logged, step=record["step"])


def _cell(value):
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
