"""AST → IR: name resolution, imports, instantiation of the `run` dataflow, validation.

`load_program` is the front end's one entry point. It reports every error it can find
in one pass (rustc-style diagnostics with codes, see `rlhfc.diagnostics.CODES`) and
only returns a `Dataflow` when there are none. One module per pass.
"""

from __future__ import annotations

from pathlib import Path

from rlhfc import ir
from rlhfc.diagnostics import CompileError, Diagnostic, Severity, located
from rlhfc.frontend import ast
from rlhfc.frontend.check.common import Reporter, Values, resolved_path
from rlhfc.frontend.check.dataflow import check_dataflow_structure
from rlhfc.frontend.check.data import check_dataset, finish_datasets
from rlhfc.frontend.check.declarations import check_cluster, check_model
from rlhfc.frontend.check.instantiate import instantiate, run_config
from rlhfc.frontend.check.loader import Loader
from rlhfc.frontend.check.pins import check_pins
from rlhfc.frontend.check.rewards import check_score_keys


def check_program(path: str | Path, cluster_override: ir.Cluster | None = None
                  ) -> tuple[ir.Dataflow | None, list[Diagnostic]]:
    """Check a program: (the Dataflow, or None when there are errors; all diagnostics)."""
    rep, path = Reporter(), Path(path)
    unit = Loader(rep).load(path, str(path), None)
    if unit is None:
        return None, rep.diagnostics
    loaded = {id(u): u for u in [unit] + [u for u, _ in unit.dataflows.values()]}
    val = Values(rep)
    checked = set()
    for owner in loaded.values():
        for _, decl in owner.dataflows.values():
            if id(decl) not in checked:
                checked.add(id(decl))
                check_dataflow_structure(decl, rep)
    cluster = check_cluster(unit, rep, val)
    if cluster_override is not None:
        cluster = cluster_override
    models = {n: check_model(d, unit, rep, val) for n, d in unit.models.items()}
    datasets = finish_datasets({n: check_dataset(d, unit, rep, val) for n, d in unit.datasets.items()}, models, rep)
    runs = unit.statements(ast.RunStmt)
    config, calls, edges, pins = None, (), (), ()
    if runs:
        config = run_config(runs[0], rep, val)
        calls, edges, names = instantiate(unit, runs[0], models, datasets, config, rep,
                                          cluster.device if cluster is not None else None)

        pins = check_pins(unit, calls, names, models, cluster, rep, val)
    if not runs or calls:  # a run whose calls did not bind says nothing about score keys
        check_score_keys(unit, models, calls, rep)
    elif unit.statements(ast.PlaceStmt):
        rep.error("E002", "`place` without a `run`: there are no calls to pin", unit.statements(ast.PlaceStmt)[0].span)
    if runs and not rep.has_errors:  # unused declarations matter once the program is otherwise right
        used = {a.text for a in runs[0].args}
        for decl in [*unit.models.values(), *unit.datasets.values()]:
            if decl.name.text not in used:
                rep.warning("W002", f"`{decl.name.text}` is declared but the `run` does not use it", decl.name.span,
                            "pass it to the dataflow, or delete it")
    rep.diagnostics.sort(key=lambda d: (d.span.file, d.span.line, d.span.col) if d.span else ("", 0, 0))
    if rep.has_errors:
        return None, rep.diagnostics
    flow = ir.Dataflow(str(resolved_path(path)), tuple(models.values()), tuple(datasets.values()), calls, edges,
                       cluster, config, pins)
    return flow, rep.diagnostics


def load_program(path: str | Path, cluster_override: ir.Cluster | None = None, need_run: bool = False
                 ) -> ir.Dataflow:
    """The checked Dataflow of a program, or `CompileError` carrying every diagnostic;
    `need_run` (plan, compile, run): a library without a `run` is E032, nothing to plan."""
    flow, diagnostics = check_program(path, cluster_override)
    if flow is not None and need_run and flow.run is None:
        diagnostics = [*diagnostics, located(Severity.ERROR, "E032", f"`{path}` has no `run`: there is nothing to plan",
                                             ir.Span(str(path), 1, 1, 1, 1),
                                             "add `run DATAFLOW(ARGS) { batch = N }`; `rlhfc check` checks a library")]
        flow = None
    if flow is None:
        raise CompileError(diagnostics)
    return flow
