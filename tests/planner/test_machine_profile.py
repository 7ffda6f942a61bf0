"""`rlhfc run` on a `cpu` cluster without coefficients prices with this machine's profile,
measured once and cached per machine (`rlhfc.cli.profile.machine_profile`), and the plan
says which source priced it."""

from pathlib import Path

from rich.console import Console

from rlhfc.cli import profile
from rlhfc.driver import compile_program
from rlhfc.planner.profile import derive
from rlhfc_runtime.profile import Measurement

ROOT = Path(__file__).resolve().parents[2]
GRPO = ROOT / "programs" / "grpo.rlhf"


def _fake_measure(calls):
    def measure(devices, device, base, err):
        calls.append(devices)
        return derive([Measurement("matmul", (64, 64, 64), 1e-5), Measurement("copy", (64 << 20,), 0.02),
                       Measurement("decode", (1, 32, 256), 1e-4), Measurement("decode", (8, 256, 256), 4e-4)],
                      base=base, cores=2)
    return measure


def test_cpu_plans_are_priced_on_this_machine_measured_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls: list[int] = []
    monkeypatch.setattr(profile, "measure", _fake_measure(calls))
    err = Console(file=open(tmp_path / "err.txt", "w"))
    machine = lambda cluster: profile.machine_profile(cluster.devices_per_node, err)  # noqa: E731
    prog, text = compile_program(GRPO, output=tmp_path / "p.py", measure=machine)
    cached = list((tmp_path / "cache" / "rlhfc" / "profiles").glob("cpu-2p-*.json"))
    assert calls == [2] and len(cached) == 1
    assert prog.plan.priced_by == f"this machine's profile, measured once ({cached[0]})"
    assert "priced by this machine's profile, measured once" in text
    assert '"priced_by"' in prog.plan.to_json()
    again, _ = compile_program(GRPO, output=tmp_path / "p.py", measure=machine)
    assert calls == [2] and again.plan.priced_by == prog.plan.priced_by  # read from the cache
    one, _ = compile_program(GRPO, devices=1, output=tmp_path / "p.py", measure=machine)
    assert calls == [2, 1]  # per process count: a worker's threads differ
    plain, _ = compile_program(GRPO, output=tmp_path / "p.py")
    assert plain.plan.priced_by == "the catalog's `cpu` defaults"
    given, _ = compile_program(GRPO, output=tmp_path / "p.py", hardware=cached[0], measure=machine)
    assert calls == [2, 1] and given.plan.priced_by == f"the profile {cached[0]}"
