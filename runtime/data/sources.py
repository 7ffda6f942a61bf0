"""Row sources: a dataset file read row by row on demand, never loaded whole.

- JSONL: one pass at start-up checks every line (valid JSON object, the role fields are
  strings) and keeps only its byte offset; a row is read by seeking to it.
- Parquet: pyarrow with a memory map; a row reads its row group (the last one is cached).
- `datasets`: Hugging Face `datasets` (`load_dataset("json" | "parquet", data_files=…)` or a
  `save_to_disk` directory), memory-mapped Arrow files.

Errors name FILE:LINE (JSONL) or FILE:row N, so a bad row stops the run before its first step.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from pathlib import Path

from rlhfc_runtime.contract.rows import DataError, check_row, parse_row, regular, scan_jsonl


class JsonlRows:
    def __init__(self, path: Path, required: Sequence[str]):
        self.path, self.offsets, self.lines = path, array("q"), array("q")
        for offset, line_no, _ in scan_jsonl(path, required):
            self.offsets.append(offset)
            self.lines.append(line_no)
        self._file = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the run
        self._file.seek(self.offsets[i])
        return parse_row(self._file.readline(), self.path, self.lines[i])

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"


class ParquetRows:
    def __init__(self, path: Path, required: Sequence[str]):
        pq = _need("pyarrow.parquet", "pyarrow")
        self.path, self.file = path, pq.ParquetFile(str(path), memory_map=True)
        names = self.file.schema_arrow.names
        missing = [k for k in required if k not in names]
        if missing:
            raise DataError(f"{path}:1: no field(s) {', '.join(missing)} (the rows have: {', '.join(names)})")
        meta = self.file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self.required, self._cached = list(required), (None, None)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        import bisect

        g = bisect.bisect_right(self.starts, i) - 1
        if self._cached[0] != g:
            self._cached = (g, self.file.read_row_group(g))
        row = self._cached[1].slice(i - self.starts[g], 1).to_pylist()[0]
        check_row(row, self.required, self.where(i))
        return row

    def where(self, i: int) -> str:
        return f"{self.path}:row {i + 1}"


class HFRows:
    def __init__(self, path: Path, required: Sequence[str]):
        datasets = _need("datasets", "datasets")
        if path.is_dir():
            self.data = datasets.load_from_disk(str(path))
        else:
            builder = "parquet" if path.suffix == ".parquet" else "json"
            self.data = datasets.load_dataset(builder, data_files=str(path), split="train")
        missing = [k for k in required if k not in self.data.column_names]
        if missing:
            raise DataError(f"{path}:1: no field(s) {', '.join(missing)} "
                            f"(the rows have: {', '.join(self.data.column_names)})")
        self.path, self.required = path, list(required)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[int(i)]
        check_row(row, self.required, self.where(i))
        return row

    def where(self, i: int) -> str:
        return f"{self.path}:row {i + 1}"


SOURCES = {"jsonl": JsonlRows, "parquet": ParquetRows, "datasets": HFRows}


def open_rows(path: str | Path, fmt: str, required: Sequence[str]):
    """The rows of a dataset file in format `fmt`, each checked to hold string `required` fields."""
    path = Path(path)
    regular(path, "dataset file", directory_ok=fmt == "datasets")
    rows = SOURCES[fmt](path, required)
    if not len(rows):
        raise DataError(f"{path}:1: no rows")
    return rows


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"this dataset format needs {package}: pip install 'rlhfc[data]'") from None
