"""A Qwen2 checkpoint (q/k/v biases, rope_theta 1e6) reallocated between the layouts of a
compiled program: the actor trains with dp = 2 and generates with tp = 2 on 2 gloo
processes. The generation copy must hold exactly the checkpoint's slices, biases
included, and compute what the checkpoint loaded straight into that layout computes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from codegen_fixtures import plan, strategy  # noqa: E402

from rlhfc.backend.emit import emit, program_spec  # noqa: E402
from rlhfc.backend.lower import lower  # noqa: E402
from rlhfc_runtime.contract.ops import Realloc  # noqa: E402
from rlhfc.frontend.check import load_program  # noqa: E402
from rlhfc_runtime.dist import spawn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def qwen2_program(tmp: Path) -> Path:
    """data/math's task with its checkpoint replaced by a biased Qwen2 one whose RoPE
    base is not LLaMA's default (an inline-shaped copy would get both wrong)."""
    from rlhfc_runtime.checkpoint import tiny_config, write_random_checkpoint

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(tmp), "--rows", "20"],
                   check=True, capture_output=True)
    cfg = tiny_config(model_type="qwen2", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0)
    write_random_checkpoint(tmp / "ckpt", cfg, seed=11)
    (tmp / "rewards.py").write_text("def n(prompts, completions, **columns):\n"
                                    "    return [float(len(c)) for c in completions]\n")
    path = tmp / "qwen.rlhf"
    path.write_text("""import grpo from "stdlib/grpo.rlhf"
cluster { nodes = 1  devices_per_node = 2  device = "cpu" }
model actor  = llama("ckpt") { trainable  optimizer = adam(lr = 1e-3) }
model ref    = llama("ckpt")
model reward = python("rewards.py:n")
dataset prompts = jsonl("train.jsonl", field = "question", max_len = 24, chat = true)
run grpo(actor, ref, reward, prompts) { batch = 4  group_size = 2  max_new_tokens = 3  steps = 2  seed = 3 }
""")
    return path


def compiled(tmp: Path):
    df = load_program(qwen2_program(tmp))
    tp2, dp2 = strategy(0, 2, dp=1, tp=2), strategy(0, 2, dp=2)
    return lower(df, plan(df, {"gen": tp2, "score": tp2, "refl": dp2, "a_tr": dp2}))


def _realloc_worker(spec, train, gen) -> list[str]:
    """Load the actor in its train layout, reallocate it to the generation layout as the
    engine does, and compare with the checkpoint's slices and outputs."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from rlhfc_runtime import calls
    from rlhfc_runtime.checkpoint import load_checkpoint
    from rlhfc_runtime.contract.layout import shard_slices
    from rlhfc_runtime.dist import ensure_groups
    from rlhfc_runtime.realloc import reallocate

    rank = dist.get_rank()
    ensure_groups([train, gen])
    home = calls.build_model(spec, train)
    shapes = calls.param_shapes(spec)
    shards = reallocate(calls.shards_of(home), shapes, spec.shape.n_layers, train, gen, rank,
                        dtype=torch.float32, device=torch.device("cpu"))
    copy = calls.model_from_shards(spec, shards, gen, rank)
    full = load_file(str(Path(spec.checkpoint) / "model.safetensors"))
    failures = []
    if set(shards) != set(full) or set(copy.module.shards()) != set(full):
        failures.append(f"rank {rank}: names differ from the checkpoint's: {sorted(set(full) ^ set(shards))}")
    for name, tensor in full.items():
        want = tensor[shard_slices(name, tensor.shape, spec.shape.n_layers, gen, rank, shapes[name].split)]
        if name in shards and not torch.equal(shards[name], want):
            failures.append(f"rank {rank}: {name} differs from the checkpoint's slice")
    direct = load_checkpoint(spec.checkpoint, gen, "lm", torch.device("cpu"))
    ids = torch.arange(3, 19).reshape(2, 8)
    if not torch.allclose(copy.module(ids), direct(ids), atol=1e-5):
        failures.append(f"rank {rank}: the reallocated copy computes other logits than the checkpoint")
    return failures


def test_qwen2_biases_and_rope_survive_reallocation(tmp_path):
    prog = compiled(tmp_path)
    assert Realloc("actor", "L0", "L1") in prog.ops  # home dp = 2 -> generation tp = 2
    layouts = dict(prog.layouts)
    spec = program_spec(prog, str(tmp_path)).models["actor"]
    spec = replace(spec, checkpoint=str(tmp_path / spec.checkpoint))
    results = spawn(_realloc_worker, 2, spec, layouts[dict(prog.homes)["actor"]], layouts["L1"])
    assert [f for per_rank in results for f in per_rank] == []


def test_qwen2_program_runs_across_the_two_layouts(tmp_path):
    prog = compiled(tmp_path)
    script = tmp_path / "qwen.py"
    script.write_text(emit(prog, str(script)))
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 2
