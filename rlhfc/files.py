"""Reading and writing the user's files safely: stat before open, so a FIFO, a device,
a directory or a huge file is refused without being read (nothing hangs, nothing is
slurped), and messages name the path, never the file's contents."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from rlhfc_runtime.contract.atomic import write_atomic


class FileProblem(ValueError):
    """A file that cannot be used; the message names the path and why."""


def regular_file(path: Path, limit: int, what: str = "file") -> int:
    """The size of `path` if it is a regular file of at most `limit` bytes, else FileProblem."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise FileProblem(f"cannot read `{path}`: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileProblem(f"{what} `{path}` is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem(f"{what} `{path}` is not a regular file (a FIFO, socket or device)")
    if st.st_size > limit:
        raise FileProblem(f"{what} `{path}` is larger than {limit // 1024} KiB")
    return st.st_size


def read_bytes(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (FileProblem otherwise)."""
    regular_file(path, limit, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a swap for a FIFO cannot block us
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FileProblem(f"cannot read `{path}`: {e.strerror or e}") from None
    if len(data) > limit:
        raise FileProblem(f"{what} `{path}` is larger than {limit // 1024} KiB")
    return data


def read_text(path: Path, limit: int, what: str = "file") -> str:
    try:
        return read_bytes(path, limit, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileProblem(f"{what} `{path}` is not UTF-8 text (byte {e.start})") from None


def writable_target(path: Path, what: str = "output") -> None:
    """Refuse an output path that is a directory, not a regular file (`/dev/full`), or
    below something that is not a writable directory (missing directories may be made)."""
    path = Path(path)
    if path.is_dir():
        raise FileProblem(f"{what} `{path}` is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise FileProblem(f"{what} `{path}` is not a regular file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileProblem(f"{what} `{path}`: `{parent}` is not a directory")
    if not os.access(parent, os.W_OK):
        raise FileProblem(f"{what} `{path}`: cannot write into `{parent}`")


def write_output(path: Path, data: str | bytes, what: str = "output") -> None:
    """Write a whole output file atomically (missing directories are made); FileProblem
    naming the path and the bytes needed when it cannot be written (a full disk)."""
    writable_target(path, what)
    try:
        write_atomic(Path(path), data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as e:
        raise FileProblem(f"cannot write {what} `{path}`: {e.strerror}") from None
