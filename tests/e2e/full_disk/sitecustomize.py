"""Fault injection for tests: a full disk for chosen files, in every process of a run.

Put this directory on PYTHONPATH and set RLHFC_TEST_FULL_DISK to `PATTERN@N` (fnmatch
on the absolute path, a trailing `.tmp` ignored): the first N writes to a matching file
succeed, later ones fail as a full disk does. `os.write` writes half the bytes and
raises ENOSPC; safetensors' `save_file` leaves a short file and reports nothing, which
is what the real one does on a full disk."""

import errno
import fnmatch
import os

_SPEC = os.environ.get("RLHFC_TEST_FULL_DISK")

if _SPEC:
    _PATTERN, _, _ALLOWED = _SPEC.partition("@")
    _seen = {"writes": 0}

    def _full(path: str) -> bool:
        path = path[:-len(".tmp")] if path.endswith(".tmp") else path
        if not fnmatch.fnmatch(path, _PATTERN):
            return False
        _seen["writes"] += 1
        return _seen["writes"] > int(_ALLOWED or 0)

    _write = os.write

    def _failing_write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path and _full(path):
            _write(fd, bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return _write(fd, data)

    os.write = _failing_write

    import safetensors.torch

    _save_file = safetensors.torch.save_file

    def _short_save_file(tensors, filename, metadata=None):
        _save_file(tensors, filename, metadata=metadata)
        if _full(os.path.abspath(filename)):
            os.truncate(filename, os.path.getsize(filename) // 2)

    safetensors.torch.save_file = _short_save_file
