"""Fixtures for the serving integration tests: tiny exports (tokenizer + model) and free loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest

import tinyrun
from moe_platform.checkpoint.hf import export_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.tokenizer import load_tokenizer

SERVING_MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def serving_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for the module's Serve app."""
    return tinyrun.free_port()


@pytest.fixture(scope="session")
def serving_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 512) trained on a slice of tinyshakespeare."""
    return tinyrun.tiny_tokenizer(tmp_path_factory.mktemp("serving_tok"), 512, SERVING_MAX_SEQ_LEN, 200_000)


def _tiny_export(tokenizer_dir: Path, out_dir: Path, seed: int) -> Path:
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    args = ModelArgs(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                     num_experts=8, top_k=2, max_seq_len=SERVING_MAX_SEQ_LEN, init_std=0.1)
    model = build_model(args, seed=seed)
    return export_hf(model.state_dict(), args, out_dir, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def make_tiny_export():
    """`make(tokenizer_dir, out_dir, seed)`: a tiny export like `serving_export` on any tokenizer."""
    return _tiny_export


@pytest.fixture(scope="session")
def serving_export(serving_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny Mixtral-compatible export (dim 64, 2 layers, 8 experts top-2, context 256) with random weights."""
    return _tiny_export(serving_tokenizer_dir, tmp_path_factory.mktemp("serving_export_a"), seed=0)


@pytest.fixture(scope="session")
def serving_export_b(serving_tokenizer_dir, tmp_path_factory) -> Path:
    """Same architecture and tokenizer as `serving_export`, different weights."""
    return _tiny_export(serving_tokenizer_dir, tmp_path_factory.mktemp("serving_export_b"), seed=1)
