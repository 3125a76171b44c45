"""gpt-oss on the paged KV cache with windowed memory: its full-attention layers keep every position's blocks, its
sliding-window layers only their window's (the blocks that slide out go back to the pool for any sequence), the
sinks join every softmax, and the output is transformers' greedy tokens on prompts longer than the window, through
chunked prefill, continuous batching, preemption and prefix caching across both layer groups."""

from __future__ import annotations

import pytest
import torch

from moe_platform.serving.engine import Engine, SamplingParams
from moe_platform.serving.kv_blocks import SCRATCH_BLOCK
from tinyrun import save_tiny_hf_model, tiny_tokenizer

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
WINDOW = 8  # tinyrun's gpt-oss: a sliding window of 8 on layers 0 and 2, full attention on 1 and 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(the transformers model, its directory, prompts longer than the window, transformers' greedy tokens)."""
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    hf, out = save_tiny_hf_model("GptOssForCausalLM", tmp_path_factory.mktemp("oss"), tok)
    prompts = [list(range(20, 60)), [3] * 11, [5, 17, 42, 7, 99], list(range(100, 127))]
    return hf, out, prompts, [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def run(engine: Engine, prompts, params=GREEDY, watch=None) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        if watch is not None:
            watch(engine)
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("options", [
    {"max_batch_size": 8, "block_size": 16},
    {"max_batch_size": 2, "block_size": 4, "prefill_token_budget": 7},  # chunks smaller than the window and blocks
    {"max_batch_size": 3, "block_size": 2, "prefill_token_budget": 16},
    {"max_batch_size": 8, "block_size": 4, "windowed_kv_cache": False},  # every layer keeps every position
    {"max_batch_size": 2, "kv_cache_layout": "slots"},
])
def test_greedy_matches_transformers_past_the_window(model, options):
    _, out, prompts, want = model
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, **options)
    windowed = options.get("windowed_kv_cache", True) and options.get("kv_cache_layout") != "slots"
    assert (getattr(engine.cache, "window", 0) == WINDOW) == windowed
    assert run(engine, prompts) == want
    assert engine.stats()["kv_cache_used"] == 0


def test_sliding_layers_hold_only_their_window(model):
    """While a long sequence decodes, its sliding layers hold the blocks of the next query's window and no more
    (the rest of their table is the scratch block), its full layers every block; so it holds far fewer blocks than
    the same engine without windowed memory."""
    _, out, prompts, want = model
    bs = 4
    held: dict[str, int] = {}

    def watch(engine):
        for seq in engine.scheduler.running:
            live = [b for b in seq.window_table if b != SCRATCH_BLOCK]
            assert len(live) <= -(-(WINDOW - 1) // bs) + 1, (seq.num_computed, seq.window_table)
            assert SCRATCH_BLOCK not in seq.block_table
        held["windowed"] = max(held.get("windowed", 0), engine.stats()["kv_cache_used"])

    long_prompt = prompts[0]
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, block_size=bs)
    assert run(engine, [long_prompt], watch=watch) == want[:1]
    plain = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, block_size=bs, windowed_kv_cache=False)
    run(plain, [long_prompt], watch=lambda e: held.update(
        plain=max(held.get("plain", 0), e.stats()["kv_cache_used"])))
    full_blocks = -(-(len(long_prompt) + GREEDY.max_tokens) // bs)
    assert held["plain"] == full_blocks  # one block of every layer per 4 positions
    assert held["windowed"] <= full_blocks + -(-WINDOW // bs) + 1  # full group + the window of the sliding group
    # a windowed block holds one of the two layer groups (half the bytes): the sequence's peak KV memory
    assert abs(engine.cache.nbytes - plain.cache.nbytes) < 0.01 * plain.cache.nbytes  # (their scratch blocks differ)
    assert held["windowed"] / 2 < 0.7 * held["plain"]


def test_preemption_and_prefix_caching_across_both_layer_groups(model):
    """Little KV memory: sequences are preempted and recomputed with the same tokens. A prefix longer than the window
    is shared: the full group's blocks of the whole prefix and the sliding group's of its last window come from the
    cache (counted), and the outputs are transformers'."""
    hf, out, prompts, want = model
    bs = 4
    per_block = Engine.from_pretrained(out).cache.bytes_per_token(
        Engine.from_pretrained(out).args, torch.float32) * bs // 2
    small = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, block_size=bs, max_seq_len=64,
                                   kv_cache_memory_bytes=40 * per_block)
    assert run(small, prompts) == want
    assert small.stats()["num_preemptions"] > 0
    shared = list(range(150, 190))  # 40 tokens: 10 blocks, a window of 8 in the last 2-3
    follow = [shared + [7, 8, 9], shared + [11, 12, 13, 14, 15]]
    cached = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, block_size=bs)
    run(cached, [shared])
    before = cached.stats()["prefix_cache_hits"]
    got = run(cached, follow)
    assert cached.stats()["prefix_cache_hits"] - before == 2 * (len(shared) // bs) * bs
    assert got == [hf_greedy(hf, p, GREEDY.max_tokens) for p in follow]


def test_quantized_weights_and_expert_adapters_keep_gpt_oss_computing(model, tmp_path):
    """int8 and int4 experts keep their biases and the clamped SwiGLU (held-out loss within 1% and 5%); adapters on
    the attention and the experts (folded into biased, clamped experts) give each request the greedy tokens of its
    adapter merged into the model, in one batch with base-model requests."""
    from moe_platform.checkpoint.hf import load_hf
    from tinyrun import corpus_text, random_adapter

    _, out, prompts, want = model
    texts = [corpus_text(300_000)[200_000 + i * 500:200_000 + i * 500 + 300] for i in range(6)]
    full = Engine.from_pretrained(out).score(texts)
    for method, bound in (("int8", 0.01), ("int4", 0.05)):
        got = Engine.from_pretrained(out, quantization=method).score(texts)
        assert got != full and abs(got - full) / full < bound, (method, got, full)
    args, state = load_hf(out)
    adapter, merged = random_adapter(args, state, ("attention", "experts"), 4, 1, tmp_path / "a", out)
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, max_loras=1, max_lora_rank=4, block_size=4)
    engine.load_adapter("a", str(adapter))
    ids = [engine.add_request(p, GREEDY, adapter=a) for p, a in zip(prompts[:2], ["a", None], strict=True)]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id].extend(o.token_ids)
    assert got[ids[1]] == want[1]
    alone = run(Engine.from_pretrained(merged, batch_wait_timeout_s=0.0), prompts[:1])[0]
    assert got[ids[0]] == alone and alone != want[0]
