"""`rlhfc_runtime.contract.hub`: which strings are hub ids, and resolving them from an
offline cache laid out as huggingface_hub lays it out (hub_fixtures.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hub_fixtures import COMMIT, REPO, add_to_cache

from rlhfc_runtime.contract import hub
from rlhfc_runtime.contract.hub import HubError, HubId


@pytest.mark.parametrize("text, expected", [
    ("Qwen/Qwen3-8B", HubId("Qwen/Qwen3-8B")),
    ("Qwen/Qwen3-8B@main", HubId("Qwen/Qwen3-8B", "main")),
    ("hf://meta-llama/Llama-3.1-8B@v1.0", HubId("meta-llama/Llama-3.1-8B", "v1.0")),
    ("org_1/model.v2@refs/pr/3", HubId("org_1/model.v2", "refs/pr/3")),
    (f"a/b@{COMMIT}", HubId("a/b", COMMIT)),
])
def test_hub_ids_parse_and_print_back(text, expected):
    assert hub.parse(text) == expected
    assert hub.parse(str(expected)) == expected and str(expected).startswith("hf://")
    assert expected.label == text.removeprefix("hf://")


@pytest.mark.parametrize("text", ["gpt2", "a/b/c", "../ckpt", "./ckpt", "/abs/path", "a/b@", "a/b@x y", "a--b/c",
                                  "a/b..c", "-a/b", "a./b", "a/b c", "", "hf://", "a" * 97 + "/b", "ckpt\\actor"])
def test_other_strings_are_not_hub_ids(text):
    assert hub.parse(text) is None


def test_a_local_path_wins_over_a_hub_id_unless_hf_prefixed(tmp_path):
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert hub.hub_id("org/model", tmp_path) is None
    assert hub.hub_id("org/other", tmp_path) == HubId("org/other")
    assert hub.hub_id("hf://org/model", tmp_path) == HubId("org/model")
    assert hub.hub_id("a" * 5000 + "/b", tmp_path) is None  # an unusable name is neither


def test_the_cache_comes_from_the_environment_at_each_call(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.settings() == (tmp_path / "home" / "hub", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    assert hub.settings() == (tmp_path / "elsewhere", False)


def test_config_checkpoint_and_tokenizer_resolve_offline_at_a_branch_or_commit(offline):
    snapshot = offline / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    for ref in (REPO, f"{REPO}@main", f"hf://{REPO}@{COMMIT}"):
        assert hub.resolve(ref) == snapshot
    assert json.loads((hub.resolve(REPO) / "config.json").read_text())["num_hidden_layers"] == 2
    assert (hub.resolve_checkpoint(REPO) / "model.safetensors").is_file()
    assert (hub.resolve_tokenizer(REPO) / "tokenizer.json").is_file()
    from rlhfc_runtime.contract.program import DatasetSpec, ModelSpec, Program, RunSpec

    def dataset(tokenizer):
        return DatasetSpec(format="jsonl", path="d.jsonl", fields={"field": "prompt"}, tokenizer=tokenizer, max_len=8)

    program = Program(source=None, world_size=1, device="cpu", devices_per_node=1, run=RunSpec("sft", 1, 1),
                      models={"a": ModelSpec("llama", checkpoint=f"hf://{REPO}"),
                              "b": ModelSpec("llama", checkpoint="/local/dir"), "r": ModelSpec("rule", rule="r")},
                      datasets={"d": dataset(f"hf://{REPO}"), "e": dataset(None)})
    assert hub.run_files(program) == {f"hf://{REPO}": "checkpoint"}
    assert hub.fetch(program) == {f"hf://{REPO}": snapshot}


def test_what_the_cache_lacks_is_an_error_naming_the_cache_and_the_switches(offline):
    for ref, says in ((f"{REPO}@v9", "is not in the Hugging Face cache"),
                      ("tiny-org/unknown", "is not in the Hugging Face cache")):
        with pytest.raises(HubError) as error:
            hub.resolve(ref)
        assert says in str(error.value) and ref in str(error.value)
        assert str(offline / "hub") in error.value.hint
        assert "HF_HOME" in error.value.hint and "HF_HUB_OFFLINE" in error.value.hint


def test_a_checkpoint_needs_every_weight_file_its_index_names(offline, tmp_path):
    files = tmp_path / "files"
    shutil.copytree(hub.resolve_checkpoint(REPO), files, symlinks=False)
    (files / "model.safetensors").unlink()
    with pytest.raises(HubError, match="has no `model.safetensors` in the cache"):
        add_to_cache(offline / "hub", "tiny-org/config-only", files)
        hub.resolve_checkpoint("tiny-org/config-only")
    (files / "model-00001-of-00002.safetensors").write_bytes(b"")
    (files / hub.INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                              "b": "model-00002-of-00002.safetensors"}}))
    add_to_cache(offline / "hub", "tiny-org/sharded", files)
    with pytest.raises(HubError, match="has no `model-00002-of-00002.safetensors`"):
        hub.resolve_checkpoint("tiny-org/sharded")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (files / name).unlink()
    add_to_cache(offline / "hub", "tiny-org/no-tokenizer", files)
    with pytest.raises(HubError, match="has no tokenizer"):
        hub.resolve_tokenizer("tiny-org/no-tokenizer")
    assert Path(hub.resolve("tiny-org/no-tokenizer"), "config.json").is_file()
