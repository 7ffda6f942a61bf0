"""Code generation: an op program becomes one readable, deterministic Python file.

jinja2 lays the file out; this module renders every value as a Python literal first,
through `repr()` / `pprint`, so no string from a program (paths, names, options) can
reach the generated code unescaped. Output is a pure function of the op program.
"""

from __future__ import annotations

import ast
import os
from dataclasses import MISSING, fields, is_dataclass

import jinja2

from rlhfc import ir
from rlhfc.backend.lower import OpProgram
from rlhfc_runtime.contract.interfaces import INTERFACES, REWARD_INPUT
from rlhfc_runtime.contract.ops import Call
from rlhfc_runtime.contract.program import DatasetSpec, ModelSpec, Program, RunSpec

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("rlhfc.backend", "templates"),
    autoescape=False,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)


WIDTH = 100


def source_of(value, indent: int = 0, used: int = 0, width: float = WIDTH) -> str:
    """`value` as the Python expression that rebuilds it: contract dataclasses as
    constructor calls with keyword arguments (fields at their default left out), dicts,
    and repr() for everything else, so no string reaches the file unescaped. On one line
    when it fits in `width` after the `used` characters of a line indented by `indent`;
    else one field or entry per line, indented one level more."""
    if is_dataclass(value):
        items = [(f"{f.name}=", getattr(value, f.name)) for f in fields(value)
                 if f.default is MISSING and f.default_factory is MISSING
                 or getattr(value, f.name) != (f.default if f.default is not MISSING else f.default_factory())]
        opening, closing = f"{type(value).__name__}(", ")"
    elif isinstance(value, dict) and value:
        items = [(f"{k!r}: ", v) for k, v in value.items()]
        opening, closing = "{", "}"
    else:
        return repr(value)
    flat = opening + ", ".join(key + source_of(v, width=float("inf")) for key, v in items) + closing
    if used + len(flat) <= width:
        return flat
    inner = indent + 4
    body = "".join(f"{' ' * inner}{key}{source_of(v, inner, inner + len(key), width)},\n" for key, v in items)
    return f"{opening}\n{body}{' ' * indent}{closing}"


def relative_path(path: str | None, base: str) -> str | None:
    """A path as the generated file will find it: relative to the file's directory, so
    the output does not depend on where the checkout lives (the engine resolves it)."""
    if path is None or not os.path.isabs(path):
        return path
    return os.path.relpath(path, os.path.abspath(base))


def program_spec(prog: OpProgram, base: str = ".") -> Program:
    """What the engine needs besides the ops: models, datasets, run settings, cluster;
    file paths relative to `base`, the generated file's directory."""
    df = prog.dataflow
    homes = dict(prog.homes)
    run = df.run or ir.RunConfig(dataflow="", batch=1, steps=1)
    return Program(
        source=relative_path(df.source, base),
        world_size=prog.world_size,
        device=df.cluster.device,
        devices_per_node=df.cluster.devices_per_node,
        models={m.name: _model_spec(m, homes.get(m.name), m.name in prog.plan.offloaded, base) for m in df.models},
        datasets={
            d.name: DatasetSpec(format=d.format, path=relative_path(d.path, base), fields=dict(d.fields),
                                tokenizer=relative_path(getattr(d, "tokenizer", None), base), max_len=d.max_len,
                                chat=d.chat, system=d.system, columns=tuple(d.columns))
            for d in df.datasets
        },
        run=RunSpec(dataflow=run.dataflow, batch=run.batch, steps=run.steps, seed=run.seed,
                    save_every=run.save_every, keep=run.keep, max_staleness=run.max_staleness),
        reward_key=reward_key(df),
        estimates={p.call: round(p.end - p.start, 6) for p in prog.plan.calls},
        estimated_iteration=round(prog.plan.iteration_time, 6),
        estimated_peak_bytes={p.call: p.call_memory for p in prog.plan.calls
                              if df.model(p.model).kind != ir.ModelKind.RULE},
    )


def reward_key(df: ir.Dataflow) -> str | None:
    """The data key a train call reads as its `REWARD_INPUT` (the key bound to it, whatever
    the dataflow calls it): the engine logs its mean as the run's `reward`."""
    for call in df.calls:
        iface = INTERFACES.get(call.interface)
        if call.kind is ir.CallKind.TRAIN and iface is not None and REWARD_INPUT in iface.inputs:
            return call.inputs[iface.inputs.index(REWARD_INPUT)]
    return None


def _model_spec(m: ir.Model, home: str | None, offloaded: bool, base: str) -> ModelSpec:
    return ModelSpec(
        kind=ir.ModelKind(m.kind).value,
        head=m.head.value,
        shape=m.shape,  # the whole contract shape
        trainable=m.trainable,
        checkpoint=relative_path(m.checkpoint, base),
        optimizer=None if m.optimizer is None else {"name": m.optimizer.name, **dict(m.optimizer.params)},
        rule=m.rule,
        functions=tuple((relative_path(path, base), fn, weight) for path, fn, weight in m.functions),
        score_keys=tuple((key, weight) for key, weight in m.score_keys),
        home=home,
        offloaded=offloaded,
    )


def plan_table(prog: OpProgram) -> list[str]:
    """The plan as an aligned text table, one row per call in op order."""
    plan = prog.plan
    rows = [("call", "model", "layout", "mesh", "dp", "tp", "pp", "budget", "mbs", "start s", "end s", "peak MiB")]
    layout_of = {op.name: op.layout for op in prog.ops if isinstance(op, Call)}
    for op in prog.ops:
        if isinstance(op, Call):
            p = plan.placement(op.name)
            s = p.strategy
            settings = dict(op.settings)  # a neural call's budget and the micro-batches it makes
            rows.append((op.name, op.model, layout_of[op.name], str(s.mesh), str(s.dp), str(s.tp), str(s.pp),
                         str(settings.get("token_budget", "-")), str(settings.get("n_mbs", "-")),
                         f"{p.start:.3f}", f"{p.end:.3f}", f"{p.peak_memory / 2**20:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    homes = ", ".join(f"{m} -> {lay}" for m, lay in prog.homes)
    return [*lines, "", f"homes: {homes}"] if homes else lines


def emit(prog: OpProgram, path: str = "build/program.py") -> str:
    """The generated Python source for a file to be written at `path` (paths inside it
    are relative to that file's directory)."""
    base = os.path.dirname(path) or "."
    plan = prog.plan
    summary = (f"{plan.status}, estimated {plan.iteration_time:.3f} s/iteration, "
               f"lower bound {plan.lower_bound:.3f} s, gap {plan.gap:.1%}"
               + (f"; priced by {_docstring_safe(plan.priced_by)}" if plan.priced_by else ""))
    spec = program_spec(prog, base)
    text = TEMPLATES.get_template("program.py.j2").render(
        source=_docstring_safe(repr(relative_path(prog.dataflow.source, base))),
        filename=_docstring_safe(path),
        world_size=prog.world_size,
        plan_summary=summary,
        plan_table=[_docstring_safe(line) for line in plan_table(prog)],
        program=source_of(spec, 0, len("PROGRAM = ")),
        shaped=any(m.shape is not None for m in spec.models.values()),
        layout_lines=[f"{name!r}: Layout(ranks={lay.ranks!r}, dp={lay.dp}, tp={lay.tp}, pp={lay.pp}),"
                      for name, lay in prog.layouts],
        groups=repr(prog.groups),
        op_types=sorted({type(op).__name__ for op in prog.ops}),
        op_lines=[source_of(op, width=float("inf")) for op in prog.ops],  # one op, one line
    )
    ast.parse(text)  # a generated file that does not parse is a compiler bug: fail here
    return text


def _docstring_safe(text: str) -> str:
    """Text inside the module docstring: no backslashes or quote runs can end it early."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"').replace("\n", " ")
