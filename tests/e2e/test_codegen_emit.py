"""Generated code: valid, deterministic Python; program strings escaped; one line per op."""

from __future__ import annotations

import ast

from codegen_fixtures import dataflow, split_plan

from rlhfc.backend.emit import emit, program_spec
from rlhfc.backend.lower import lower

HOSTILE = 'x"""; __import__("os").system("touch PWNED") #\n\'\\ ' + "'''"


def literal_strings(tree: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_hostile_dataset_path_stays_a_string(tmp_path):
    df = dataflow(dataset_path=HOSTILE, kl_mode=HOSTILE)  # a path and a call setting
    text = emit(lower(df, split_plan(df)))
    tree = ast.parse(text)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    called = {n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id for n in calls}
    assert "system" not in called and "__import__" not in called
    assert HOSTILE in literal_strings(tree)  # round-trips exactly, as data
    ns = {}
    exec(compile(tree, "gen.py", "exec"), ns)  # defining the module runs nothing hostile
    assert ns["PROGRAM"].datasets["prompts"].path == HOSTILE
    settings = [dict(ast.literal_eval(k.value)) for n in calls for k in n.keywords if k.arg == "settings"]
    assert any(s.get("kl_mode") == HOSTILE for s in settings)
    assert not (tmp_path / "PWNED").exists()


def test_output_is_deterministic_and_has_one_line_per_op():
    df = dataflow()
    prog = lower(df, split_plan(df))
    text = emit(prog)
    assert text == emit(lower(dataflow(), split_plan(dataflow())))
    tree = ast.parse(text)
    ops = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "OPS").value.elts
    assert len(ops) == len(prog.ops)  # one constructor call per op, one line each
    assert all(n.lineno == n.end_lineno for n in ops)
    ns = {}
    exec(compile(tree, "gen.py", "exec"), ns)
    assert ns["OPS"] == prog.ops  # the file builds the very ops the compiler lowered


def test_spec_carries_models_homes_and_estimates():
    df = dataflow()
    prog = lower(df, split_plan(df))
    spec = program_spec(prog)
    assert spec.world_size == 2
    assert spec.models["actor"].home == dict(prog.homes)["actor"]
    assert spec.models["reward"].rule == "pattern_reward"
    assert set(spec.estimates) == {c.name for c in df.calls}
    ns = {}
    exec(compile(emit(prog), "gen.py", "exec"), ns)
    assert ns["PROGRAM"] == spec
    assert {k: v.ranks for k, v in ns["LAYOUTS"].items()} == {k: v.ranks for k, v in prog.layouts}
