"""The run directory (OUT) as the CLI and the runtime share it: one run at a time (a lock
file naming its holder), a fresh run refusing to clobber a checkpoint, the step
directories of checkpoints, and metrics.jsonl read back safely.

Pure Python, no torch: `rlhfc run` uses it before it starts anything.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK = ".lock"
STEP_PREFIX = "step-"
LOCK_ENV = "RLHFC_RUN_LOCK"  # a child of the lock holder (rlhfc run -> program.py) shares its lock


class RunDirError(Exception):
    """A run directory that cannot be used as asked; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def step_dirs(out: Path) -> list[Path]:
    """OUT/checkpoint/step-* directories that are complete (renamed from .partial), newest first."""
    ckpt = Path(out) / "checkpoint"
    if not ckpt.is_dir():
        return []
    found = [p for p in ckpt.iterdir() if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def has_checkpoint(out: Path) -> bool:
    """Whether OUT holds a checkpoint of any format (a fresh run must not clobber it)."""
    ckpt = Path(out) / "checkpoint"
    return bool(step_dirs(out)) or (ckpt / "latest").exists() or any(ckpt.glob("rank*.pt"))


def check_fresh(out: Path, resume: bool, overwrite: bool) -> None:
    """A fresh run into OUT: refuse a directory that holds a checkpoint unless the user
    said --resume or --overwrite; --overwrite clears what the old run left."""
    out = Path(out)
    if resume or not has_checkpoint(out):
        return
    if not overwrite:
        raise RunDirError(f"{out} holds a checkpoint of an earlier run; continue it with --resume, "
                          f"or start over with --overwrite (which deletes it)")
    for name in ("checkpoint", "hf", "tensorboard"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)


class RunLock:
    """OUT/.lock, created exclusively, holding {"pid", "host", "since"}. A lock whose
    holder is gone (same host, pid not alive) is taken over; a live one refuses."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        inherited = os.environ.get(LOCK_ENV)
        if inherited and inherited == _read(self.path).get("token"):
            return self  # our parent holds it for us
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        me["token"] = f"{me['host']}:{me['pid']}:{time.time_ns()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if _alive(holder):
                    raise RunDirError(
                        f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since')}); wait for it, stop it, or "
                        f"choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its holder is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            os.environ[LOCK_ENV] = me["token"]
            return self
        raise RunDirError(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self.held and _read(self.path).get("token") == os.environ.get(LOCK_ENV):
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read(path: Path) -> dict:
    try:
        if path.is_file() and path.stat().st_size < 4096:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        pass
    return {}


def _alive(holder: dict) -> bool:
    """Whether a lock's holder still runs: on another host we cannot tell, so yes."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_metrics_lines(path: Path) -> tuple[list[dict], list[int]]:
    """The records of metrics.jsonl and the 1-based line numbers that were not records
    (a partial last line after a crash), so a resume can drop them and say so."""
    records, bad = [], []
    if not Path(path).is_file():
        return records, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad.append(i)
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                records.append(rec)
            else:
                bad.append(i)
    return records, bad
