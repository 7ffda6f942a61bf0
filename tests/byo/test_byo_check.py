"""Bring your own task, at check time: python(...) rewards read with `ast` (never run),
dataset formats and fields, tokenizer defaults, chat templates, vocabulary sizes, value heads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfc.frontend.check import check_program

ROOT = Path(__file__).resolve().parents[2]
MODEL = ('llama(layers = 2, hidden = 64, heads = 4, kv_heads = 2, intermediate = 128, vocab = {vocab}, '
         'max_positions = 64)')


@pytest.fixture(scope="module")
def math_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("math")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(out), "--rows", "40"],
                   check=True, capture_output=True)
    return out


def program(tmp: Path, reward='python("rewards.py:exact_match")', dataset=None, actor=None, vocab=96) -> Path:
    actor = actor or MODEL.format(vocab=vocab)
    dataset = dataset or f'jsonl("{tmp}/train.jsonl", field = "question", max_len = 24, tokenizer = "{tmp}/ckpt")'
    text = f"""import grpo from "stdlib/grpo.rlhf"
model actor  = {actor} {{ trainable }}
model ref    = {actor}
model reward = {reward}
dataset prompts = {dataset}
run grpo(actor, ref, reward, prompts) {{ batch = 4  group_size = 2  max_new_tokens = 4 }}
"""
    path = tmp / "p.rlhf"
    path.write_text(text)
    return path


def errors(path: Path) -> list[tuple[str, str, str]]:
    _, diags = check_program(path)
    return [(d.code, d.message, d.hint or "") for d in diags if d.severity.value == "error"]


@pytest.fixture
def task(math_task, tmp_path) -> Path:
    for name in ("train.jsonl",):
        (tmp_path / name).write_text((math_task / name).read_text())
    (tmp_path / "ckpt").symlink_to(math_task / "ckpt")
    (tmp_path / "rewards.py").write_text((ROOT / "programs" / "rewards.py").read_text())
    return tmp_path


def test_python_reward_and_chat_check_and_resolve(task):
    flow, diags = check_program(program(task, dataset=f'jsonl("train.jsonl", field = "question", max_len = 24, '
                                                      f'tokenizer = "ckpt", chat = true, system = "Be brief.")'))
    assert flow is not None, diags
    reward = flow.model("reward")
    assert reward.kind == "rule" and reward.functions == ((str(task / "rewards.py"), "exact_match", 1.0),)
    ds = flow.datasets[0]
    assert ds.chat and ds.system == "Be brief." and ds.columns == ("answer", "a", "b")


def test_weighted_rewards(task):
    flow, _ = check_program(program(task, reward='python("rewards.py", exact_match = 1.0, format_ok = 0.2)'))
    assert [(f, w) for _, f, w in flow.model("reward").functions] == [("exact_match", 1.0), ("format_ok", 0.2)]


def test_unknown_function_is_located_with_a_suggestion(task):
    (code, message, hint), = errors(program(task, reward='python("rewards.py:exact_mach")'))
    assert code == "E029" and "exact_mach" in message and "exact_match" in hint


def test_reward_file_is_read_not_run(task):
    (task / "rewards.py").write_text("raise SystemExit('ran at check time')\ndef f(p, c, **k):\n    return []\n")
    assert errors(program(task, reward='python("rewards.py:f")')) == []
    (task / "rewards.py").write_text("def f(p, c:\n")
    (code, message, _), = errors(program(task, reward='python("rewards.py:f")'))
    assert code == "E029" and "syntax error" in message and "rewards.py:1" in message


def test_missing_reward_file(task):
    (code, message, _), = errors(program(task, reward='python("nope.py:f")'))
    assert code == "E020" and "nope.py" in message


def test_missing_field_lists_the_fields(task):
    (code, message, hint), = errors(program(task, dataset='jsonl("train.jsonl", field = "prompt", max_len = 24)'))
    assert code == "E030" and "train.jsonl:1" in message and "`prompt`" in message
    assert "question, answer, a, b" in hint


def test_formats_by_suffix_and_key(task):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(ln) for ln in (task / "train.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), task / "train.parquet")
    flow, diags = check_program(program(task, dataset='data("train.parquet", field = "question", max_len = 24)'))
    assert flow is not None, diags
    assert flow.datasets[0].format == "parquet" and flow.datasets[0].columns == ("answer", "a", "b")
    flow, _ = check_program(program(task, dataset='data("train.jsonl", format = "datasets", field = "question", '
                                                  'max_len = 24)'))
    assert flow.datasets[0].format == "datasets"
    (code, _, hint), = errors(program(task, dataset='data("train.txt", field = "question", max_len = 24)'))
    assert code == "E022" and "format" in hint


def test_tokenizer_defaults_to_the_actor_checkpoint(task):
    flow, diags = check_program(program(task, actor='llama("ckpt")',
                                        dataset='jsonl("train.jsonl", field = "question", max_len = 24, chat = true)'))
    assert flow is not None, diags
    assert flow.datasets[0].tokenizer == str((task / "ckpt").resolve())


def test_tokenizer_larger_than_the_vocabulary(task):
    (code, message, _), = errors(program(task, vocab=64))
    assert code == "E031" and "86 tokens" in message and "64" in message


def test_chat_needs_a_template(task):
    bare = f'jsonl("train.jsonl", field = "question", max_len = 24, tokenizer = "{ROOT}/data/tiny/tokenizer.json", ' \
           f'chat = true)'
    found = errors(program(task, dataset=bare))  # and the tiny tokenizer cannot map the task's text (E030)
    assert [code for code, _, _ in found] == ["E031", "E030"] and "chat template" in found[0][1]


def test_value_head_checkpoint_loaded_as_lm_is_an_error(task, tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    config = json.loads((task / "ckpt" / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForSequenceClassification"]}))
    (code, message, hint), = errors(program(task, reward='llama("rm")'))
    assert code == "E011" and "ForSequenceClassification" in message and "head = value" in hint


def mixed(task: Path, reward: str, score_call: str = "score = reward.inference(seq, rm_score) -> score") -> Path:
    """A GRPO dataflow whose reward combines a reward model's score (key `rm_score`)."""
    path = task / "mixed.rlhf"
    path.write_text(f"""model actor  = {MODEL.format(vocab=96)} {{ trainable }}
model rm     = {MODEL.format(vocab=96).replace(")", ", head = value)")}
model reward = {reward}
dataset prompts = jsonl("train.jsonl", field = "question", max_len = 24, tokenizer = "ckpt")
dataflow f(actor, rm, reward, prompts) {{
    gen   = actor.generate(prompts)  -> seq, logp
    judge = rm.inference(seq)        -> rm_score
    {score_call}
    a_tr  = actor.train(seq, logp, logp, score)  using grpo_actor
}}
run f(actor, rm, reward, prompts) {{ batch = 4  group_size = 2  max_new_tokens = 4 }}
""")
    return path


def test_a_reward_model_score_is_a_weighted_key(task):
    flow, diags = check_program(mixed(task, 'python("rewards.py", exact_match = 1.0, rm_score = 0.5)'))
    assert flow is not None, diags
    reward = flow.model("reward")
    assert [f for _, f, _ in reward.functions] == ["exact_match"] and reward.score_keys == (("rm_score", 0.5),)
    assert flow.call("score").inputs == ("seq", "rm_score")


def test_a_weighted_name_neither_defined_nor_passed(task):
    (code, message, hint), unweighted = errors(mixed(task, 'python("rewards.py", exact_match = 1.0, rm_scor = 0.5)'))
    assert code == "E029" and "no function `rm_scor`" in message and "call `score` does not pass" in message
    assert "rm_score" in hint and unweighted[0] == "E022"  # the key the call passes has no weight
    (code, message, hint), = errors(mixed(task, 'python("rewards.py", exact_match = 1.0, other = 0.5, rm_score = 1.0)'))
    assert code == "E029" and "`other`" in message and "inference(seq, other)" in hint
    (code, message, hint), = errors(mixed(task, 'python("rewards.py", exact_mach = 1.0, rm_score = 0.5)'))
    assert code == "E029" and "exact_mach" in message and "exact_match" in hint


def test_a_passed_key_needs_a_weight(task):
    (code, message, hint), = errors(mixed(task, 'python("rewards.py:exact_match")'))
    assert code == "E022" and "no weight to key `rm_score`" in message and "rm_score = 1.0" in hint
    found = errors(mixed(task, 'python("rewards.py", exact_match = 1.0)',
                         "score = reward.inference(seq, exact_match) -> score"))
    assert [c for c, m, _ in found if "name of a function" in m] == ["E022"]  # and E004: nothing produces it


def test_only_python_rewards_take_scores(task):
    (code, message, _), = errors(mixed(task, 'rule("pattern_reward")'))
    assert code == "E010" and "rule `pattern_reward` takes 1" in message
    found = errors(mixed(task, 'python("rewards.py", rm_score = 1.0)', "score = rm.inference(seq, rm_score) -> score"))
    assert [c for c, m, _ in found if "values takes 1" in m] == ["E010"], found
    (code, message, _), = errors(mixed(task, 'python("rewards.py", prompts = 1.0)',
                                       "score = reward.inference(seq, prompts) -> score"))
    assert code == "E023" and "`prompts` is a parameter" in message
