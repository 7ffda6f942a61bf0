"""How plans are shown: chart rows group devices with the same schedule."""

from __future__ import annotations

from dataclasses import replace

from rlhfc.ir import Cluster, Mesh, Strategy
from rlhfc.plan import CallPlacement, Plan, Reallocation
from rlhfc.planner.report import device_bands, gantt_bytes


def _plan(calls, reallocations=()):
    return Plan("p.rlhf", Cluster(2, 4, "H100-80GB"), tuple(calls), (), tuple(reallocations), 3.0, 3.0, "OPTIMAL", 0.0)


def test_devices_with_the_same_calls_share_a_band():
    everywhere = Strategy(Mesh(0, 2, 0, 4), 8, 1, 1)
    node0, node1_half = Strategy(Mesh(0, 1, 0, 4), 4, 1, 1), Strategy(Mesh(1, 1, 0, 2), 2, 1, 1)
    calls = [CallPlacement("gen", "actor", everywhere, 0.0, 1.0, 1, 1),
             CallPlacement("refl", "ref", node0, 1.0, 2.0, 1, 1),
             CallPlacement("vals", "critic", node1_half, 1.0, 2.0, 1, 1)]
    assert device_bands(_plan(calls)) == [(0, 3), (4, 5), (6, 7)]
    # a reallocation into part of a band splits it: its devices are busy earlier
    move = Reallocation("actor", "gen", node0, replace(node0, mesh=Mesh(0, 1, 0, 2), dp=2), 10, 0.1)
    assert device_bands(_plan(calls, [move])) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert gantt_bytes(_plan(calls, [move]), "png")[:4] == b"\x89PNG"
    assert b"<svg" in gantt_bytes(_plan(calls, [move]), "svg")
