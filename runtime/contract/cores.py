"""The CPU cores a process may use, and each local process's share of them: what the
runtime sets its compute threads to and what `rlhfc profile` records as `cores`.

A process owns max(1, usable cores // processes on this node) cores and computes with
that many threads; `RLHFC_THREADS` overrides it (a whole number, at least 1).
"""

from __future__ import annotations

import os

THREADS_ENV = "RLHFC_THREADS"


def physical_cores() -> int:
    """The cores this process may run on (its CPU affinity; the machine's count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_process(local_processes: int, cores: int, override: str | None = None) -> int:
    """Compute threads of each of `local_processes` processes that share `cores` cores:
    the cores each owns, max(1, cores // local_processes); `override` (the value of
    RLHFC_THREADS, if set and not empty) wins. A bad override is a ValueError naming it."""
    if override is not None and override.strip():
        try:
            threads = int(override)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"{THREADS_ENV}={override!r}: expected a whole number of threads, at least 1")
        return threads
    return max(1, cores // max(1, local_processes))
