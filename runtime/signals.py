"""SIGINT / SIGTERM: stop at the next step boundary, with a checkpoint, on every rank.

A worker's handler only records the signal; the engine asks `agreed()` at every step
boundary, a MAX all-reduce over the world, so a signal that reached one rank stops all
of them at the same step. A repeat of the signal more than `GRACE_S` after the first
ends the worker at once (what the message then says is lost); a repeat within it is the
same stop arriving by two routes (the terminal's process group and the launcher's
forwarding) and is ignored. The launcher of local workers forwards what it receives.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 2.0


def name(signum: int) -> str:
    return signal.Signals(signum).name


class StopFlag:
    """The first stop signal this process received (0: none)."""

    def __init__(self):
        self.signum = 0
        self.when = 0.0

    def install(self) -> "StopFlag":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and time.monotonic() - self.when > GRACE_S:
            os._exit(128 + signum)  # asked twice: stop now, without a checkpoint
        if not self.signum:
            self.signum, self.when = signum, time.monotonic()

    def agreed(self) -> int:
        """The stop signal any rank received (0: none); collective over the world."""
        t = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


class Forwarder:
    """The launcher's handler: records the signal and passes it on to the workers."""

    def __init__(self):
        self.signum = 0
        self.pids: list[int] = []

    def install(self) -> "Forwarder":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        for pid in self.pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
