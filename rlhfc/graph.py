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
    lines = ["digraph rlhf {", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for c in flow.calls:
        label = f"{c.name}\n{c.model}.{c.kind.value}\n{c.interface}"
        lines.append(f"  {_q(c.name)} [shape={_SHAPES[c.kind]}, label={_q(label)}];")
    for e in flow.edges:
        style = "dashed" if e.kind is ir.EdgeKind.PARAM else "solid"
        extra = ", constraint=false, color=gray" if e.next_iteration else ""
        lines.append(f"  {_q(e.src)} -> {_q(e.dst)} [label={_q(e.key)}, style={style}{extra}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render_svg(dot_text: str) -> bytes:
    """SVG bytes from Graphviz `dot`; callers check `dot_available()` first."""
    return subprocess.run(["dot", "-Tsvg"], input=dot_text.encode(), capture_output=True, check=True).stdout
