"""Hostile inputs to the compiler: located errors, exit 1, nothing read that should not
be (FIFOs, devices, non-.rlhf imports), no file contents in messages."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from rlhfc.cli import app

ROOT = Path(__file__).resolve().parents[2]
PPO = (ROOT / "programs" / "ppo.rlhf").read_text().replace('"../data/', f'"{ROOT}/data/')


def rlhfc(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "rlhfc"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    (tmp_path / "p.rlhf").write_text(text)
    return rlhfc("check", "p.rlhf", cwd=tmp_path)


def test_fifos_and_foreign_files_are_refused_unread(tmp_path):
    os.mkfifo(tmp_path / "pipe.rlhf")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:TOP-SECRET\n")
    (tmp_path / "a.rlhf").write_text(f'import x from "{secret}"\nimport y from "pipe.rlhf"\n')
    done = rlhfc("check", "a.rlhf", "pipe.rlhf", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "TOP-SECRET" not in done.stderr and "is not a .rlhf file" in done.stderr
    assert "pipe.rlhf` is not a regular file" in done.stderr and "a.rlhf:2:15" in done.stderr


def test_non_finite_numbers_and_bad_optimizer_settings_are_located(tmp_path):
    done = _check(tmp_path, PPO.replace("adam(lr = 2e-3)", "adam(lr = 1e400)", 1))
    assert done.returncode == 1 and "`1e400` is too large to be a finite number" in done.stderr
    assert "p.rlhf:11:" in done.stderr
    done = _check(tmp_path, PPO.replace("adam(lr = 2e-3)", "adam(lr = 1, lr = 2, weight_decay = -1, wieght_decay = 0)", 1))
    assert done.returncode == 1
    for said in ("`lr` is given more than once", "`weight_decay = -1`: weight decay must be 0 or more",
                 "unknown key `wieght_decay`", "weight_decay"):
        assert said in done.stderr
    assert "learning rate must be positive" in _check(tmp_path, PPO.replace("lr = 2e-3", "lr = -1", 1)).stderr


_PPO_FILE = str(ROOT / "programs" / "ppo.rlhf")
_BAD_ARGUMENTS = [
    *((("plan", _PPO_FILE, "--cluster", c), "--cluster")
      for c in ("2x", "0x4:cpu", "axb:cpu", "-1x2:cpu", "1x2", "1x2:nope", "99999999999999999999x2:cpu", "1x4096:cpu")),
    *((("plan", _PPO_FILE, "--time-limit", t), "--time-limit") for t in ("nan", "inf", "-1", "0", "-inf", "abc", "")),
    (("plan", _PPO_FILE, "--workers", "0"), "--workers"),
    (("compile", _PPO_FILE, "--devices", "0"), "--devices"),
    (("compile", _PPO_FILE, "--devices", "-3"), "--devices"),
    (("run", _PPO_FILE, "--steps", "0", "--out", "{tmp}/r"), "--steps"),
    (("run", _PPO_FILE, "--steps", "two", "--out", "{tmp}/r"), "--steps"),
    (("run", _PPO_FILE, "--devices", "0", "--out", "{tmp}/r"), "--devices"),
    (("run", _PPO_FILE, "--keep", "0", "--out", "{tmp}/r"), "--keep"),
    (("run", _PPO_FILE, "--save-every", "0", "--out", "{tmp}/r"), "--save-every"),
    *(((cmd, _PPO_FILE, flag, target), flag)
      for cmd, flag in (("compile", "-o"), ("plan", "--json"), ("plan", "--svg"), ("plan", "--png"), ("graph", "--dot"),
                        ("graph", "--svg"))
      for target in ("/dev/full", "{tmp}", "{tmp}/file.txt/below.out")),
]


def test_cli_arguments_and_outputs_are_validated_before_any_work(tmp_path):
    """Malformed values and unwritable outputs: exit 1, the option named, no traceback, nothing written."""
    (tmp_path / "file.txt").write_text("a file, so nothing can be below it")
    for args, said in _BAD_ARGUMENTS:
        args = [a.format(tmp=tmp_path) for a in args]
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 1 and said in done.output, (args, done.output)
        assert done.exception is None or isinstance(done.exception, SystemExit), (args, done.exception)
        assert "solve" not in done.output and "wrote" not in done.output, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_outputs_below_a_missing_directory_are_written(tmp_path):
    for args in (("compile", _PPO_FILE, "-o", f"{tmp_path}/a/b/p.py"),
                 ("graph", _PPO_FILE, "--dot", f"{tmp_path}/c/g.dot"),
                 ("plan", _PPO_FILE, "--time-limit", "2", "--json", f"{tmp_path}/d/plan.json")):
        done = CliRunner().invoke(app, list(args))
        assert done.exit_code == 0, done.output
        assert Path(args[-1]).stat().st_size > 100 and not list(Path(args[-1]).parent.glob("*.tmp"))


_TEXT = st.text(alphabet=st.sampled_from(list('abcz_{}()=,"\n /.0123456789-e')), max_size=60)


def _invoke(args: list[str]):
    """The CLI in this process: exit 0 or 1 and no exception but SystemExit (no traceback)."""
    done = CliRunner().invoke(app, args)
    assert done.exit_code in (0, 1), (args, done.output)
    assert done.exception is None or isinstance(done.exception, SystemExit), (args, done.exception)
    return done


_MUTATION = st.tuples(st.floats(0, 1), st.sampled_from(["insert", "delete", "replace"]), _TEXT, st.integers(1, 40))


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=3), command=st.sampled_from(["fmt", "graph", "plan", "compile"]))
def test_cli_commands_on_mutated_programs_never_trace_back(tmp_path_factory, mutations, command):
    tmp, text = tmp_path_factory.mktemp("fuzz"), PPO
    for where, kind, junk, length in mutations:
        at = int(where * len(text))
        text = text[:at] + (junk if kind != "delete" else "") + text[at + (length if kind != "insert" else 0):]
    (tmp / "p.rlhf").write_text(text)
    extra = {"compile": ["-o", str(tmp / "p.py")], "plan": ["--time-limit", "2"]}.get(command, [])
    done = _invoke([command, str(tmp / "p.rlhf"), *extra])
    if done.exit_code == 1 and command != "fmt":
        assert "error" in done.output


@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(["--cluster", "--time-limit", "--workers"]),
       value=st.one_of(st.text(st.sampled_from(list("0123456789x:-.e+naifcpuH")), max_size=24),
                       st.sampled_from(["1x2:cpu", "1e9", "-0", "1x0:cpu", "9" * 400 + "x2:cpu", "0.5"])))
def test_plan_option_values_never_trace_back(option, value):
    done = _invoke(["plan", _PPO_FILE, option, value] + (["--time-limit", "2"] if option != "--time-limit" else []))
    if done.exit_code == 1:
        assert option in done.output or "error" in done.output, done.output


def test_a_1500_file_import_chain_loads_without_recursion_and_a_cycle_in_it_is_e021(tmp_path):
    n = 1500
    for i in range(1, n):
        head = f'import d{i + 1} from "f{i + 1}.rlhf"\n' if i + 1 < n else ""
        (tmp_path / f"f{i}.rlhf").write_text(head + f"dataflow d{i}(actor, data) {{\n"
                                             "    a_tr = actor.train(data)  using sft\n}\n")
    (tmp_path / "f0.rlhf").write_text('import d1 from "f1.rlhf"\n'
                                      'model actor = llama(preset = "tiny") { trainable  optimizer = adam(lr = 1e-3) }\n'
                                      'dataset d = jsonl("d.jsonl", prompt = "p", response = "r", max_len = 8)\n'
                                      "run d1(actor, d) { batch = 2 }\n")
    done = rlhfc("check", "f0.rlhf", cwd=tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = tmp_path / f"f{n - 1}.rlhf"
    last.write_text('import d0 from "f0.rlhf"\n' + last.read_text())
    deep = tmp_path / f"f{n - 2}.rlhf"
    deep.write_text(deep.read_text().replace(f"import d{n - 1} ", f"import nope, d{n - 1} "))
    done = rlhfc("check", "f0.rlhf", cwd=tmp_path)
    assert done.returncode == 1 and "error[E021]: import cycle: f0.rlhf -> f1.rlhf ->" in done.stderr, done.stderr[-2000:]
    assert f"f{n - 1}.rlhf:1:16" in done.stderr and "Traceback" not in done.stderr
    assert f"error[E002]: `f{n - 1}.rlhf` defines no dataflow `nope`" in done.stderr  # names bind at any depth


def _with_data(tmp_path: Path, data: str = "d.jsonl", tokenizer: str = f"{ROOT}/data/tiny/tokenizer.json") -> Path:
    text = PPO.replace(f'"{ROOT}/data/tiny/prompts.jsonl"', f'"{data}"')
    (tmp_path / "p.rlhf").write_text(text.replace(f'"{ROOT}/data/tiny/tokenizer.json"', f'"{tokenizer}"'))
    return tmp_path / "p.rlhf"


def test_data_and_tokenizer_errors_are_located_at_check(tmp_path):
    """Every row is checked (not only the first): FILE:LINE:COL of the bad row, at the
    dataset's path in the program; a directory, a FIFO or a tokenizer that is not JSON too."""
    rows = (ROOT / "data" / "tiny" / "prompts.jsonl").read_bytes().splitlines(keepends=True)[:6]
    program = _with_data(tmp_path)
    for bad, said in ((b'{"prompt": "ab\xff"}\n', "d.jsonl:4:15: not UTF-8 text (byte 0xff)"),
                      (b'["prompt"]\n', "d.jsonl:4:1: a row must be a JSON object, not list"),
                      (b'{"other": "x"}\n', "d.jsonl:4: missing string field(s) prompt (the row has: other"),
                      (b'{"prompt": \n', "d.jsonl:4:12: invalid JSON: Expecting value")):
        (tmp_path / "d.jsonl").write_bytes(b"".join(rows[:3]) + bad + b"".join(rows[3:]))
        done = CliRunner().invoke(app, ["check", str(program)])
        assert done.exit_code == 1 and "error[E030]" in done.output and said in done.output, done.output
        assert "p.rlhf:20:25" in done.output and not isinstance(done.exception, Exception), done.output
    (tmp_path / "d.jsonl").unlink()
    (tmp_path / "d.jsonl").mkdir()
    assert "d.jsonl:1: the dataset file is a directory" in CliRunner().invoke(app, ["check", str(program)]).output
    (tmp_path / "d.jsonl").rmdir()
    os.mkfifo(tmp_path / "d.jsonl")
    done = rlhfc("check", "p.rlhf", cwd=tmp_path)  # a subprocess: opening the FIFO would hang
    assert done.returncode == 1 and "d.jsonl:1: the dataset file is not a regular file" in done.stderr
    (tmp_path / "tok.json").write_text("this is not JSON\n")
    done = CliRunner().invoke(app, ["check", str(_with_data(tmp_path, f"{ROOT}/data/tiny/prompts.jsonl", "tok.json"))])
    assert done.exit_code == 1 and "error[E031]" in done.output and "tok.json:1:1: the tokenizer is not JSON" in done.output


_ROWS = (ROOT / "data" / "tiny" / "prompts.jsonl").read_bytes().splitlines(keepends=True)[:8]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(line=st.integers(0, 7), junk=st.binary(max_size=40), replace=st.booleans())
def test_random_bytes_in_a_data_file_are_located_at_check_and_again_at_run_time(tmp_path_factory, line, junk, replace):
    """Check and the runtime's start-up scan agree: both accept the file, or both name the
    same FILE:LINE; never an exception."""
    from rlhfc.frontend.check import check_program
    from rlhfc_runtime.data.sources import DataError, open_rows

    tmp = tmp_path_factory.mktemp("data")
    rows = list(_ROWS)
    rows[line:line + replace] = [junk + b"\n"]
    (tmp / "d.jsonl").write_bytes(b"".join(rows))
    errors = [d for d in check_program(_with_data(tmp))[1] if d.is_error]
    try:
        open_rows(tmp / "d.jsonl", "jsonl", ["prompt"])
    except DataError as e:
        at = re.match(rf"{re.escape(str(tmp / 'd.jsonl'))}:(\d+)", str(e))
        assert at and 1 <= int(at.group(1)) <= len(rows), str(e)
        assert [d.code for d in errors] == ["E030"] and f"d.jsonl:{at.group(1)}" in errors[0].message, errors
        assert errors[0].span.file.endswith("p.rlhf") and errors[0].span.line == 20
    else:
        assert errors == [], errors


def test_a_dataflow_without_calls_and_a_program_without_run_are_e032(tmp_path):
    """`plan` and `compile` crashed in the planner's hint (`min()` of no calls): a dataflow
    without calls is a located checker error, and a program without `run` (here 20,000
    model declarations) has nothing to plan."""
    empty = tmp_path / "empty.rlhf"
    empty.write_text('model actor = llama(preset = "tiny")\ndataflow nothing(actor) {\n}\nrun nothing(actor) { batch = 2 }\n')
    for command in (["check"], ["plan"], ["compile", "-o", str(tmp_path / "p.py")]):
        done = _invoke([command[0], str(empty), *command[1:]])
        assert done.exit_code == 1 and "error[E032]: dataflow `nothing` has no calls" in done.output, done.output
        assert f"{empty}:2:10" in done.output and "hint:" in done.output
    many = tmp_path / "many.rlhf"
    many.write_text("".join(f'model m{i} = llama(preset = "tiny")\n' for i in range(20_000)))
    for command in (["plan"], ["compile", "-o", str(tmp_path / "p.py")]):
        done = _invoke([command[0], str(many), *command[1:]])
        assert done.exit_code == 1 and f"error[E032]: `{many}` has no `run`: there is nothing to plan" in done.output
        assert f"{many}:1:1" in done.output and "hint:" in done.output
    assert not (tmp_path / "p.py").exists()


def test_a_pinned_n_mbs_above_the_rows_of_a_replica_is_located(tmp_path):
    program = tmp_path / "p.rlhf"
    program.write_text(PPO + "place a_tr on node0[0:2] dp = 2 tp = 1 pp = 1 n_mbs = 99999999999999\n")
    done = _invoke(["check", str(program)])
    assert done.exit_code == 1 and f"{program}:26:55" in done.output, done.output
    assert ("error[E022]: `n_mbs = 99999999999999` micro-batches cannot split the 32 row(s) that each of the "
            "dp = 2 replica(s) of `a_tr` gets (64 rows)") in done.output and "hint: n_mbs = 1 .. 32 here" in done.output
    program.write_text(PPO + "place a_tr on node0[0:2] dp = 2 tp = 1 pp = 1 n_mbs = 32\n")
    assert _invoke(["check", str(program)]).exit_code == 0


def test_a_pinned_token_budget_below_one_sequence_is_located(tmp_path):
    """A pin may fix the budget itself; below one sequence's priced tokens (16 prompt +
    12 generated) no micro-batch could hold a row, and `n_mbs` beside it would say twice
    what the micro-batches are."""
    from rlhfc.frontend.check import load_program

    program = tmp_path / "p.rlhf"
    pin = "place a_tr on node0[0:2] dp = 2 tp = 1 pp = 1 token_budget = "
    program.write_text(PPO + pin + "27\n")
    done = _invoke(["check", str(program)])
    assert done.exit_code == 1 and f"{program}:26:{len(pin) + 1}" in done.output, done.output
    assert ("error[E022]: `token_budget = 27` is below one row of `a_tr`: 28 priced tokens, and a sequence is "
            "never split") in done.output and "hint: token_budget >= 28 here (or pin n_mbs)" in done.output
    program.write_text(PPO + pin + "84 n_mbs = 2\n")
    done = _invoke(["check", str(program)])
    assert done.exit_code == 1 and "error[E022]: pin `n_mbs` or `token_budget`, not both" in done.output
    program.write_text(PPO + pin + "84\n")  # 3 sequences: 32 rows a replica in 11 micro-batches
    flow = load_program(program)
    assert flow.pins[0].strategy.token_budget == 84 and flow.call("a_tr").n_mbs(flow.pins[0].strategy) == 11


def test_a_tokenizer_directory_without_tokenizer_files_is_e031_at_check(tmp_path):
    """The runtime said "You need to have sentencepiece or tiktoken installed" at step 0."""
    (tmp_path / "tok").mkdir()
    program = _with_data(tmp_path, f"{ROOT}/data/tiny/prompts.jsonl", "tok")
    done = _invoke(["check", str(program)])
    assert done.exit_code == 1 and "error[E031]" in done.output and f"{program}:20:9" in done.output
    assert f"{tmp_path / 'tok'}:1: the tokenizer directory has neither tokenizer.json nor tokenizer_config.json " \
           "(it is empty)" in done.output, done.output
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    assert "has no tokenizer.json (it holds tokenizer_config.json)" in _invoke(["check", str(program)]).output


def test_a_character_the_wordlevel_tokenizer_cannot_map_is_e030_at_its_line(tmp_path):
    """The tiny task's WordLevel tokenizer has no `[UNK]`: the runtime failed at step 0."""
    rows = (ROOT / "data" / "tiny" / "prompts.jsonl").read_bytes().splitlines(keepends=True)[:6]
    (tmp_path / "d.jsonl").write_bytes(b"".join(rows[:3]) + '{"prompt": "ab3é"}\n'.encode() + b"".join(rows[3:]))
    done = _invoke(["check", str(_with_data(tmp_path))])
    assert done.exit_code == 1 and "error[E030]" in done.output and "p.rlhf:20:9" in done.output, done.output
    assert "d.jsonl:4`: the tokenizer of `prompts` cannot map 'é' in field `prompt`: its WordLevel vocabulary " \
           "has no unknown token" in done.output


def test_a_row_nested_100000_deep_is_located_and_a_bom_is_skipped(tmp_path):
    """A RecursionError traceback at check and at run time; a UTF-8 byte order mark refused
    the whole file. Both read the same at check and in the runtime's scan."""
    from rlhfc_runtime.data.sources import DataError, open_rows

    rows = (ROOT / "data" / "tiny" / "prompts.jsonl").read_bytes().splitlines(keepends=True)[:6]
    deep = b'{"prompt": "ab3", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    (tmp_path / "d.jsonl").write_bytes(b"".join(rows[:3]) + deep + b"".join(rows[3:]))
    said = f"{tmp_path / 'd.jsonl'}:4:123: the row nests arrays or objects more than 100 levels deep"
    done = _invoke(["check", str(_with_data(tmp_path))])
    assert done.exit_code == 1 and "error[E030]" in done.output and said in done.output, done.output
    try:
        open_rows(tmp_path / "d.jsonl", "jsonl", ["prompt"])
    except DataError as e:
        assert str(e) == said
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + b"".join(rows))
    assert _invoke(["check", str(_with_data(tmp_path))]).exit_code == 0
    assert open_rows(tmp_path / "d.jsonl", "jsonl", ["prompt"])[0] == json.loads(rows[0])
