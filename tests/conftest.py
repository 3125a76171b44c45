"""Shared fixtures: a small corpus and a tiny training config that runs in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_platform.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A slice of tinyshakespeare (or, without ../shared, of a stdlib module) as the training corpus."""
    out = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    if SHAKESPEARE.exists():
        text = SHAKESPEARE.read_text()[:120_000]
    else:
        import argparse

        text = Path(argparse.__file__).read_text()[:120_000]
    out.write_text(text)
    return out


def tiny_overrides(corpus: Path, storage: Path, **extra) -> list[str]:
    base = {
        "run.name": "t", "run.storage_path": str(storage),
        "model.dim": 32, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
        "model.intermediate_size": 48, "model.num_experts": 4, "model.top_k": 2, "model.max_seq_len": 64,
        "data.path": str(corpus), "data.vocab_size": 320, "data.cache_dir": str(storage / "cache"),
        "train.steps": 12, "train.global_batch_size": 4, "train.micro_batch_size": 2, "train.seq_len": 32,
        "train.warmup": 2, "train.lr": 3e-3, "checkpoint.interval": 6, "checkpoint.keep": 2,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_config(corpus_file, tmp_path):
    def make(**extra):
        return load_config(None, tiny_overrides(corpus_file, tmp_path, **extra))

    return make
