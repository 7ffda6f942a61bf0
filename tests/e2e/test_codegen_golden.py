"""Golden generated code for every example program (symmetric plan: deterministic)
plus the tiny PPO job under a plan that reallocates the actor, and every example's op
list (`tests/golden/ops/`, one line per op: the small file to review). Regenerate with
`pytest tests/e2e --update-golden` and review the diff like any code change."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from codegen_fixtures import split_plan

from rlhfc.frontend.check import load_program
from rlhfc.driver import compile_program
from rlhfc.backend.emit import emit
from rlhfc.backend.lower import lower
from rlhfc_runtime.contract.ops import Call

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



OPS = ROOT / "tests" / "golden" / "ops"


def op_list(prog) -> str:
    """The op program in one line per op (layouts first): the reviewable summary of what
    the compiler decided; a call shows the settings the plan adds to the checker's."""
    lines = [f"{name}: ranks {list(lay.ranks)} dp={lay.dp} tp={lay.tp} pp={lay.pp}" for name, lay in prog.layouts]
    lines += [f"home {model}: {layout}" for model, layout in prog.homes]
    for op in prog.ops:
        values = {f.name: getattr(op, f.name) for f in fields(op)
                  if f.name != "settings" and (f.name != "ahead" or op.ahead)}
        if isinstance(op, Call):
            settings = dict(op.settings)
            values.update({k: settings[k] for k in ("rows", "precision", "n_mbs", "recompute") if k in settings})
        lines.append(f"{type(op).__name__.lower()} " + " ".join(f"{k}={v}" for k, v in values.items()))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", PROGRAMS)
def test_example_program_ops(name, update_golden, monkeypatch):
    """Every example's op list under the plan `rlhfc run` would use (the solver's, on
    the CPU examples, which solve to a unique optimum; the symmetric plan on GPU clusters,
    whose solves stop at the time limit)."""
    monkeypatch.chdir(ROOT)
    gpu = load_program(Path("programs") / f"{name}.rlhf").cluster.device != "cpu"
    prog, _ = compile_program(Path("programs") / f"{name}.rlhf", symmetric=gpu, output=Path(f"build/{name}.py"))
    path = OPS / f"{name}.txt"
    if update_golden:
        OPS.mkdir(parents=True, exist_ok=True)
        path.write_text(op_list(prog))
    assert path.exists(), f"no golden file {path}: run pytest with --update-golden"
    assert op_list(prog) == path.read_text(), f"ops of {name} changed: review, then --update-golden"
