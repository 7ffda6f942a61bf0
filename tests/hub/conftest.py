"""The hub tests' fixtures: HF_HOME holding `tiny-org/tiny-llama` (hub_fixtures.py), and
an offline environment that reads only it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_fixtures import REPO, add_to_cache, tiny_llama


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME holding `tiny-org/tiny-llama` at revision main (= COMMIT)."""
    home = tmp_path_factory.mktemp("hf_home")
    add_to_cache(home / "hub", REPO, tiny_llama(tmp_path_factory.mktemp("tiny_llama")))
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    """This process and its children read only that cache."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home
