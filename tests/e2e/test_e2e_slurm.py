"""`rlhfc compile --launcher slurm`: the sbatch script asks for the cluster block's
nodes and GPUs, quotes every path it passes, and its `srun torchrun` line really starts
a two-node job: the whole script runs under stand-ins for `srun` (one copy of the
command per simulated node, here on localhost) and `scontrol`, and the two torchrun
agents meet through c10d rendezvous and train for two steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rlhfc.cli.run import read_metrics
from rlhfc_runtime.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# stand-ins for Slurm's commands: `srun` runs its command once per node (SLURM_NNODES
# copies at once, each logging to $FAKE_LOGS/nodeN.log, exit 1 if any failed) or, with
# FAKE_ARGV set, writes the arguments it got there, NUL-separated; `scontrol show
# hostnames` names the head node
SRUN = r"""#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
if [ -n "${FAKE_ARGV:-}" ]; then printf '%s\0' "$@" > "$FAKE_ARGV"; exit 0; fi
pids=()
for n in $(seq "$SLURM_NNODES"); do "$@" > "$FAKE_LOGS/node$n.log" 2>&1 & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""
SCONTROL = "#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n"

PROGRAM = """import sft from "stdlib/sft.rlhf"
cluster { nodes = 2  devices_per_node = 1  device = "cpu" }
model actor = llama(preset = "tiny-32") { trainable  optimizer = adam(lr = 1e-3) }
dataset demos = jsonl(DATA/sft.jsonl", prompt = "prompt", response = "response",
                      max_len = 32, tokenizer = DATA/tokenizer.json")
run sft(actor, demos) { batch = 8  steps = 5  seed = 1 }
place a_tr on nodes[0:2] dp = 2 tp = 1 pp = 1
"""


def _slurm_stubs(tmp_path: Path) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return stubs


def _compile(program: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rlhfc"), "compile", str(program), "-o", str(output), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _program(directory: Path) -> Path:
    directory.mkdir(parents=True)
    path = directory / "sft2.rlhf"
    path.write_text(PROGRAM.replace("DATA/", f'"{ROOT}/data/tiny/'))
    return path


def test_sbatch_asks_for_the_cluster_and_quotes_every_path(tmp_path):
    program = _program(tmp_path / "src")
    hostile = tmp_path / "runs $(touch pwned) `touch pwned`\n'x\" ; rm -rf ~"
    output = tmp_path / "build's dir" / "sft2.py"
    done = _compile(program, output, "--launcher", "slurm", "--run-dir", str(hostile))
    assert done.returncode == 0, done.stderr
    script = output.with_suffix(".sbatch")
    text = script.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=sft2", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1"]  # cpu: no GPUs
    argv = tmp_path / "argv"
    env = {**os.environ, "PATH": f"{_slurm_stubs(tmp_path)}:{os.environ['PATH']}", "FAKE_ARGV": str(argv),
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]", "RLHFC_RDZV_PORT": "4321"}
    ran = subprocess.run(["bash", str(script), "--steps", "2"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert argv.read_text().split("\0")[:-1] == [
        "torchrun", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:4321",
        "--rdzv-id=77", str(output.resolve()), "--out", str(hostile), "--steps", "2"]
    assert hostile.is_dir() and not list(tmp_path.rglob("pwned"))  # made as named; nothing ran


def test_sbatch_requests_the_gpus_of_the_cluster_block(tmp_path):
    output = tmp_path / "ppo_70b.py"
    done = _compile(ROOT / "programs" / "ppo_70b.rlhf", output, "--launcher", "slurm")
    assert done.returncode == 0, done.stderr
    text = output.with_suffix(".sbatch").read_text()
    assert "#SBATCH --nodes=16\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert f"--out {ROOT / 'runs' / 'ppo_70b'} " in text  # the default run directory, absolute
    refused = _compile(ROOT / "programs" / "ppo_70b.rlhf", output, "--run-dir", "x")
    assert refused.returncode == 1 and "needs --launcher slurm" in refused.stderr and "Traceback" not in refused.stderr


def test_the_sbatch_torchrun_line_trains_on_two_simulated_nodes(tmp_path):
    base = tmp_path / "it's a dir"
    program = _program(base / "src")
    output, run_dir = base / "build" / "sft2.py", base / "run dir"
    assert _compile(program, output, "--launcher", "slurm", "--run-dir", str(run_dir)).returncode == 0
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PATH": f"{_slurm_stubs(tmp_path)}:{BIN}:{os.environ['PATH']}", "FAKE_LOGS": str(logs),
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-2]",
           "RLHFC_RDZV_PORT": str(free_port())}
    # its own session: on a hang, the whole group (both agents and their workers) is killed
    proc = subprocess.Popen(["bash", str(output.with_suffix(".sbatch")), "--steps", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        said, _ = proc.communicate()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node_logs = {p.name: p.read_text()[-1500:] for p in sorted(logs.glob("node*.log"))}
    assert proc.returncode == 0, (said, node_logs)
    assert sorted(node_logs) == ["node1.log", "node2.log"]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]  # --steps 2 reached the program through the script
    assert all(r["rows/a_tr"] == 8 and r["a_tr/loss"] > 0 for r in records)
