"""The hardware catalog: devices and their links, the numbers the cost model reads.

Figures are dense bf16 vendor datasheet values (see /work/shared/REFERENCE.md); the
`achievable` fraction is the MFU-like share of peak that real kernels reach and is the
first thing to calibrate from measurements. A cluster block may override any figure
(`memory`, `flops`, `mem_bandwidth`, `intra_bandwidth`, `inter_bandwidth`, `achievable`,
`cores`, `memory_reserve`), or name a measured profile (`hardware = "hw.json"`, written by `rlhfc profile`) whose
figures become those overrides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from rlhfc.ir import Cluster

GB = 10**9


@dataclass(frozen=True)
class Device:
    """One accelerator and the links it sits on; bandwidths are per device, per direction."""

    name: str
    flops: float  # peak dense bf16 FLOP/s
    memory: int  # bytes usable by one process
    mem_bandwidth: float  # HBM (or DRAM) bytes/s
    intra_bandwidth: float  # bytes/s to a device of the same node (NVLink, one direction)
    inter_bandwidth: float  # bytes/s to a device of another node (NIC share per device)
    achievable: float  # fraction of `flops` that training / inference kernels reach
    # Physical cores one node's processes share (`cpu` only; 0: unknown, one core per
    # process). Written by `rlhfc profile`, or `cores = N` in the cluster block.
    cores: float = 0.0
    # Host <-> device bytes/s per device (PCIe share), what reloading offloaded weights costs.
    host_bandwidth: float = 25e9
    # Share of `memory` plans leave free: the CUDA context, NCCL buffers, kernels'
    # workspaces and allocator fragmentation, which no call's estimate counts.
    memory_reserve: float = 0.08

    @property
    def plan_memory(self) -> int:
        """Bytes a plan may fill on one device: `memory` less the reserve."""
        return int(self.memory * (1.0 - self.memory_reserve))


CATALOG: dict[str, Device] = {
    d.name: d
    for d in (
        Device("H100-80GB", 989e12, 80 * GB, 3.35e12, 450e9, 50e9, 0.45),
        Device("H200", 989e12, 141 * GB, 4.8e12, 450e9, 50e9, 0.45),
        Device("A100-80GB", 312e12, 80 * GB, 2.0e12, 300e9, 25e9, 0.5),
        Device("A100-40GB", 312e12, 40 * GB, 1.555e12, 300e9, 25e9, 0.5),
        # A local machine's CPU cores, for the CPU/gloo runs of this repository.
        Device("cpu", 1e12, 16 * GB, 20e9, 10e9, 1e9, 0.3, host_bandwidth=10e9),
    )
}

DEVICE_NAMES: tuple[str, ...] = tuple(CATALOG)

OVERRIDE_KEYS: tuple[str, ...] = (
    "memory", "flops", "mem_bandwidth", "intra_bandwidth", "inter_bandwidth", "achievable", "cores",
    "host_bandwidth", "memory_reserve",
)

PROFILE_SCHEMA_VERSION = 1

# What a cluster may declare, beyond which a figure is a typo rather than a machine (a
# million nodes, a 1e-300 FLOP/s device): the planner would hang or divide by ~zero.
LIMITS: dict[str, tuple[float, float]] = {
    "nodes": (1, 1024), "devices_per_node": (1, 64),
    "memory": (2**20, 2**44), "flops": (1e6, 1e18), "mem_bandwidth": (1e6, 1e15),
    "intra_bandwidth": (1e5, 1e14), "inter_bandwidth": (1e5, 1e14), "host_bandwidth": (1e5, 1e14),
    "achievable": (1e-3, 1.0), "cores": (0.0, 4096), "memory_reserve": (0.0, 0.9),
}


def out_of_range(key: str, value: float) -> str | None:
    """Why `value` is not a plausible `key` of a cluster (None when it is)."""
    lo, hi = LIMITS.get(key, (float("-inf"), float("inf")))
    if lo <= value <= hi:
        return None
    return f"`{key}` = {value:g} is outside {lo:g} .. {hi:g}"


def cluster_problems(cluster: Cluster) -> list[str]:
    """Every implausible count or figure of a cluster (its block, a profile or --cluster)."""
    figures = [("nodes", cluster.nodes), ("devices_per_node", cluster.devices_per_node), *cluster.overrides]
    return [why for k, v in figures if (why := out_of_range(k, v))]


class ProfileError(ValueError):
    """A hardware profile that cannot be read: the message says which file and why."""


def read_json(path: str | Path, what: str, error: type[Exception]) -> dict:
    """A JSON object from a user's file, or `error` with a one-line reason (never a traceback)."""
    from rlhfc.files import FileProblem, read_text

    try:
        doc = json.loads(read_text(Path(path), 16 << 20, what))
    except FileProblem as e:
        raise error(str(e)) from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{what} {path} is not a JSON object")
    return doc


def load_profile(path: str | Path) -> tuple[str, tuple[tuple[str, float], ...]]:
    """(catalog device, overrides) of a profile written by `rlhfc profile`: the measured
    figures replace the catalog's, so the cost model prices this machine."""
    doc = read_json(path, "hardware profile", ProfileError)
    if doc.get("schema_version") != PROFILE_SCHEMA_VERSION:
        got = doc.get("schema_version")
        raise ProfileError(f"hardware profile {path}: schema version {got!r}, expected {PROFILE_SCHEMA_VERSION}")
    figures = doc.get("device")
    if doc.get("base") not in CATALOG or not isinstance(figures, dict):
        raise ProfileError(f"hardware profile {path}: needs `base` (one of {', '.join(DEVICE_NAMES)}) and `device`")
    bad = sorted(k for k, v in figures.items() if k not in OVERRIDE_KEYS or not isinstance(v, (int, float)) or v <= 0
                 or out_of_range(k, v))
    if bad:
        raise ProfileError(f"hardware profile {path}: bad device figure(s) {bad}; known: {', '.join(OVERRIDE_KEYS)}")
    return doc["base"], tuple(sorted((k, float(v)) for k, v in figures.items()))


def with_profile(cluster: Cluster, path: str | Path) -> Cluster:
    """The cluster priced with a measured profile (its device and figures replace the block's)."""
    base, overrides = load_profile(path)
    return replace(cluster, device=base, overrides=overrides)


def device_for(cluster: Cluster) -> Device:
    """The catalog entry of the cluster's device with the cluster block's overrides applied."""
    if cluster.device not in CATALOG:
        raise KeyError(f"unknown device {cluster.device!r}; known: {', '.join(DEVICE_NAMES)}")
    overrides = dict(cluster.overrides)
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise KeyError(f"unknown device override(s) {unknown}; known: {', '.join(OVERRIDE_KEYS)}")
    if "memory" in overrides:
        overrides["memory"] = int(overrides["memory"])
    return replace(CATALOG[cluster.device], **overrides)


def core_share(cluster: Cluster, device: Device) -> float:
    """How many processes of a local CPU cluster share one core: max(1, devices_per_node /
    cores) when the profile or the cluster block gives `cores`, else 1. Every second of a
    CPU process's work (FLOPs, memory traffic, Python and kernel-launch overheads,
    collectives) is time-shared, so the cost model multiplies a call's time by it. The
    core count comes only from the profile or the program, never from the planning machine."""
    if cluster.device != "cpu" or device.cores <= 0:
        return 1.0
    return max(1.0, cluster.devices_per_node / device.cores)
