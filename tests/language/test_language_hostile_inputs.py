"""Hostile inputs to the compiler: located errors, exit 1, nothing read that should not
be (FIFOs, devices, non-.rlhf imports), no file contents in messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_cli_arguments_and_outputs_are_validated(tmp_path):
    for args, said in ((("compile", "programs/ppo.rlhf", "-o", "/dev/full"), "is not a regular file"),
                       (("compile", "programs/ppo.rlhf", "-o", str(tmp_path)), "is a directory"),
                       (("compile", "programs/ppo.rlhf", "--devices", "0"), "--devices"),
                       (("run", "programs/ppo.rlhf", "--steps", "0", "--out", str(tmp_path / "r")), "--steps")):
        done = rlhfc(*args)
        assert done.returncode in (1, 2) and said in done.stderr and "Traceback" not in done.stderr, args
    assert not (tmp_path / "r").exists()


_TEXT = st.text(alphabet=st.sampled_from(list('abcz_{}()=,"\n /.0123456789-e')), max_size=60)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=_TEXT, command=st.sampled_from(["fmt", "graph", "plan", "compile"]))
def test_cli_commands_on_mutated_programs_never_trace_back(tmp_path_factory, junk, command):
    tmp = tmp_path_factory.mktemp("fuzz")
    cut = len(PPO) // 2
    (tmp / "p.rlhf").write_text(PPO[:cut] + junk + PPO[cut:])
    args = [command, "p.rlhf"] + (["-o", str(tmp / "p.py")] if command == "compile" else [])
    done = rlhfc(*args, cwd=tmp)
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr


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
