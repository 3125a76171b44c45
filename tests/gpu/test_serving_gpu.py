"""The serving engine on CUDA (engine.device) against the CPU fp32 engine on the same export: fp32 greedy tokens and
log-probabilities of a continuously batched set of requests, the paged cache with prefix hits and preemption, int8
and fp8 KV caches, and the bf16/fp16 models' loss on held-out text. Skipped without CUDA."""

from __future__ import annotations

import pytest

from moe_platform.checkpoint.hf import export_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.engine import Engine
from moe_platform.tokenizer import save_tokenizer, train_tokenizer
from tinyrun import corpus_text, engine_outputs

pytestmark = pytest.mark.gpu
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo! wherefore art thou", "First Citizen:\nBefore we proceed", "a"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    text = corpus_text(200_000)
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 512)
    tok_dir = save_tokenizer(tok, tmp_path_factory.mktemp("tok"), model_max_length=256)
    args = ModelArgs(vocab_size=tok.get_vocab_size(), dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                     intermediate_size=256, num_experts=8, top_k=2, max_seq_len=256, init_std=0.1)
    return export_hf(build_model(args, seed=0).state_dict(), args, tmp_path_factory.mktemp("export"),
                     tokenizer_dir=tok_dir)


def run(engine: Engine) -> list[tuple[list[int], list[float]]]:
    return engine_outputs(engine, PROMPTS)


def test_fp32_on_cuda_generates_what_the_cpu_does(export_dir):
    cpu = run(Engine.from_pretrained(export_dir, device="cpu", max_batch_size=4, batch_wait_timeout_s=0.0))
    engine = Engine.from_pretrained(export_dir, device="cuda", max_batch_size=4, batch_wait_timeout_s=0.0,
                                    kv_cache_memory_bytes=32 << 20)  # not 90% of the GPU: other engines follow
    assert engine.device.type == "cuda" and engine.cache.k.device.type == "cuda"
    cuda = run(engine)
    for (want_ids, want_lp), (ids, lp) in zip(cpu, cuda, strict=True):
        assert ids == want_ids
        assert max(abs(a - b) for a, b in zip(lp, want_lp, strict=True)) < 1e-3


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.03), ("float16", 0.01)])
def test_half_precision_on_cuda_keeps_the_loss(export_dir, dtype, tol):
    texts = [corpus_text(300_000)[200_000 + i * 500:200_000 + i * 500 + 400] for i in range(8)]
    want = Engine.from_pretrained(export_dir, device="cpu").score(texts)
    got = Engine.from_pretrained(export_dir, device="cuda", dtype=dtype, kv_cache_memory_bytes=32 << 20).score(texts)
    assert abs(got - want) / want < tol, (got, want)


def test_paged_cache_on_cuda_with_prefix_hits_and_preemption_matches_the_cpu(export_dir):
    """The paged cache on CUDA (small blocks and a budget small enough to preempt), the prompts run twice so the
    second pass hits the prefix cache: the same tokens as the CPU fp32 engine."""
    from moe_platform.serving.cache import PagedKVCache

    probe = Engine.from_pretrained(export_dir, device="cpu")
    budget = 18 * 4 * PagedKVCache.bytes_per_token(probe.args, probe.runner.dtype)  # 18 blocks of 4 tokens
    options = {"max_batch_size": 4, "batch_wait_timeout_s": 0.0, "block_size": 4, "max_seq_len": 64,
               "kv_cache_memory_bytes": budget}
    cpu = run(Engine.from_pretrained(export_dir, device="cpu", **options))
    engine = Engine.from_pretrained(export_dir, device="cuda", **options)
    first, second = run(engine), run(engine)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["num_preemptions"] > 0
    for (want_ids, want_lp), a, b in zip(cpu, first, second, strict=True):
        assert a[0] == b[0] == want_ids
        assert max(abs(x - y) for x, y in zip(a[1] + b[1], want_lp + want_lp, strict=True)) < 1e-3


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_kv_cache_on_cuda_stays_close_to_the_cpu(export_dir, kv_dtype):
    """Each greedy token's log-probability within 0.05 of the CPU fp32 engine's while their tokens agree."""
    cpu = run(Engine.from_pretrained(export_dir, device="cpu", batch_wait_timeout_s=0.0))
    cuda = run(Engine.from_pretrained(export_dir, device="cuda", batch_wait_timeout_s=0.0, kv_cache_dtype=kv_dtype,
                                      kv_cache_memory_bytes=32 << 20))
    agreed = 0
    for (want_ids, want_lp), (ids, lp) in zip(cpu, cuda, strict=True):
        for a, b, x, y in zip(want_ids, ids, want_lp, lp, strict=True):
            if a != b:
                break
            assert abs(x - y) < 0.05
            agreed += 1
    assert agreed >= len(PROMPTS) * 4
