"""The front end's commands end to end: check, graph, fmt; bad inputs never crash."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfc.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _run(*args: str):
    result = runner.invoke(app, list(args))
    # A user error exits 0/1 through SystemExit; anything else escaped as a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_every_shipped_program_and_library_checks(monkeypatch):
    monkeypatch.chdir(ROOT)
    files = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("programs/*.rlhf"), *ROOT.glob("stdlib/*.rlhf")])
    assert len(files) >= 10
    result = _run("check", *files)
    assert result.exit_code == 0, result.output
    assert len(re.findall(r": ok: ", result.output)) == len(files)
    assert "programs/ppo.rlhf: ok: 6 calls, 17 edges" in result.output


def test_five_mistakes_give_five_located_diagnostics(monkeypatch):
    monkeypatch.chdir(ROOT)
    result = _run("check", "tests/bad_programs/five_mistakes.rlhf")
    assert result.exit_code == 1
    codes = re.findall(r"^error\[(E\d+)\]", result.output, re.M)
    places = re.findall(r"--> tests/bad_programs/five_mistakes.rlhf:(\d+):(\d+)", result.output)
    assert len(set(codes)) == 5 and len(places) == 5
    assert len(re.findall(r"^\s*\|\s*\^+", result.output, re.M)) == 5
    assert "error: could not compile: 5 errors" in result.output


@pytest.mark.parametrize("content", [
    b"", b"\x00\x01\x02\xff\xfe binary", "model \u00e9 = llama()".encode(), b"\xff\xfe\xfd",
    b"(" * 500_000, b"{" * (10 * 1024 * 1024), b"model a = llama(" + b"[" * 100_000,
    b'cluster { device = "unterminated', b"/* never closed", b"dataflow f() { x = a.b(c) -> }",
    b"cluster { nodes = " + b"9" * 5000 + b" }", b"place a on node0[0:" + b"9" * 5000 + b"] dp = 1",
    b"cluster { flops = 1e999  memory = " + b"9" * 25 + b"TiB }",
], ids=["empty", "binary", "unicode-name", "not-utf8", "parens", "10MB-braces", "brackets", "string", "comment",
        "arrow", "huge-int", "huge-mesh", "infinite"])
def test_no_input_crashes_check(tmp_path, content):
    path = tmp_path / "input.rlhf"
    path.write_bytes(content)
    result = _run("check", str(path))
    assert result.exit_code in (0, 1)
    if result.exit_code == 1:
        assert re.search(r"error\[E0\d\d\]", result.output)
    assert "Traceback" not in result.output


def test_missing_file_and_directory_are_diagnostics(tmp_path):
    for target in (tmp_path / "missing.rlhf", tmp_path):
        result = _run("check", str(target))
        assert result.exit_code == 1 and "error[E020]" in result.output


def test_graph_lists_calls_and_writes_dot(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    dot = tmp_path / "ppo.dot"
    result = _run("graph", "programs/ppo.rlhf", "--dot", str(dot))
    assert result.exit_code == 0, result.output
    assert "gen: actor.generate(prompts) -> seq, logp using generate" in result.output
    assert "a_tr -> gen  param actor (next iteration)" in result.output
    text = dot.read_text()
    assert text.startswith("digraph rlhf {") and '"gen" -> "a_tr" [label="seq, logp", style=solid];' in text
    svg = tmp_path / "ppo.svg"
    result = _run("graph", "programs/ppo.rlhf", "--svg", str(svg))
    if shutil.which("dot"):
        assert result.exit_code == 0 and svg.read_text().lstrip().startswith("<")
    else:
        assert result.exit_code == 1 and "Graphviz `dot` is not on PATH" in result.output


def test_fmt_check_write_and_idempotence(tmp_path):
    messy = tmp_path / "messy.rlhf"
    messy.write_text('import sft   from "stdlib/sft.rlhf"  // lib\nmodel  a=llama(preset="tiny"){trainable}\n'
                     'dataset d=jsonl("d.jsonl",field="t",max_len=8)\nrun sft(a,d){batch=2}\n')
    assert _run("fmt", "--check", str(messy)).exit_code == 1
    printed = _run("fmt", str(messy)).output
    assert _run("fmt", "--write", str(messy)).exit_code == 0
    assert messy.read_text() == printed
    assert 'import sft from "stdlib/sft.rlhf"  // lib\n\nmodel a = llama(preset = "tiny") { trainable }\n' in printed
    assert _run("fmt", "--check", str(messy)).exit_code == 0
    assert _run("check", str(messy)).exit_code == 0
    broken = tmp_path / "broken.rlhf"
    broken.write_text("model = \n")
    result = _run("fmt", str(broken))
    assert result.exit_code == 1 and "error[E001]" in result.output


@pytest.mark.parametrize("command", ["check", "graph", "fmt"])
def test_help_teaches_with_examples(command):
    result = _run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.output and f"rlhfc {command}" in result.output


def test_spec_examples_parse_and_format_stably():
    """The code blocks of docs/language.md are real programs of this grammar."""
    from rlhfc.frontend.fmt import format_program
    from rlhfc.frontend.parse import parse_text

    blocks = re.findall(r"```\n(.*?)```", (ROOT / "docs" / "language.md").read_text(), re.S)
    programs = [b for b in blocks if re.search(r"^(import|dataflow|model) ", b, re.M)]
    assert len(programs) >= 2
    for block in programs:
        formatted = format_program(parse_text(block))
        assert format_program(parse_text(formatted)) == formatted


def test_color_rendering_marks_severity_and_location(monkeypatch):
    from rlhfc.frontend.check import check_program
    from rlhfc.diagnostics import render

    monkeypatch.chdir(ROOT)
    _, diagnostics = check_program("tests/bad_programs/e019_device.rlhf")
    colored, plain = render(diagnostics, color=True), render(diagnostics)
    assert "\x1b[1;31merror[E019]" in colored and "\x1b[" not in plain
    assert re.sub(r"\x1b\[[0-9;]*m", "", colored) == plain


def test_fmt_keeps_comments_inside_statements():
    from rlhfc.frontend.ast import without_spans
    from rlhfc.frontend.fmt import format_program
    from rlhfc.frontend.parse import parse_text

    source = ('/* header\n   block */\n\nimport ppo from "stdlib/ppo.rlhf" // trailing\n// lead model\n'
              'model a = llama(preset = "tiny") {\n  trainable // inside\n  optimizer = adam(lr = 1e-6)\n}\n'
              'dataflow f(a, p) {  // header comment\n   // first\n   g = a.generate(p) -> s, l   // t\n'
              '   x = a.train(s, l) using sft { n_mbs = 2 }\n   // closing\n}\nrun f(a, p) { batch = 1 }\n// end\n')
    program = parse_text(source)
    formatted = format_program(program)
    again = parse_text(formatted)
    assert [c.text for c in again.comments] == [c.text for c in program.comments]
    assert without_spans(again.statements) == without_spans(program.statements)
    assert format_program(again) == formatted
    assert '    g = a.generate(p) -> s, l  // t\n' in formatted and "    // closing\n}\n" in formatted
    assert formatted.startswith("/* header\n   block */\n\nimport ppo from \"stdlib/ppo.rlhf\"  // trailing\n")
