"""Memory of a run on a large dataset: a ~500 MB JSONL file of arithmetic prompts with an
`answer` column and a long `context` column, GRPO with a Python reward that reads the
column, 2 steps on 2 processes (`rlhfc run --devices 2`). Samples the resident memory of
every process of the run (the CLI, the generated program, its workers) from /proc every
50 ms and reports the peak of their sum and each one's own peak (VmHWM). The dataset is
written to a temporary directory, never into the repository.

    python bench/data_bench.py [--mb 500]      writes bench/results/data_bench.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "data_bench.md"
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_dataset(path: Path, megabytes: int) -> int:
    """Rows {"question", "answer", "context"} up to `megabytes` MB; returns the row count."""
    rng, rows, size = random.Random(0), 0, 0
    filler = "".join(rng.choice("abcdefghij ") for _ in range(4096))
    with path.open("w") as f:
        while size < megabytes * 10**6:
            a, b = rng.randrange(10), rng.randrange(10)
            start = rng.randrange(3500)
            line = json.dumps({"question": f"What is {a}+{b}?", "answer": str(a + b),
                               "context": filler[start:start + 400 + rng.randrange(200)]}) + "\n"
            f.write(line)
            size += len(line)
            rows += 1
    return rows


def program(tmp: Path, data: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(tmp), "--rows", "8"],
                   check=True, capture_output=True)
    (tmp / "rewards.py").write_text((ROOT / "programs" / "rewards.py").read_text())
    path = tmp / "big.rlhf"
    path.write_text((ROOT / "programs" / "grpo_math.rlhf").read_text()
                    .replace('"../data/math/ckpt"', '"ckpt"').replace('"../data/math/train.jsonl"', json.dumps(str(data))))
    return path


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory(pid: int) -> tuple[int, int, str]:
    """(resident bytes now, peak resident bytes, command name) of a live process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    kib = lambda key: int(status.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM"), status["Name"].strip()


def measure(cmd: list[str]) -> dict:
    """Run `cmd`; the peak of the summed RSS of its process tree, each process's peak."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_total, peaks = 0, {}
    while proc.poll() is None:
        total = 0
        for pid in _descendants(proc.pid):
            try:
                rss, hwm, name = _memory(pid)
            except (OSError, KeyError):
                continue
            total += rss
            peaks[pid] = (max(hwm, peaks.get(pid, (0, ""))[0]), name)
        peak_total = max(peak_total, total)
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}):\n{err}")
    return {"seconds": time.monotonic() - t0, "peak_total": peak_total,
            "peaks": sorted(peaks.values(), reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "big.jsonl"
        rows = write_dataset(data, args.mb)
        size = data.stat().st_size
        rlhfc = str(Path(sys.executable).parent / "rlhfc")
        got = measure([rlhfc, "run", str(program(tmp, data)), "--devices", "2", "--steps", "2",
                       "--out", str(tmp / "out")])
    gib = 2**30
    lines = [
        "# data bench: peak memory of a run on a large JSONL dataset",
        "",
        f"`python bench/data_bench.py --mb {args.mb}`: {size / 1e6:.0f} MB, {rows} rows (question, answer, "
        f"a 400-600 character context column), GRPO with a Python reward reading `answer`, 2 steps, "
        f"`rlhfc run --devices 2`. Resident memory sampled every 50 ms over the run's process tree.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| peak of the summed RSS (CLI, program, 2 workers) | {got['peak_total'] / gib:.2f} GiB |",
        f"| wall time (compile, index the file, 2 steps) | {got['seconds']:.1f} s |",
        "",
        "Each process's own peak (VmHWM):",
        "",
        "| process | peak RSS |",
        "|---|---:|",
        *[f"| `{name}` | {hwm / 2**20:.0f} MiB |" for hwm, name in got["peaks"]],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
