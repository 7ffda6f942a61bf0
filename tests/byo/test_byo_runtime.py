"""Bring your own task, in the runtime: reward functions with columns and located errors,
lazy row sources, chat-templated prompts, value heads in checkpoints, samples and wandb."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhfc_runtime import rewards
from rlhfc_runtime.checkpoint import CheckpointError, load_checkpoint, tiny_config, weight_index
from rlhfc_runtime.contract.layout import Layout
from rlhfc_runtime.data.loaders import JsonlLoader
from rlhfc_runtime.data.sources import DataError, JsonlRows, open_rows
from rlhfc_runtime.data.tokenizer import load_tokenizer
from rlhfc_runtime.metrics_log import MetricsLog

ROOT = Path(__file__).resolve().parents[2]
ONE = Layout((0,), 1, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def world():
    """A one-process gloo world: sharded models need their process groups."""
    import socket

    import torch.distributed as dist

    from rlhfc_runtime.dist import ensure_groups

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ensure_groups([ONE])
    yield


@pytest.fixture(scope="module")
def math_task(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("math")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_math_task.py"), "--out", str(out), "--rows", "40"],
                   check=True, capture_output=True)
    return out


def write(tmp: Path, text: str) -> str:
    path = tmp / "r.py"
    path.write_text(text)
    return str(path)


def test_python_rewards_see_aligned_columns_and_combine(tmp_path):
    path = write(tmp_path, "def m(prompts, completions, answer, **cols):\n"
                           "    return [float(c == a) for c, a in zip(completions, answer)]\n"
                           "def n(prompts, completions, **cols):\n"
                           "    return [len(cols['tags'][i]) for i in range(len(completions))]\n")
    total, parts = rewards.python_scores([(path, "m", 1.0), (path, "n", 0.5)], ["p", "p", "q"], ["1", "2", "3"],
                                         {"answer": ["1", "1", "3"], "tags": [["x"], ["x"], ["y", "z"]]})
    assert parts == {"m": [1.0, 0.0, 1.0], "n": [1.0, 1.0, 2.0]}
    assert total == [1.5, 0.5, 2.0]


def test_reward_exception_names_the_functions_line(tmp_path):
    path = write(tmp_path, "def f(prompts, completions, **cols):\n    x = 1\n    return [1 / 0 for _ in completions]\n")
    with pytest.raises(rewards.RewardError, match=r"r\.py:3: reward `f` raised ZeroDivisionError"):
        rewards.call_function(path, "f", ["p"], ["c"], {})


def test_reward_of_the_wrong_length(tmp_path):
    path = write(tmp_path, "def g(prompts, completions, **cols):\n    return [1.0]\n")
    with pytest.raises(rewards.RewardError, match="1 scores for 2 completions"):
        rewards.call_function(path, "g", ["p", "p"], ["a", "b"], {})


def test_jsonl_rows_are_read_by_offset_and_bad_rows_are_located(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a", "n": 1}\n\n{"q": "b", "n": [2, 3]}\n')
    rows = open_rows(path, "jsonl", ["q"])
    assert len(rows) == 2 and rows[1] == {"q": "b", "n": [2, 3]} and rows.where(1).endswith("d.jsonl:3")
    assert isinstance(rows, JsonlRows) and not hasattr(rows, "rows")  # offsets only, no rows kept
    path.write_text('{"q": "a"}\n{"q": 5}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing string field\(s\) q \(the row has: q"):
        open_rows(path, "jsonl", ["q"])
    path.write_text('{"q": "a"}\n{"q": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2:\d+: invalid JSON"):
        open_rows(path, "jsonl", ["q"])
    with pytest.raises(DataError, match="not found"):
        open_rows(tmp_path / "none.jsonl", "jsonl", ["q"])


def test_bad_tokenizers_and_data_paths_are_located_without_hanging(tmp_path):
    (tmp_path / "text.json").write_text("{\n  not json\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"version": "1.0"}')
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "config.json").write_text("{}")  # sentencepiece or tiktoken, transformers said
    for name, said in (("text.json", "text.json:2:3: the tokenizer is not JSON"),
                       ("dir", "dir:1: the tokenizer directory has neither tokenizer.json nor tokenizer_config.json "
                               "(it holds config.json)"),
                       ("list.json", "list.json:1:1: the tokenizer must be a JSON object, not list"),
                       ("other.json", "other.json:1: cannot load the tokenizer"),
                       ("pipe.json", "pipe.json:1: the tokenizer is not a regular file")):
        with pytest.raises(DataError, match=re.escape(said)):
            load_tokenizer(tmp_path / name)
    for fmt in ("jsonl", "parquet"):
        with pytest.raises(DataError, match=re.escape("pipe.json:1: the dataset file is not a regular file")):
            open_rows(tmp_path / "pipe.json", fmt, ["prompt"])
        with pytest.raises(DataError, match="the dataset file is a directory"):
            open_rows(tmp_path, fmt, ["prompt"])


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_parquet_and_datasets_sources(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"x{i}", "answer": str(i), "tags": [i, i + 1]} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    source = open_rows(tmp_path / "d.parquet", fmt, ["q"])
    assert len(source) == 30 and [source[i] for i in (0, 13, 29)] == [rows[0], rows[13], rows[29]]
    with pytest.raises(DataError, match=r"no field\(s\) prompt \(the rows have: q, answer, tags\)"):
        open_rows(tmp_path / "d.parquet", fmt, ["prompt"])


def test_loader_applies_the_chat_template_and_keeps_columns(math_task):
    tok = load_tokenizer(math_task / "ckpt")
    loader = JsonlLoader(math_task / "train.jsonl", tok, {"prompt": "question"}, max_len=64, seed=0, chat=True,
                         system="Be brief.")
    batch = loader.next_batch(2)
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist())
    question, columns = loader.row_fields(loader.last[0])
    assert text == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                    f"<|im_start|>assistant\n")
    assert set(columns) == {"answer", "a", "b"} and columns["answer"] == str(columns["a"] + columns["b"])


def test_decoded_samples_carry_reward_components_and_columns(math_task, tmp_path):
    tok = load_tokenizer(math_task / "ckpt")
    loader = JsonlLoader(math_task / "train.jsonl", tok, {"prompt": "question"}, max_len=64, chat=True)
    batch = loader.next_batch(2)
    answers = [loader.row_fields(i)[1]["answer"] for i in loader.last]
    response = torch.tensor([tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers])
    seq = {"input_ids": torch.cat([batch["input_ids"], response], 1),
           "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(response)], 1),
           "response_mask": torch.cat([torch.zeros_like(batch["input_ids"]), torch.ones_like(response)], 1)}
    from rlhfc_runtime.contract.program import ModelSpec

    spec = ModelSpec("rule", functions=((str(ROOT / "programs" / "rewards.py"), "exact_match", 1.0),))
    scores, means, samples = rewards.score_rows(spec, seq, loader, loader.last, rule_scores=None, keyed={})
    assert scores == [1.0, 1.0] and means == {"reward/exact_match": 1.0}
    assert samples[0]["completion"] == answers[0] and samples[0]["prompt"].startswith("<|im_start|>user\n")
    assert samples[0]["answer"] == answers[0] and samples[0]["reward/exact_match"] == 1.0
    assert [s["row"] for s in samples] == [0, 1]
    assert samples[1]["completion_ids"] == response[1].tolist()  # the answer's tokens and the EOS
    assert samples[1]["prompt_ids"] == batch["input_ids"][1][batch["attention_mask"][1] == 1].tolist()
    mixed = replace(spec, score_keys=(("rm_score", 0.5),))  # a reward model's scores for the two rows
    scores, means, samples = rewards.score_rows(mixed, seq, loader, loader.last, None, {"rm_score": [0.25, -0.5]})
    assert scores == [1.125, 0.75] and means == {"reward/exact_match": 1.0, "reward/rm_score": -0.125}
    assert samples[1]["reward/rm_score"] == -0.5 and samples[1]["reward"] == 0.75


def test_sample_rows_are_chosen_by_global_row_and_get_their_generated_logprobs():
    assert rewards.sample_rows(32) == [0, 8, 16, 24] and rewards.sample_rows(3) == [0, 1, 2]
    # a replica holding global rows 4..7 of 8; prompt of 2 tokens (one left pad), 3 generated, EOS at the 2nd
    seq = {"input_ids": torch.tensor([[0, 5, 6, 7, 2, 0]] * 4),
           "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 0]] * 4),
           "response_mask": torch.tensor([[0, 0, 0, 1, 1, 0]] * 4)}
    logp = torch.tensor([[0.0, 0.0, 0.0, -0.5, -0.25, 0.0]] * 4)
    made = rewards.shown_logprobs(seq, logp, first=4, total=8)
    assert made == [{"row": 4, "logprobs": [-0.5, -0.25]}, {"row": 6, "logprobs": [-0.5, -0.25]}]
    samples = [{"step": 3, "call": "score", "seq_key": "seq", "row": 6},
               {"step": 3, "call": "score", "seq_key": "seq", "row": 0},
               {"step": 3, "call": "base", "seq_key": "base_seq", "row": 4},
               {"step": 4, "call": "score", "seq_key": "seq", "row": 4}]  # the next step's rollout, made ahead
    generated = [{"step": 3, "key": "seq", "policy_version": 2, **m} for m in made]
    merged = rewards.with_logprobs(samples, generated)
    assert merged == [
        {"step": 3, "call": "score", "row": 0, "logprobs": None, "policy_version": None},  # another replica's row
        {"step": 4, "call": "score", "row": 4, "logprobs": None, "policy_version": None},  # not this step's rollout
        {"step": 3, "call": "score", "row": 6, "logprobs": [-0.5, -0.25], "policy_version": 2},
        {"step": 3, "call": "base", "row": 4, "logprobs": None, "policy_version": None}]  # no generate call made base_seq


def _value_checkpoint(tmp_path: Path, rename: dict[str, str] | None, bias: bool = True) -> Path:
    from rlhfc_runtime.checkpoint import write_random_checkpoint
    from safetensors.torch import load_file, save_file

    path = write_random_checkpoint(tmp_path / "ck", tiny_config(token_classification_bias=bias), head="value")
    tensors = load_file(path / "model.safetensors")
    if rename is not None:
        tensors = {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v
                   for k, v in tensors.items()}
        save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("rename,bias", [(None, True), ({"score.": "value_head."}, False),
                                         ({"score.": "v_head.summary."}, True)])
def test_value_heads_of_other_trainers_load(tmp_path, rename, bias):
    path = _value_checkpoint(tmp_path, rename, bias)
    model = load_checkpoint(path, ONE, "value")
    assert torch.allclose(model.shards()["score.weight"], load_checkpoint(path, ONE, "value")
                          .shards()["score.weight"])
    assert ("score.bias" in model.shards()) == bias
    assert any(n.startswith("score.") for n in weight_index(path))


def test_value_head_checkpoint_as_lm_and_unused_or_missing_tensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = _value_checkpoint(tmp_path, None)
    with pytest.raises(CheckpointError, match=r"value head \(`score\.(weight|bias)`\).*head = value"):
        load_checkpoint(path, ONE, "lm")
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not use: extra.weight"):
        load_checkpoint(path, ONE, "value")
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing from the checkpoint: model.norm.weight"):
        load_checkpoint(path, ONE, "value")


def test_value_head_on_a_causal_lm_is_created_and_logged(tmp_path, capsys):
    from rlhfc_runtime.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "lm", tiny_config())
    model = load_checkpoint(path, ONE, "value")
    assert "score.weight" in model.shards()
    assert "value head is new" in capsys.readouterr().err


def test_metrics_and_samples_go_to_wandb(tmp_path, monkeypatch):
    logged, inits = [], []
    fake = types.SimpleNamespace(
        init=lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda d, step: logged.append((step, d))),
        Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    log = MetricsLog(tmp_path, 0, "proj")
    log.write({"step": 1, "reward": 0.5}, [{"step": 1, "prompt": "p", "completion": "c", "reward": 0.5}])
    assert inits[0]["project"] == "proj" and inits[0]["mode"] == "offline"
    step, data = logged[0]
    assert step == 1 and data["reward"] == 0.5 and data["samples"][0] == "table"
    assert json.loads((tmp_path / "samples.jsonl").read_text())["completion"] == "c"
