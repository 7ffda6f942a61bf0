"""Golden files: the IR of every shipped program and the diagnostics of every bad program.

Run `pytest tests/language --update-golden` after an intended change, then review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfc.frontend.check import check_program
from rlhfc.diagnostics import CODES, CompileError, render
from rlhfc.planner.solve import plan_dataflow
from rlhfc.frontend.graph import dump

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = sorted((ROOT / "programs").glob("*.rlhf"))
BAD = sorted((ROOT / "tests" / "bad_programs").glob("*.rlhf"))
GOLDEN = ROOT / "tests" / "golden"


def diagnostics_of(program: Path) -> list:
    """What compiling reports: the checker's diagnostics, or the planner's when the check passes."""
    flow, diagnostics = check_program(program)
    if flow is None or flow.run is None:
        return diagnostics
    try:
        plan_dataflow(flow, time_limit=5)
    except CompileError as e:
        return diagnostics + e.diagnostics
    return diagnostics


def _compare(path: Path, actual: str, update: bool) -> None:
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        if not update:
            pytest.fail(f"golden file {path} was missing; written now, review and commit it")
    assert actual == path.read_text(encoding="utf-8"), f"differs from {path} (pytest --update-golden to accept)"


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.name)
def test_ir_dump_matches_golden(program, update_golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    flow, diagnostics = check_program(program.relative_to(ROOT))
    assert flow is not None, render(diagnostics)
    _compare(GOLDEN / "ir" / f"{program.stem}.txt", dump(flow, str(ROOT)), update_golden)


@pytest.mark.parametrize("program", BAD, ids=lambda p: p.name)
def test_diagnostics_match_golden(program, update_golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    diagnostics = diagnostics_of(program.relative_to(ROOT))
    assert diagnostics, "a bad program must produce diagnostics"
    _compare(GOLDEN / "diagnostics" / f"{program.stem}.txt", render(diagnostics), update_golden)


def test_every_code_has_a_bad_program_that_raises_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    raised = {d.code for p in BAD for d in diagnostics_of(p.relative_to(ROOT))}
    assert raised == set(CODES), f"not covered: {set(CODES) - raised}; unknown: {raised - set(CODES)}"


def test_bad_program_names_say_their_code(monkeypatch):
    monkeypatch.chdir(ROOT)
    for program in BAD:
        prefix = program.stem.split("_")[0].upper()
        if prefix[:1] in "EW" and prefix[1:].isdigit():
            codes = {d.code for d in diagnostics_of(program.relative_to(ROOT))}
            assert prefix in codes, f"{program.name} does not raise {prefix}: {codes}"
