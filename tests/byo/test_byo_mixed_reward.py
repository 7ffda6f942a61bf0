"""A reward model mixed with Python functions in one reward, end to end on 2 gloo processes:
the reward model scores on its own layout (dp = 2), its score key moves to the reward
call's layout (tp = 2), and the reward is the weighted sum of the functions and the
model's score. The components are recomputed outside rlhfc: the functions called
directly, the reward model run by `transformers` on the decoded rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from codegen_fixtures import plan, strategy  # noqa: E402

from rlhfc.backend.emit import emit  # noqa: E402
from rlhfc.backend.lower import lower  # noqa: E402
from rlhfc_runtime.contract.ops import Move  # noqa: E402
from rlhfc.frontend.check import load_program  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = {"exact_match": 1.0, "format_ok": 0.2, "rm_score": 0.5}
NEW_TOKENS = 3
PROGRAM = """cluster {{ nodes = 1  devices_per_node = 2  device = "cpu" }}
model actor  = llama("ckpt") {{ trainable  optimizer = adam(lr = 1e-3) }}
model ref    = llama("ckpt")
model rm     = llama("rm", head = value)
model reward = python("rewards.py", {weights})
dataset prompts = jsonl("train.jsonl", field = "question", max_len = 24, chat = true)

dataflow grpo_rm(actor, ref, rm, reward, prompts) {{
    gen   = actor.generate(prompts)                 -> seq, logp
    judge = rm.inference(seq)                       -> rm_score
    score = reward.inference(seq, rm_score)         -> score
    refl  = ref.inference(seq)                      -> ref_logp
    a_tr  = actor.train(seq, logp, ref_logp, score)  using grpo_actor
}}
run grpo_rm(actor, ref, rm, reward, prompts) {{
    batch = 4  group_size = 2  max_new_tokens = {new}  steps = 2  seed = 3  precision = "fp32"
}}
"""


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory) -> Path:
    """The program compiled under a plan that moves the score key, run for 2 steps."""
    from rlhfc_runtime.checkpoint import read_config, write_random_checkpoint

    tmp = tmp_path_factory.mktemp("mixed")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(tmp), "--rows", "20"],
                   check=True, capture_output=True)
    write_random_checkpoint(tmp / "rm", read_config(tmp / "ckpt"), seed=5, head="value")
    (tmp / "rewards.py").write_text((ROOT / "programs" / "rewards.py").read_text())
    weights = ", ".join(f"{k} = {v}" for k, v in WEIGHTS.items())
    (tmp / "mix.rlhf").write_text(PROGRAM.format(weights=weights, new=NEW_TOKENS))
    df = load_program(tmp / "mix.rlhf")
    tp2, dp2 = strategy(0, 2, dp=1, tp=2), strategy(0, 2, dp=2)
    prog = lower(df, plan(df, {"gen": tp2, "judge": dp2, "score": tp2, "refl": dp2, "a_tr": tp2}))
    assert any(isinstance(op, Move) and op.key == "rm_score" for op in prog.ops)
    script = tmp / "mix.py"
    script.write_text(emit(prog, str(script)))
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp / "out")], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    return tmp


def test_mixed_reward_is_the_weighted_sum_of_independently_computed_components(mixed_run):
    import torch
    from transformers import AutoModelForTokenClassification

    from rlhfc_runtime.data.tokenizer import load_tokenizer  # AutoTokenizer would rebuild its pre-tokenizer

    spec = importlib.util.spec_from_file_location("mixed_rewards", mixed_run / "rewards.py")
    functions = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(functions)
    tokenizer = load_tokenizer(mixed_run / "ckpt")
    rm = AutoModelForTokenClassification.from_pretrained(str(mixed_run / "rm")).eval()
    samples = [json.loads(ln) for ln in (mixed_run / "out" / "samples.jsonl").read_text().splitlines()]
    checked = 0
    for row in samples:
        mine = {name: getattr(functions, name)([row["prompt"]], [row["completion"]], answer=[row["answer"]])[0]
                for name in ("exact_match", "format_ok")}
        assert mine == {name: row[f"reward/{name}"] for name in mine}
        assert row["reward"] == pytest.approx(sum(w * row[f"reward/{k}"] for k, w in WEIGHTS.items()), abs=1e-6)
        ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if len(ids) != NEW_TOKENS:  # an end or special token was dropped when decoding: not rebuilt exactly
            continue
        full = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] + ids
        with torch.no_grad():
            score = rm(torch.tensor([full])).logits[0, -1, 0].item()
        assert row["reward/rm_score"] == pytest.approx(score, abs=1e-4)
        checked += 1
    assert len(samples) == 8 and checked >= 4


def test_each_component_is_a_metric(mixed_run):
    records = [json.loads(ln) for ln in (mixed_run / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        parts = sum(w * record[f"score/reward/{k}"] for k, w in WEIGHTS.items())
        assert record["reward"] == pytest.approx(parts, abs=1e-6)
        assert record["score/reward/rm_score"] != 0.0
