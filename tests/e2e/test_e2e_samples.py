"""Token-in, token-out samples, end to end on 2 gloo processes: every samples.jsonl row
carries the prompt the model saw and the tokens it generated, as ids, with the
generating policy's log-prob of each, which `transformers` recomputes from the
checkpoint that generated them: the initial one for step 1, the step-1 checkpoint for
step 2. Generation runs on dp = 2 and the reward on tp = 2, so half the rows shown are
generated on the rank that does not write them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from codegen_fixtures import plan, strategy

from rlhfc.backend.emit import emit
from rlhfc.backend.lower import lower
from rlhfc_runtime.contract.ops import Move
from rlhfc.frontend.check import load_program

ROOT = Path(__file__).resolve().parents[2]
TEMPERATURE = 0.7  # not 1: the logprobs are the raw policy's, not the temperature-scaled ones
PROGRAM = f"""import grpo from "stdlib/grpo.rlhf"
cluster {{ nodes = 1  devices_per_node = 2  device = "cpu" }}
model actor  = llama("ckpt") {{ trainable  optimizer = adam(lr = 1e-2) }}
model ref    = llama("ckpt")
model reward = python("rewards.py", exact_match = 1.0, format_ok = 0.2)
dataset prompts = jsonl("train.jsonl", field = "question", max_len = 24, chat = true)
run grpo(actor, ref, reward, prompts) {{
    batch = 4  group_size = 2  max_new_tokens = 5  steps = 2  seed = 3  temperature = {TEMPERATURE}
}}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("samples")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(tmp), "--rows", "20"],
                   check=True, capture_output=True)
    (tmp / "rewards.py").write_text((ROOT / "programs" / "rewards.py").read_text())
    (tmp / "grpo.rlhf").write_text(PROGRAM)
    df = load_program(tmp / "grpo.rlhf")
    dp2, tp2 = strategy(0, 2, dp=2), strategy(0, 2, dp=1, tp=2)
    prog = lower(df, plan(df, {"gen": dp2, "score": tp2, "refl": dp2, "a_tr": tp2}))
    assert any(isinstance(op, Move) and op.key == "seq" for op in prog.ops)
    script = tmp / "grpo.py"
    script.write_text(emit(prog, str(script)))
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp / "out"), "--save-every", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return tmp


def policy(run_dir: Path, step: int):
    """The actor that generated step `step`'s rows, in `transformers` at fp32: the
    initial checkpoint, updated by the checkpoint of step `step` - 1."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhfc_runtime.ckpt_store import read_weights

    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "ckpt"), dtype=torch.float32).eval()
    if step > 1:
        weights = read_weights(run_dir / "out" / "checkpoint" / f"step-{step - 1:06d}", "actor")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        assert model.config.tie_word_embeddings == bool(missing)  # only a tied head is not saved
    return model


def token_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0):
    """log p(completion token | what precedes it) under `model`'s logits / temperature."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0].float() / temperature
    at = logits[len(prompt_ids) - 1:-1]  # position t predicts token t + 1
    return at.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_samples_carry_the_ids_and_the_generating_policys_logprobs(run_dir):
    import torch

    from rlhfc_runtime.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(run_dir / "ckpt")
    rows = [json.loads(ln) for ln in (run_dir / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["row"]) for r in rows] == [(s, r) for s in (1, 2) for r in (0, 2, 4, 6)]
    scaled_apart = 0.0
    for step in (1, 2):
        model = policy(run_dir, step)
        for row in (r for r in rows if r["step"] == step):
            prompt, completion = row["prompt_ids"], row["completion_ids"]
            assert tokenizer.decode(completion, skip_special_tokens=True) == row["completion"]
            assert tokenizer.decode(prompt) == row["prompt"]
            assert tokenizer.pad_token_id not in prompt  # no padding
            assert 1 <= len(completion) <= 5 and len(row["logprobs"]) == len(completion)
            assert tokenizer.eos_token_id not in completion[:-1]  # generation stops at EOS, which is kept
            mine = token_logprobs(model, prompt, completion)
            assert torch.allclose(torch.tensor(row["logprobs"]), mine, atol=1e-3), (step, row["row"])
            scaled = token_logprobs(model, prompt, completion, TEMPERATURE)
            scaled_apart = max(scaled_apart, float((scaled - mine).abs().max()))
    assert scaled_apart > 1e-2  # the test tells raw log-probs from temperature-scaled ones


def test_step_two_was_generated_by_the_updated_policy(run_dir):
    """The step-1 update moved the policy beyond the tolerance: comparing step 2's rows
    with the initial weights would fail, so the test above checks the right weights."""
    import torch

    model = policy(run_dir, 1)
    rows = [json.loads(ln) for ln in (run_dir / "out" / "samples.jsonl").read_text().splitlines()]
    apart = max(float((token_logprobs(model, r["prompt_ids"], r["completion_ids"]) - torch.tensor(r["logprobs"]))
                      .abs().max()) for r in rows if r["step"] == 2)
    assert apart > 1e-2
