"""Process setup: torchrun starts our init unchanged, group creation does not depend on
the order callers list layouts in, a failing spawned worker is reported clearly, and each
process computes with the cores it owns."""

import subprocess
import sys
import textwrap

import pytest

from rlhfc_runtime.contract.cores import physical_cores, threads_per_process
from rlhfc_runtime.dist import WorkerFailed, run_here, spawn, use_threads
from rlhfc_runtime.errors import RunError
from rlhfc_runtime.contract.layout import Layout

SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from rlhfc_runtime.dist import init_from_env, ensure_groups, rank_groups, group
    from rlhfc_runtime.contract.layout import Layout
    rank = init_from_env()
    a, b = Layout((0, 1), 1, 2, 1), Layout((1, 0), 2, 1, 1)
    ensure_groups([a, b] if rank == 0 else [b, a])  # different order on each rank
    g = rank_groups(b)
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x, group=g.dp)
    y = torch.tensor([float(10 * (rank + 1))])
    dist.all_reduce(y, group=group((0, 1)))
    line = f"rank {rank} dp_rank {g.dp_rank} sum {x.item()} {y.item()} backend {dist.get_backend()}\\n"
    os.write(1, line.encode())  # one write: the two ranks share stdout, print's pieces interleave
    dist.destroy_process_group()
""")


def test_torchrun_starts_workers_and_groups_match_across_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(l for l in out.stdout.splitlines() if l.startswith("rank "))
    # layout b lists rank 1 first, so rank 1 is dp_rank 0
    assert lines == ["rank 0 dp_rank 1 sum 3.0 30.0 backend gloo", "rank 1 dp_rank 0 sum 3.0 30.0 backend gloo"]


def _fail_on_rank_one(message):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError(message)
    dist.barrier()  # rank 0 waits for a peer that is gone: must not hang the launcher
    return "unreachable"


def test_spawn_reports_the_failing_worker():
    with pytest.raises(WorkerFailed) as err:
        spawn(_fail_on_rank_one, 2, "bad shard in layer 3")
    text = str(err.value)
    assert "worker rank 1 of 2 failed first" in text
    assert "ValueError: bad shard in layer 3" in text


def test_layout_coordinates_follow_the_rank_order():
    lay = Layout((4, 5, 6, 7, 8, 9, 10, 11), dp=2, tp=2, pp=2)
    assert lay.coord(9) == (1, 0, 1)  # index 5 = (1*2 + 0)*2 + 1
    assert lay.tp_group(1, 0) == (8, 9) and lay.dp_group(0, 1) == (5, 7) and lay.pp_group(1, 1) == (7, 11)


@pytest.mark.parametrize("processes, cores, override, threads", [
    (1, 2, None, 2),   # one process owns both cores (it used to compute on one)
    (2, 2, None, 1),
    (3, 2, None, 1),   # more processes than cores: at least one thread each
    (2, 16, None, 8),
    (3, 16, None, 5),  # whole cores only: 16 // 3
    (0, 4, None, 4),   # no count: the process owns them all
    (2, 16, "3", 3),   # RLHFC_THREADS wins, above or below the share
    (1, 2, "8", 8),
    (2, 16, "", 8),    # set but empty: as if unset
])
def test_threads_per_process_is_the_cores_each_process_owns(processes, cores, override, threads):
    assert threads_per_process(processes, cores, override) == threads


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_override_is_one_message(bad, monkeypatch):
    with pytest.raises(ValueError, match="RLHFC_THREADS"):
        threads_per_process(1, 2, bad)
    monkeypatch.setenv("RLHFC_THREADS", bad)
    with pytest.raises(RunError, match=f"RLHFC_THREADS={bad!r}: expected a whole number"):
        spawn(_fail_on_rank_one, 2, "never started")


def _threads_seen():
    import os

    import torch

    return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ["MKL_NUM_THREADS"]


def test_workers_set_torch_openmp_and_mkl_alike(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("RLHFC_THREADS", "3")
    assert run_here(_threads_seen) == (3, "3", "3")
    assert torch.get_num_threads() == before  # restored after the in-process world
    for name in ("RLHFC_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    try:
        assert use_threads(1) == threads_per_process(1, physical_cores()) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
