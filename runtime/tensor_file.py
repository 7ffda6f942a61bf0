"""A safetensors file written tensor by tensor: its header (names, dtypes, shapes,
offsets) is known before any data, so a writer holds one tensor at a time, never the
file. Written to PATH.tmp, checked complete, synced and renamed over PATH; a failure (a
full disk) removes the temp file and raises an OSError naming PATH and the bytes needed.
The files are plain safetensors: `safe_open`, `load_file` and `transformers` read them.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from rlhfc_runtime.contract.atomic import write_error

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TensorFile:
    """`entries`: (key, dtype, shape) in file order; `write(key, tensor)` in that order,
    then `close()`; `abort()` on any failure."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path, self.tmp = Path(path), Path(path).with_name(Path(path).name + ".tmp")
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        self.order = []
        for key, dtype, shape in entries:
            size = _itemsize(dtype)
            for n in shape:
                size *= n
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((key, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.head = len(raw).to_bytes(8, "little") + raw
        self.need = len(self.head) + offset
        self.next = 0
        self.fd = None
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._put(memoryview(self.head))
        except OSError as err:
            self._fail(err)

    def _put(self, view: memoryview) -> None:
        while view:
            view = view[os.write(self.fd, view):]

    def _fail(self, err: OSError):
        self.abort()
        raise write_error(err, self.path, self.need) from None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.order[self.next]
        if key != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            self.abort()
            raise ValueError(f"{self.path}: expected {want} {dtype} {shape}, got {key} {tensor.dtype} {tuple(tensor.shape)}")
        self.next += 1
        data = tensor.detach().to("cpu").contiguous()
        try:
            if data.numel():
                self._put(memoryview(data.view(-1).view(torch.uint8).numpy()))
        except OSError as err:
            self._fail(err)

    def close(self) -> None:
        if self.next != len(self.order):
            self.abort()
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensor(s) not written")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            if os.stat(self.tmp).st_size != self.need:
                raise OSError(errno.ENOSPC, "written short")
            os.replace(self.tmp, self.path)
        except OSError as err:
            self._fail(err)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)
