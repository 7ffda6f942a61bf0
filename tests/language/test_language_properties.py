"""Property tests: fmt round-trips random well-formed programs; no input makes check raise."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfc.frontend.ast import without_spans
from rlhfc.frontend.check import check_program
from rlhfc.diagnostics import CompileError
from rlhfc.frontend import fmt
from rlhfc.frontend.fmt import format_program
from rlhfc.frontend.parse import parse_text

ROOT = Path(__file__).resolve().parents[2]
KEYWORDS = {"import", "from", "cluster", "model", "dataset", "dataflow", "run", "place", "on", "using",
            "trainable", "true", "false"}

names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: n not in KEYWORDS)
numbers = st.one_of(st.integers(-10**6, 10**9).map(str),
                    st.sampled_from(["1e-6", "0.05", "3.5", "2E+3", "80GiB", "512MiB", "16GB", "900GB/s", "1.5TB"]))
strings = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from('"\\\n\t'), max_size=12)
quoted = strings.map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                     .replace("\t", "\\t") + '"')
atoms = st.one_of(numbers, quoted, st.sampled_from(["true", "false"]), names)
values = st.one_of(atoms, st.builds(lambda f, kws: f"{f}({', '.join(kws)})", names,
                                    st.lists(st.builds("{} = {}".format, names, atoms), max_size=3)))
options = st.lists(st.builds("{} = {}".format, names, values), max_size=4)
comments = st.one_of(st.just(""), st.builds(lambda t: f"// {t}\n", st.text("abc xyz*/", max_size=10)),
                     st.builds(lambda t: f"/* {t} */ ", st.text("abc\nxyz/", max_size=10)))
ws = st.sampled_from([" ", "  ", "\n", " \n\t "])


def _block(opts):
    return "{ " + "  ".join(opts) + " }"


args = st.lists(st.one_of(atoms, st.builds("{} = {}".format, names, atoms)), max_size=4)
statements = st.one_of(
    st.builds(lambda ns, p: f"import {', '.join(ns)} from {p}", st.lists(names, min_size=1, max_size=3), quoted),
    st.builds(lambda o: f"cluster {_block(o)}", options),
    st.builds(lambda n, f, a, body: f"model {n} = {f}({', '.join(a)})" + ("" if body is None else " { " + " ".join(body) + " }"),
              names, names, args, st.none() | st.lists(st.one_of(st.just("trainable"), st.builds("{} = {}".format, names, values)), max_size=3)),
    st.builds(lambda n, f, a: f"dataset {n} = {f}({', '.join(a)})", names, names, args),
    st.builds(lambda n, ps, calls: f"dataflow {n}({', '.join(ps)}) {{\n" + "\n".join(calls) + "\n}",
              names, st.lists(names, max_size=4),
              st.lists(st.builds(lambda c, m, k, i, o, u, opt: f"{c} = {m}.{k}({', '.join(i)})"
                                 + (f" -> {', '.join(o)}" if o else "") + (f" using {u}" if u else "")
                                 + ("" if opt is None else " " + _block(opt)),
                                 names, names, names, st.lists(names, max_size=3), st.lists(names, max_size=3),
                                 st.none() | names, st.none() | options), max_size=4)),
    st.builds(lambda n, a, o: f"run {n}({', '.join(a)})" + ("" if o is None else " " + _block(o)),
              names, st.lists(names, max_size=4), st.none() | options),
    st.builds(lambda c, base, rng, o: f"place {c} on {base}{rng} " + " ".join(o),
              names, names, st.sampled_from(["", "[0:4]", "[2:3]"]), options),
)
programs = st.lists(st.tuples(comments, statements, ws), max_size=7).map(
    lambda items: "".join(c + s + w for c, s, w in items))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_fmt_round_trips_to_the_same_ast_and_is_idempotent(text):
    program = parse_text(text)
    formatted = format_program(program)
    again = parse_text(formatted)
    assert without_spans(again.statements) == without_spans(program.statements)
    assert [c.text for c in again.comments] == [c.text for c in program.comments]
    assert format_program(again) == formatted


SEED = (ROOT / "programs" / "ppo_pinned.rlhf").read_text()


def _check_never_raises(tmp_path: Path, data: bytes) -> None:
    """check returns diagnostics or a Dataflow; it must never raise."""
    path = tmp_path / "fuzz.rlhf"
    path.write_bytes(data)
    flow, diagnostics = check_program(path)
    assert flow is not None or any(d.is_error for d in diagnostics)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(programs)
def test_random_well_formed_programs_check_without_exceptions(tmp_path, text):
    _check_never_raises(tmp_path, text.encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_give_diagnostics_not_exceptions(tmp_path, data):
    _check_never_raises(tmp_path, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(SEED)), st.integers(0, 6), st.sampled_from(
    ["", "x", "(", ")", "{", "}", "=", "->", ",", '"', "0", "-1", "tp = 3", "using", "1e9GiB", "\n", "node9", ' { group_size = "x" }', " using values", " -> k", "seed = -2"])),
    min_size=1, max_size=4))
def test_mutated_programs_give_diagnostics_not_exceptions(tmp_path, edits):
    text = SEED
    for position, cut, insert in edits:
        text = text[:position] + insert + text[position + cut:]
    _check_never_raises(tmp_path, text.encode())


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_parse_raises_only_compile_errors(text):
    try:
        parse_text(text)
    except CompileError as error:
        assert error.diagnostics[0].code == "E001"


def _fmt_lines_executed(text: str) -> int:
    """Lines of rlhfc/frontend/fmt.py executed while formatting `text` (a count of work, not a time)."""
    program, count = parse_text(text, "p.rlhf"), 0

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != fmt.__file__:
            return None
        count += event == "line"
        return trace

    sys.settrace(trace)
    try:
        format_program(program)
    finally:
        sys.settrace(None)
    return count


def test_fmt_is_linear_in_comments():
    """Comments between statements, inside a statement, between a dataflow's calls and at the
    end: twice the comments must cost about twice the work (it was quadratic: 32k comment
    lines took 57 s)."""
    source = (ROOT / "programs" / "ppo.rlhf").read_text() + (ROOT / "stdlib" / "ppo.rlhf").read_text()

    def commented(n: int) -> str:
        return "".join(line + "\n" + "".join(f"// note {k}\n" for k in range(n)) for line in source.split("\n"))

    small, large = _fmt_lines_executed(commented(40)), _fmt_lines_executed(commented(160))
    assert large < 4.5 * small, (small, large)


def test_fmt_is_linear_in_declarations():
    """Runs of aligned model, dataset and `place` lines: 4x the declarations must cost about
    4x the work (the alignment width was found again for every line: 20,000 models took
    more than 30 s)."""
    def declared(n: int) -> str:
        return ("".join(f'model m{i} = llama(preset = "tiny")\n' for i in range(n))
                + "".join(f'dataset d{i} = jsonl("d.jsonl", field = "p", max_len = 8)\n' for i in range(n))
                + "".join(f"place c{i} on node0[0:2] dp = 2 tp = 1 pp = 1\n" for i in range(n)))

    small, large = _fmt_lines_executed(declared(50)), _fmt_lines_executed(declared(200))
    assert large < 4.5 * small, (small, large)
