"""Writing a whole file so that a reader sees the old one or the new one, never a torn
one, and a failure (a full disk) says which file and how many bytes it needed. Used by
the compiler's outputs and by every file a run writes. Pure Python, no torch."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_error(err: OSError, path: Path, need: int) -> OSError:
    """`err` as an OSError naming `path` and the bytes the write needed."""
    why = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return OSError(err.errno or errno.EIO, f"{why} ({need} bytes needed)", str(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes) -> None:
    """`data` into PATH.tmp beside `path`, synced, then renamed over it (keeping an existing
    file's permissions); on an error the temp file is removed and the OSError names `path`
    and the bytes needed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.exists() and not path.is_file():  # never rename over a device (/dev/full) or a directory
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if path.exists():
                os.fchmod(fd, path.stat().st_mode & 0o7777)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_error(err, path, len(data)) from None


def append_atomic(path: Path, data: bytes) -> None:
    """Append `data` to `path` whole or not at all: a failed append is cut back off, so
    a full disk never leaves half a line."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise write_error(err, path, len(data)) from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        _write_all(fd, data)
    except OSError as err:
        os.ftruncate(fd, start)
        raise write_error(err, path, len(data)) from None
    finally:
        os.close(fd)
