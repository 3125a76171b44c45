"""Shared fixtures: a small corpus and a tiny training config that runs in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_platform.config import load_config
from tinyrun import corpus_text, tiny_overrides


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    out.write_text(corpus_text())
    return out


@pytest.fixture
def tiny_config(corpus_file, tmp_path):
    def make(**extra):
        return load_config(None, tiny_overrides(corpus_file, tmp_path, **extra))

    return make
