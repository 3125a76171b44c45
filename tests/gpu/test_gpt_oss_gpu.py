"""gpt-oss on CUDA against the CPU fp32 engine: the windowed paged KV cache (sliding layers keeping only their
window's blocks) with attention sinks, in fp32 (tokens and log-probabilities) and bf16 (held-out loss). Skipped
without CUDA; scripts/gpu-check.sh runs it."""

from __future__ import annotations

import pytest

from moe_platform.serving.engine import Engine
from tinyrun import corpus_text, engine_outputs, save_tiny_hf_model, tiny_tokenizer

pytestmark = pytest.mark.gpu
PROMPTS = [list(range(20, 60)), [3] * 11, list(range(100, 127))]  # longer than the window of 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return save_tiny_hf_model("GptOssForCausalLM", tmp_path_factory.mktemp("oss"), tok)[1]


def test_windowed_cache_on_cuda_generates_what_the_cpu_does(model_dir):
    cpu = engine_outputs(Engine.from_pretrained(model_dir, device="cpu", batch_wait_timeout_s=0.0, block_size=4),
                         PROMPTS, max_tokens=24)
    engine = Engine.from_pretrained(model_dir, device="cuda", batch_wait_timeout_s=0.0, block_size=4,
                                    kv_cache_memory_bytes=16 << 20)
    assert engine.cache.window == 8 and engine.cache.k.device.type == "cuda"
    for (want_ids, want_lp), (ids, lp) in zip(cpu, engine_outputs(engine, PROMPTS, max_tokens=24), strict=True):
        assert ids == want_ids
        assert max(abs(a - b) for a, b in zip(lp, want_lp, strict=True)) < 1e-3


def test_bf16_on_cuda_keeps_the_loss(model_dir):
    texts = [corpus_text(300_000)[200_000 + i * 500:200_000 + i * 500 + 300] for i in range(6)]
    want = Engine.from_pretrained(model_dir, device="cpu").score(texts)
    got = Engine.from_pretrained(model_dir, device="cuda", dtype="bfloat16", kv_cache_memory_bytes=16 << 20)
    assert abs(got.score(texts) - want) / want < 0.03
