"""Registry ↔ catalog consistency, rule rewards on hand-made sequences, data loading,
tokenizer round trip, and a short PPO run on the tiny task."""

import importlib.util
import json
from pathlib import Path

import torch

from rlhfc_runtime.contract.interfaces import INTERFACES, RULES
from rlhfc_runtime.algorithms.batch import build_sequences
from rlhfc_runtime.algorithms.registry import REGISTRY, bind, rule_scores
from rlhfc_runtime.algorithms.rules import RULE_FUNCTIONS, length_reward, pattern_reward
from rlhfc_runtime.data import tiny
from rlhfc_runtime.data.loaders import JsonlLoader
from rlhfc_runtime.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "tiny"


def test_registry_matches_catalog():
    assert set(REGISTRY) == set(INTERFACES)
    for name, spec in INTERFACES.items():
        runtime = REGISTRY[name]
        assert runtime.kind == spec.kind, name
        assert len(runtime.inputs) == len(spec.inputs) and runtime.inputs == spec.inputs, name
        assert len(runtime.outputs) == len(spec.outputs), name
        assert spec.head is None or runtime.head == spec.head, name
    assert set(RULE_FUNCTIONS) == set(RULES)


def test_bind_checks_arity():
    try:
        bind("dpo", [{}])
    except TypeError as e:
        assert "dpo takes 2 inputs" in str(e)
    else:
        raise AssertionError("wrong arity accepted")


def _ids(text):
    return [tiny.TOKEN_ID[c] for c in text]


def test_pattern_and_length_rules_by_hand():
    prompt = [tiny.BOS_ID] + _ids("ab7")
    assert pattern_reward(prompt, _ids("8901"), 4) == 1.0
    assert pattern_reward(prompt, _ids("8x01"), 4) == 0.5  # x breaks 8→9 and x→0; 0→1 counts
    assert pattern_reward(prompt, _ids("89"), 4) == 0.5
    assert pattern_reward([tiny.BOS_ID] + _ids("a"), _ids("bc"), 2) == 0.0
    assert length_reward(prompt, _ids("89"), 8) == 0.25


def test_rule_scores_strip_padding_and_eos():
    prompt_ids = torch.tensor([[tiny.PAD_ID, tiny.BOS_ID, tiny.TOKEN_ID["3"]],
                               [tiny.BOS_ID, tiny.TOKEN_ID["q"], tiny.TOKEN_ID["9"]]])
    prompt_mask = (prompt_ids != tiny.PAD_ID).long()
    response = torch.tensor([_ids("45") + [tiny.EOS_ID, tiny.TOKEN_ID["6"]], _ids("0123")])
    seq = build_sequences(prompt_ids, prompt_mask, response, tiny.EOS_ID, tiny.PAD_ID)
    assert seq["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert rule_scores("pattern_reward", seq, 4, tiny.EOS_ID).tolist() == [0.5, 1.0]
    assert rule_scores("length_reward", seq, 4, tiny.EOS_ID).tolist() == [0.5, 1.0]


def test_tokenizer_round_trip_and_vocab():
    for source in (TINY / "tokenizer.json", TINY):
        tok = load_tokenizer(source)
        ids = tok("ab3k7")["input_ids"]
        assert ids == [tiny.BOS_ID] + _ids("ab3k7")
        assert tok.decode(ids, skip_special_tokens=True) == "ab3k7"
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (tiny.PAD_ID, tiny.BOS_ID, tiny.EOS_ID)
        assert len(tok) == len(tiny.VOCAB) <= tiny.MODEL_VOCAB == 40


def test_tiny_task_files_regenerate_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_task", ROOT / "scripts" / "make_tiny_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(tmp_path, seed=0)
    for name in ("prompts.jsonl", "pairs.jsonl", "sft.jsonl", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name
    for line in (TINY / "pairs.jsonl").read_text().splitlines()[:50]:
        row = json.loads(line)
        prompt = [tiny.BOS_ID] + _ids(row["prompt"])
        assert pattern_reward(prompt, _ids(row["chosen"]), tiny.ANSWER_LEN) == 1.0
        assert pattern_reward(prompt, _ids(row["rejected"]), tiny.ANSWER_LEN) < 1.0


def _loader(kind, fields, seed=3):
    return JsonlLoader(TINY / f"{kind}.jsonl", load_tokenizer(TINY), fields, max_len=16, seed=seed)


def test_loader_is_deterministic_and_resumes():
    fields = {"prompt": "prompt"}
    a, b = _loader("prompts", fields), _loader("prompts", fields)
    for _ in range(3):
        assert torch.equal(a.next_batch(700)["input_ids"], b.next_batch(700)["input_ids"])  # crosses an epoch
    state = a.state_dict()
    expected = [a.next_batch(64) for _ in range(3)]
    resumed = _loader("prompts", fields)
    resumed.load_state_dict(state)
    for batch in expected:
        got = resumed.next_batch(64)
        assert all(torch.equal(got[k], batch[k]) for k in batch)
    other = _loader("prompts", fields, seed=4).next_batch(64)["input_ids"]
    assert not torch.equal(other, _loader("prompts", fields).next_batch(64)["input_ids"])


def test_prompts_left_padded_and_pairs_shaped():
    batch = _loader("prompts", {"prompt": "prompt"}).next_batch(16)
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends in the last column
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tiny.PAD_ID).all()
    pairs = _loader("pairs", {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}).next_batch(5)
    assert pairs["input_ids"].shape[:2] == (5, 2)
    sft = _loader("sft", {"prompt": "prompt", "response": "response"}).next_batch(5)
    responses = [[t for t, m in zip(r, g) if m] for r, g in zip(sft["input_ids"].tolist(), sft["response_mask"].tolist())]
    assert all(len(r) == tiny.ANSWER_LEN + 1 and r[-1] == tiny.EOS_ID for r in responses)


def test_short_ppo_run_raises_tiny_task_reward():
    spec = importlib.util.spec_from_file_location("tiny_task_ppo", ROOT / "bench" / "tiny_task_ppo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rewards = module.run(steps=60, batch_size=32, max_new_tokens=12, seed=0, lr=3e-3, log=lambda _: None)
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first < 0.05 and last > 4 * first and last > 0.1, (first, last)


def test_sampler_draws_each_row_once_per_epoch_as_plain_ints():
    from rlhfc_runtime.data.loaders import Sampler

    sampler = Sampler(10, seed=3)
    epoch = sampler.take(7) + sampler.take(3)
    assert sorted(epoch) == list(range(10)) and all(type(i) is int for i in epoch)
    assert sorted(sampler.take(10)) == list(range(10)) and sampler.epoch == 2
    assert Sampler(5, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]
