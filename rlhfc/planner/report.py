"""How a plan is shown: rich tables for the terminal and a per-device Gantt chart."""

from __future__ import annotations

import io
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from rlhfc.ir import Call, Dataflow, ModelKind, Strategy
from rlhfc.plan import Plan

GIB = 1 << 30
# Iterations an asynchronous plan's Gantt chart shows, one initiation interval apart.
GANTT_ITERATIONS = 3


def compact_table(title: str) -> Table:
    """A table without outer borders or padding, so plans fit 80 columns unabridged."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))


def _strategy(call: Call, neural: bool, s: Strategy) -> tuple[str, str, str, str]:
    """Mesh, degrees, token budget and the micro-batches it makes at the priced lengths."""
    mbs = (f"{call.n_mbs(s)} rc" if s.recompute else str(call.n_mbs(s))) if neural else "-"
    return str(s.mesh), f"{s.dp}/{s.tp}/{s.pp}", str(call.token_budget(s)) if neural else "-", mbs


def print_plan(plan: Plan, dataflow: Dataflow, console: Console) -> None:
    """Per-call table, reallocations, and the solver's figures."""
    calls = compact_table(f"plan for {plan.source} on {plan.cluster.nodes}x{plan.cluster.devices_per_node} {plan.cluster.device}")
    pipelined = plan.max_staleness > 0
    columns = ("call", "model", "mesh", "dp/tp/pp", "budget", "mbs", "start s", "end s", "peak GiB/dev") + ("ahead",) * pipelined
    for col in columns:
        calls.add_column(col, justify="right" if col.endswith(("s", "dev", "mbs", "ahead", "budget")) else "left",
                         no_wrap=True)
    for p in plan.calls:
        neural = dataflow.model(p.model).kind != ModelKind.RULE
        calls.add_row(p.call, p.model, *_strategy(dataflow.call(p.call), neural, p.strategy), f"{p.start:.3f}",
                      f"{p.end:.3f}", f"{p.peak_memory / GIB:.1f}", *(str(p.ahead),) * pipelined)
    console.print(calls)
    console.print("budget: tokens of one micro-batch on one replica, the plan's choice; "
                  "mbs: the micro-batches it makes of a replica's (mini-)batch at the priced lengths")
    if any(p.strategy.recompute for p in plan.calls):
        console.print("rc: activations recomputed in backward (one more forward, one layer input kept per layer)")
    if plan.reallocations:
        moves = compact_table("parameter reallocations")
        for col in ("model", "before", "from", "to", "GB", "seconds"):
            moves.add_column(col, no_wrap=True)
        for r in plan.reallocations:
            moves.add_row(r.model, r.before_call, f"{r.src.mesh} {r.src.dp}/{r.src.tp}/{r.src.pp}",
                          f"{r.dst.mesh} {r.dst.dp}/{r.dst.tp}/{r.dst.pp}", f"{r.bytes / 1e9:.2f}", f"{r.seconds:.3f}")
        console.print(moves)
    if plan.offloaded:
        console.print(f"offloaded to host memory between iterations, reloaded before their call: "
                      f"{', '.join(plan.offloaded)} (the plan does not fit in device memory otherwise)")
    if pipelined:
        console.print(f"ahead: iterations ahead of the step being trained (max_staleness {plan.max_staleness}); "
                      "start and end in the frame of the body that trains the iteration")
        console.print(f"steady state [bold]{plan.iteration_time:.3f} s/step[/]  synchronous plan {plan.sync_time:.3f} s/step  "
                      f"speedup {plan.sync_time / plan.iteration_time:.2f}x"
                      + ("" if any(p.ahead for p in plan.calls) else "  (pipelining gains nothing: the synchronous plan)"))
    console.print(
        f"iteration time [bold]{plan.iteration_time:.3f} s[/]  lower bound {plan.lower_bound:.3f} s  "
        f"gap {plan.gap:.2%}  status {plan.status}  solve {plan.solve_seconds:.1f} s"
    )
    if plan.baseline_time is None:
        console.print("symmetric baseline: no single strategy for all calls fits in memory")
    else:
        console.print(f"symmetric baseline {plan.baseline_time:.3f} s  speedup {plan.baseline_time / plan.iteration_time:.2f}x")


def device_bands(plan: Plan) -> list[tuple[int, int]]:
    """Runs [first, last] of consecutive devices that run the same calls and receive the
    same reallocations: one chart row each, so a 1024-device plan stays readable."""
    dpn, n = plan.cluster.devices_per_node, plan.cluster.n_devices
    meshes = [set(p.strategy.mesh.ranks(dpn)) for p in plan.calls]
    meshes += [set(r.dst.mesh.ranks(dpn)) for r in plan.reallocations]
    signature = [tuple(d in m for m in meshes) for d in range(n)]
    bands, first = [], 0
    for d in range(1, n + 1):
        if d == n or signature[d] != signature[first]:
            bands.append((first, d - 1))
            first = d
    return bands


def gantt_bytes(plan: Plan, kind: str) -> bytes:
    """A per-device Gantt chart as `kind` ("svg" or "png") bytes. Devices with the same
    schedule share a row; one bar per call, hatched bars for the reallocations that end
    where their call starts. An asynchronous plan shows `GANTT_ITERATIONS` iterations of
    its steady state (0 is where the first iteration's earliest call starts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpn = plan.cluster.devices_per_node
    bands = device_bands(plan)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.45 * len(bands) + 1.2)))

    def draw(ranks, start, length, label, **style):
        rows = [i for i, (first, _) in enumerate(bands) if first in ranks]
        for i in rows:
            ax.broken_barh([(start, length)], (i - 0.4, 0.8), **style)
        if label and rows:
            ax.text(start + length / 2, rows[0], label, fontsize=8, ha="center", va="center")

    placed = {p.call: p for p in plan.calls}
    # an asynchronous plan: iterations 0..GANTT_ITERATIONS-1, each shifted by II from its frame
    iterations = range(GANTT_ITERATIONS if plan.max_staleness else 1)
    shift = max((p.ahead for p in plan.calls), default=0) * plan.iteration_time
    for i in iterations:
        offset = shift + i * plan.iteration_time
        for k, p in enumerate(plan.calls):
            if p.end > p.start:
                label = f"{p.call}[{i}]" if plan.max_staleness else p.call
                draw(set(p.strategy.mesh.ranks(dpn)), offset + p.start, p.end - p.start, label, color=colors(k % 10),
                     alpha=1.0 - 0.25 * (i % 2))
        for r in plan.reallocations:
            draw(set(r.dst.mesh.ranks(dpn)), offset + placed[r.before_call].start - r.seconds, r.seconds, None,
                 facecolor="white", edgecolor="black", hatch="///")
    ax.set_yticks(range(len(bands)), [f"{a}" if a == b else f"{a}-{b}" for a, b in bands])
    ax.set_xlabel("seconds (hatched: parameter reallocation)")
    ax.set_ylabel("devices")
    ax.set_ylim(len(bands) - 0.5, -0.5)
    per = (f"{plan.iteration_time:.3f} s per step in the steady state, {plan.sync_time:.3f} s synchronous; "
           f"call[i]: iteration i" if plan.max_staleness else f"{plan.iteration_time:.3f} s per iteration")
    ax.set_title(f"{Path(plan.source).name} on {plan.cluster.nodes}x{dpn} {plan.cluster.device}: {per}", fontsize=9)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=kind, metadata={"Date": None} if kind == "svg" else None)
    plt.close(fig)
    return image.getvalue()
