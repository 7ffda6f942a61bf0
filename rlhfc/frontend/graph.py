"""The dataflow graph of a checked program as text (for terminals and diffs) and Graphviz DOT."""

from __future__ import annotations

import json
import shutil
import subprocess

from rlhfc import ir

_SHAPES = {ir.CallKind.GENERATE: "box", ir.CallKind.INFERENCE: "ellipse", ir.CallKind.TRAIN: "doubleoctagon"}


def to_text(flow: ir.Dataflow) -> str:
    """Calls with their sizes, then edges: a stable listing to read or diff."""
    lines = [f"calls ({len(flow.calls)}):"]
    for c in flow.calls:
        ins, outs = ", ".join(c.inputs), ", ".join(c.outputs) or "-"
        lines.append(f"  {c.name}: {c.model}.{c.kind.value}({ins}) -> {outs} using {c.interface}"
                     f"  [batch {c.batch}, prompt {c.prompt_len}, gen {c.gen_len}]")
    lines.append(f"edges ({len(flow.edges)}):")
    for e in flow.edges:
        tag = " (next iteration)" if e.next_iteration else ""
        lines.append(f"  {e.src} -> {e.dst}  {e.kind.value} {e.key}{tag}")
    return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    """A DOT string literal (JSON escaping is valid DOT escaping for these names)."""
    return json.dumps(text)


def to_dot(flow: ir.Dataflow) -> str:
    """Graphviz DOT: one node per call (shape by kind), data edges solid, parameter edges dashed."""
    lines = ["digraph rlhf {", "  rankdir=LR;", '  node [fontname="Helvetica"];', '  edge [fontname="Helvetica"];']
    for c in flow.calls:
        label = f"{c.name}\n{c.model}.{c.kind.value}\n{c.interface}"
        lines.append(f"  {_q(c.name)} [shape={_SHAPES[c.kind]}, label={_q(label)}];")
    grouped: dict[tuple, list[str]] = {}  # one arrow per (src, dst, kind), labelled with all its keys
    for e in flow.edges:
        grouped.setdefault((e.src, e.dst, e.kind, e.next_iteration), []).append(e.key)
    for (src, dst, kind, next_iteration), keys in grouped.items():
        style = "dashed" if kind is ir.EdgeKind.PARAM else "solid"
        extra = ", constraint=false, color=gray" if next_iteration else ""
        lines.append(f"  {_q(src)} -> {_q(dst)} [label={_q(', '.join(keys))}, style={style}{extra}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render_svg(dot_text: str) -> bytes:
    """SVG bytes from Graphviz `dot`; callers check `dot_available()` first."""
    return subprocess.run(["dot", "-Tsvg"], input=dot_text.encode(), capture_output=True, check=True).stdout


def dump(flow: ir.Dataflow, root: str | None = None) -> str:
    """Every field of a Dataflow, one object per line, stable: the golden-file format.

    Paths under `root` are written relative to it, so dumps do not depend on checkout place.
    """

    def path(p: str | None) -> str | None:
        if p and root and p.startswith(root.rstrip("/") + "/"):
            return p[len(root.rstrip("/")) + 1:]
        return p

    def at(span: ir.Span | None) -> str:
        return f"{path(span.file)}:{span.line}:{span.col}" if span else "-"

    c = flow.cluster
    lines = [f"source {path(flow.source)}",
             f"cluster nodes={c.nodes} devices_per_node={c.devices_per_node} device={c.device} overrides={c.overrides}"]
    for m in flow.models:
        lines.append(f"model {m.name} kind={m.kind} head={m.head.value} trainable={m.trainable} shape={m.shape} "
                     f"checkpoint={path(m.checkpoint)} optimizer={m.optimizer} rule={m.rule} @{at(m.span)}")
    for d in flow.datasets:
        lines.append(f"dataset {d.name} format={d.format} path={path(d.path)} fields={d.fields} max_len={d.max_len} "
                     f"tokenizer={path(d.tokenizer)} @{at(d.span)}")
    if flow.run:
        r = flow.run
        lines.append(f"run {r.dataflow} batch={r.batch} steps={r.steps} params={r.params} @{at(r.span)}")
    for k in flow.calls:
        lines.append(f"call {k.name} model={k.model} kind={k.kind.value} inputs={k.inputs} outputs={k.outputs} "
                     f"interface={k.interface} options={k.options} batch={k.batch} prompt_len={k.prompt_len} "
                     f"gen_len={k.gen_len} @{at(k.span)}")
    for e in flow.edges:
        lines.append(f"edge {e.src} -> {e.dst} kind={e.kind.value} key={e.key} next_iteration={e.next_iteration}")
    for p in flow.pins:
        s = p.strategy
        lines.append(f"pin {p.call} mesh={s.mesh} dp={s.dp} tp={s.tp} pp={s.pp} token_budget={s.token_budget} @{at(p.span)}")
    return "\n".join(lines) + "\n"
