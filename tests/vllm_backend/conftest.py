"""Fixtures of the vllm backend's tests. These run in the venv of scripts/setup-vllm.sh (vLLM's CPU build pins other
versions than our lock), driven by tests/integration/test_vllm_backend_env.py; the main suite does not collect them
(tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moe_platform.checkpoint.hf import export_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from tinyrun import tiny_tokenizer

MAX_SEQ_LEN = 256


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return tiny_tokenizer(tmp_path_factory.mktemp("vllm_tok"), 512, MAX_SEQ_LEN, 200_000)


def tiny_export(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A tiny Mixtral-style export with head_dim 64 (vLLM's CPU attention takes 64 and more, not 16)."""
    from moe_platform.tokenizer import load_tokenizer

    args = ModelArgs(vocab_size=load_tokenizer(tokenizer_dir).get_vocab_size(), dim=128, n_layers=2, n_heads=2,
                     n_kv_heads=1, intermediate_size=128, num_experts=4, top_k=2, max_seq_len=MAX_SEQ_LEN,
                     init_std=0.1)
    return export_hf(build_model(args, seed=seed).state_dict(), args, out, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def export_a(tokenizer_dir, tmp_path_factory) -> Path:
    return tiny_export(tokenizer_dir, tmp_path_factory.mktemp("vllm_export_a"), seed=0)


@pytest.fixture(scope="session")
def export_b(tokenizer_dir, tmp_path_factory) -> Path:
    return tiny_export(tokenizer_dir, tmp_path_factory.mktemp("vllm_export_b"), seed=1)


@pytest.fixture(scope="session")
def export_corrupt(export_a, tmp_path_factory) -> Path:
    """export_a with its output head scaled 30x: fluent-looking garbage, a far higher loss."""
    import shutil

    out = tmp_path_factory.mktemp("vllm_export_corrupt")
    shutil.copytree(export_a, out, dirs_exist_ok=True)
    weights = load_file(str(out / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 30
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
