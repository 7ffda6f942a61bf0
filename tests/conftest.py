"""Shared pytest options: `--update-golden` rewrites golden files instead of comparing.

Nothing a test does may download: every test process, and each process it starts, reads
the Hugging Face cache only (a hub id a test does not put into a cache is an error, and
a generated program that names one fails fast instead of reaching the network)."""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# The suite runs two pytest workers on two cores: a run that took every core for itself
# would spin against the other worker (measured 4-6x slower steps), so runs get one thread.
os.environ.setdefault("RLHFC_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/** files from the current output")


@pytest.fixture
def update_golden(request) -> bool:
    """True when golden files should be (re)written rather than compared."""
    return request.config.getoption("--update-golden")
