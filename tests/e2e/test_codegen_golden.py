"""Golden generated code for every example program (symmetric plan: deterministic)
plus the tiny PPO job under a plan that reallocates the actor. Regenerate with
`pytest tests/e2e --update-golden` and review the diff like any code change."""

from __future__ import annotations

from pathlib import Path

import pytest
from codegen_fixtures import split_plan

from rlhfc.frontend.check import load_program
from rlhfc.cli.run import compile_program
from rlhfc.backend.emit import emit
from rlhfc.backend.lower import lower

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "codegen"
PROGRAMS = sorted(p.stem for p in (ROOT / "programs").glob("*.rlhf"))


def check_golden(name: str, text: str, update: bool) -> None:
    compile(text, f"{name}.py", "exec")  # every generated file is valid Python
    path = GOLDEN / f"{name}.py"
    if update:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run pytest with --update-golden"
    assert text == path.read_text(), f"generated code for {name} changed: review, then --update-golden"


@pytest.mark.parametrize("name", PROGRAMS)
def test_example_program_codegen(name, update_golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    _, text = compile_program(Path("programs") / f"{name}.rlhf", symmetric=True, output=Path(f"build/{name}.py"))
    check_golden(name, text, update_golden)


def test_realloc_plan_codegen(update_golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    df = load_program("programs/ppo.rlhf")
    check_golden("ppo_split", emit(lower(df, split_plan(df)), "build/ppo_split.py"), update_golden)

