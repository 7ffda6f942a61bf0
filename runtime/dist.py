"""Process setup for runtime workers: one `torch.distributed` world, started from the
standard environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK) so that
torchrun and Slurm launch generated programs unchanged, plus a local launcher for
`rlhfc run` and tests, and a cache of the process groups every layout needs.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhfc_runtime.contract.cores import THREADS_ENV, physical_cores, threads_per_process
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.errors import RunError


# How long a collective may wait for a peer before the run stops with an error (a dead
# peer becomes a clear failure instead of a hang); RLHFC_DIST_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 600


def device_for_rank() -> torch.device:
    """The device this process computes on: its LOCAL_RANK's GPU when CUDA is available,
    else the CPU (so the same program runs on a laptop and on a GPU node)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def process_threads(local_processes: int) -> int:
    """The compute threads of one of this node's `local_processes` processes: the cores
    it owns (`threads_per_process` of this process's affinity), or RLHFC_THREADS."""
    try:
        return threads_per_process(local_processes, physical_cores(), os.environ.get(THREADS_ENV))
    except ValueError as e:
        raise RunError(str(e)) from None


def use_threads(local_processes: int) -> int:
    """Compute with `process_threads(local_processes)` threads: torch's intra-op pool
    (which sets OpenMP's and MKL's), and OMP_NUM_THREADS / MKL_NUM_THREADS for what this
    process starts. Returns the count."""
    threads = process_threads(local_processes)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    return threads


def check_ranks_per_gpu(local_ranks: int, gpus: int) -> None:
    """One rank per GPU: NCCL refuses two ranks on one device, so say so up front."""
    if gpus and local_ranks > gpus:
        raise RuntimeError(
            f"{local_ranks} processes on this node but only {gpus} GPU(s): rlhfc runs one rank per GPU. "
            f"Plan for {gpus} device(s) per node (cluster {{ devices_per_node = {gpus} }} or --devices {gpus}), "
            "or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPU processes"
        )


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA tensors where there is a GPU (one world
    serves both: object collectives and host tensors go over gloo)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_from_env(backend: str | None = None) -> int:
    """Join the world described by the environment (idempotent); returns this rank.

    On CUDA: checks one rank per GPU, binds this process to its GPU and passes it as
    `device_id` (NCCL connects eagerly, so batched point-to-point needs no collective
    warm-up); gloo and NCCL share the world. A collective that waits longer than the
    timeout raises instead of hanging."""
    if not dist.is_initialized():
        device = device_for_rank()
        extra = {}
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
            check_ranks_per_gpu(max(local, device.index + 1), torch.cuda.device_count())
            torch.cuda.set_device(device)
            extra["device_id"] = device
        dist.init_process_group(
            backend=backend or backend_for(device),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timedelta(seconds=float(os.environ.get("RLHFC_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))),
            **extra,
        )
    return dist.get_rank()


def exchange(sends=(), recvs=()) -> None:
    """Post point-to-point sends [(tensor, peer)] and receives [(buffer, peer)] as one
    batch (`dist.batch_isend_irecv`: one NCCL group call, so a pair of ranks that both
    send and receive cannot block each other) and wait for all of them."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def all_gather_rows(batch: dict, group, size: int) -> dict:
    """The rows of `batch` (key -> tensor, rows first) of every rank of `group` (`size`
    ranks), concatenated in rank order: tensor collectives on the batch's device (padded
    to the longest chunk, since dp chunks may differ by a row), no pickling."""
    first = next(iter(batch.values()))
    counts = [torch.zeros(1, dtype=torch.int64, device=first.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([first.shape[0]], dtype=torch.int64, device=first.device), group=group)
    rows = [int(c.item()) for c in counts]
    out = {}
    for k in sorted(batch):
        local = batch[k].contiguous()
        padded = local.new_zeros((max(rows), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
        out[k] = torch.cat([part[:n] for part, n in zip(parts, rows)])
    return {k: out[k] for k in batch}


def json_tensor(value, length: int | None = None) -> torch.Tensor:
    """`value` as JSON bytes in a host uint8 tensor, zero-padded to `length` bytes (None:
    exactly its size): what goes over the wire instead of a pickle."""
    data = json.dumps(value).encode("ascii")
    if length is not None and len(data) > length:
        raise ValueError(f"{len(data)} bytes of JSON do not fit in a {length}-byte message")
    out = torch.zeros(len(data) if length is None else length, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def json_of(message: torch.Tensor):
    """The value `json_tensor` wrote (trailing zero padding ignored)."""
    return json.loads(message.cpu().numpy().tobytes().rstrip(b"\0"))


def gather_json(value, size: int) -> list | None:
    """`value` (anything JSON holds) of every rank on rank 0, in rank order; None on the
    others. Two small gloo collectives of host tensors and JSON, where
    `all_gather_object` would pickle every rank's value to every rank."""
    data = json_tensor(value)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64))
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    root = dist.get_rank() == 0
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)] if root else None
    dist.gather(padded, parts, dst=0)
    return [json_of(part) for part in parts] if root else None


def free_port() -> int:
    """A TCP port nothing listens on now, for the local rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerFailed(RuntimeError):
    """A spawned worker raised; the message names the rank and carries its traceback;
    `summary` is the exception's own last line (what the user is shown)."""

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message.strip().splitlines()[-1]


def _local_env(index: int, nprocs: int, port: int) -> dict[str, str]:
    return {"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _failure(error: BaseException) -> str:
    """What a failed worker reports: errors that already say where they come from (the
    user's reward code, a checkpoint that does not fit) as they are, others with their
    traceback."""
    return str(error) if getattr(error, "located", False) else traceback.format_exc()


def _worker(index: int, fn: Callable, nprocs: int, port: int, results, args: tuple) -> None:
    os.environ.update(_local_env(index, nprocs, port))
    use_threads(nprocs)
    init_from_env()
    try:
        # plain pickle copies tensor data (torch's queue would pass fds that die with us)
        results.put((index, True, time.time(), pickle.dumps(fn(*args))))
    except BaseException as e:
        results.put((index, False, time.time(), _failure(e)))
        if getattr(e, "located", False):
            raise SystemExit(1) from None
        raise
    finally:
        leave_world()


def leave_world() -> None:
    """Tear the world down while the interpreter is whole: collect cycles that still hold
    tensors or work objects, destroy every process group, and drop this module's cached
    groups, so that no ProcessGroupGloo (and its threads) is destroyed during interpreter
    finalization, where gloo teardown can abort the process ("terminate called without
    an active exception") after a run that finished."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUPS.clear()


def run_here(fn: Callable, *args: Any) -> Any:
    """Run `fn(*args)` as the one rank of a one-process world in THIS process (no worker
    process to start: `spawn` with one process costs a fresh interpreter and torch
    import); the same world setup and threads (`use_threads`: this process owns every
    core), and a failure raised as the same WorkerFailed. The world's environment
    variables and the thread count are restored afterwards."""
    env = _local_env(0, 1, free_port())
    saved = {k: os.environ.get(k) for k in (*env, "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    threads = torch.get_num_threads()
    use_threads(1)
    os.environ.update(env)
    init_from_env()
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported like a spawned worker's failure
        raise WorkerFailed(f"worker rank 0 of 1 failed:\n{_failure(e)}") from None
    finally:
        leave_world()
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spawn(fn: Callable, nprocs: int, *args: Any, on_start: Callable[[list[int]], None] | None = None) -> list[Any]:
    """Run `fn(*args)` in `nprocs` fresh processes that form one world on this machine;
    returns each rank's return value (picklable), in rank order.

    A failing worker raises WorkerFailed instead of a hang (torch's process context
    terminates the others); the message carries the traceback of the rank that failed
    FIRST, since the others usually fail only because their peer went away.
    `on_start(pids)` learns the workers' process ids (to forward signals to them)."""
    if torch.cuda.is_available():
        check_ranks_per_gpu(nprocs, torch.cuda.device_count())
    process_threads(nprocs)  # a bad RLHFC_THREADS stops here, not in every worker
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(
        _worker, args=(fn, nprocs, free_port(), results, args), nprocs=nprocs,
        join=False, start_method="spawn",
    )
    if on_start is not None:
        on_start(list(procs.pids()))
    values: dict[int, Any] = {}
    errors: list[tuple[float, int, str]] = []

    def drain(wait: float = 0.0) -> None:
        while True:
            try:
                index, ok, when, payload = results.get(timeout=wait) if wait else results.get_nowait()
            except queue_mod.Empty:
                return
            if ok:
                values[index] = pickle.loads(payload)
            else:
                errors.append((when, index, payload))

    try:
        while not procs.join(timeout=0.2):
            drain()
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        drain(wait=1.0)
        if errors:
            _, index, tb = min(errors)
            raise WorkerFailed(f"worker rank {index} of {nprocs} failed first:\n{tb}") from None
        raise WorkerFailed(f"worker rank {e.error_index} of {nprocs} failed:\n{e}") from None
    while len(values) < nprocs:
        drain(wait=30.0)
    return [values[i] for i in range(nprocs)]


_GROUPS: dict[tuple[int, ...], Any] = {}


def layout_group_ranks(layout: Layout) -> list[tuple[int, ...]]:
    """Every rank set a layout communicates in: its tp, dp and pp groups, its model-parallel
    groups (the tp*pp ranks of one dp replica, for generation) and the whole mesh."""
    out = []
    for p in range(layout.pp):
        out += [layout.tp_group(p, d) for d in range(layout.dp)]
        out += [layout.dp_group(p, t) for t in range(layout.tp)]
    out += [layout.pp_group(d, t) for d in range(layout.dp) for t in range(layout.tp)]
    out += [model_parallel_ranks(layout, d) for d in range(layout.dp)]
    out += [tied_embedding_ranks(layout, d, t) for d in range(layout.dp) for t in range(layout.tp)]
    out.append(tuple(layout.ranks))
    return out


def model_parallel_ranks(layout: Layout, dp_rank: int) -> tuple[int, ...]:
    """The ranks of one data-parallel replica (all its tp and pp ranks), in mesh order."""
    return tuple(layout.rank_at(p, dp_rank, t) for p in range(layout.pp) for t in range(layout.tp))


def tied_embedding_ranks(layout: Layout, dp_rank: int, tp_rank: int) -> tuple[int, ...]:
    """First and last pipeline stage of one (dp, tp) position: they hold the same slice
    of tied input and output embeddings and sum its gradient (one rank when pp = 1)."""
    return tuple(dict.fromkeys((layout.rank_at(0, dp_rank, tp_rank), layout.rank_at(layout.pp - 1, dp_rank, tp_rank))))


def ensure_groups(layouts: Iterable[Layout], extra: Iterable[tuple[int, ...]] = ()) -> None:
    """Create the process groups of all `layouts` (and the `extra` rank sets, e.g. the
    op program's GROUPS) that do not exist yet: eagerly, once per rank set.

    `dist.new_group` is collective over the whole world, so every rank must call this
    with the same arguments; the groups are created in sorted order of their rank
    tuples, which makes the order independent of the caller's order too. A set of all
    ranks gets a group of its own too: handing out the default group instead made
    about half of the 2-process gloo runs abort at exit ("terminate called without an
    active exception", tests/runtime_model/test_runtime_dist.py)."""
    wanted = {r for lay in layouts for r in layout_group_ranks(lay)} | {tuple(r) for r in extra}
    for ranks in sorted(wanted - _GROUPS.keys()):
        _GROUPS[ranks] = dist.new_group(list(ranks))


def group(ranks: Iterable[int]):
    """The cached process group over `ranks` (created by ensure_groups)."""
    key = tuple(ranks)
    if key not in _GROUPS:
        raise KeyError(f"no process group for ranks {key}: call ensure_groups with its layout on every rank first")
    return _GROUPS[key]


@dataclass(frozen=True)
class RankGroups:
    """This rank's place in one layout: its coordinates and the groups it belongs to
    (rank tuples and process groups), as the sharded model needs them."""

    layout: Layout
    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    tp_ranks: tuple[int, ...]
    dp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    mp_ranks: tuple[int, ...]
    tie_ranks: tuple[int, ...] = ()

    # the process groups of those rank tuples (created by ensure_groups)
    tp = property(lambda self: group(self.tp_ranks))
    dp = property(lambda self: group(self.dp_ranks))
    pp = property(lambda self: group(self.pp_ranks))
    mp = property(lambda self: group(self.mp_ranks))
    tie = property(lambda self: group(self.tie_ranks))


def rank_groups(layout: Layout, rank: int | None = None) -> RankGroups:
    """This rank's coordinates and groups in `layout` (groups must exist: ensure_groups)."""
    rank = dist.get_rank() if rank is None else rank
    c = layout.coord(rank)
    if c is None:
        raise ValueError(f"rank {rank} is not in layout {layout}")
    p, d, t = c
    return RankGroups(
        layout, rank, p, d, t, layout.tp_group(p, d), layout.dp_group(p, t),
        layout.pp_group(d, t), model_parallel_ranks(layout, d), tied_embedding_ranks(layout, d, t),
    )
