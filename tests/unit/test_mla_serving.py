"""Serving DeepSeek-class models on the compressed latent KV cache (serving/latent_cache.py): per token and layer the
cache holds kv_lora_rank + qk_rope_head_dim values, attention runs on the latent with kv_b_proj absorbed, and
everything the paged cache offers works on it: chunked prefill and continuous batching with transformers' greedy
tokens, preemption, prefix caching, int8/fp8 latents, int8/int4 weights and multi-LoRA (adapters on kv_b_proj
included)."""

from __future__ import annotations

import pytest
import torch

from moe_platform.checkpoint.hf import load_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.cache import PagedKVCache
from moe_platform.serving.engine import Engine, SamplingParams
from moe_platform.serving.latent_cache import PagedLatentCache
from tinyrun import corpus_text, random_adapter, save_tiny_hf_model, tiny_tokenizer

ARCHS = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=ARCHS)
def model(request, tokenizer_dir, tmp_path_factory):
    """(architecture, transformers model, its directory, prompts, transformers' greedy tokens for them)."""
    hf, out = save_tiny_hf_model(request.param, tmp_path_factory.mktemp(request.param), tokenizer_dir)
    prompts = [[5, 17, 42, 7, 99], [3] * 11, list(range(20, 60)), list(range(100, 131))]
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, min_new_tokens=GREEDY.max_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return request.param, hf, out, prompts, want


def run_all(engine: Engine, requests, adapters=None) -> list[list[int]]:
    ids = [engine.add_request(p, params, adapter=a) for (p, params), a in zip(requests, adapters or [None] * len(
        requests), strict=True)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("options", [
    {"max_batch_size": 8, "prefill_token_budget": 512},  # one step prefills everything
    {"max_batch_size": 2, "prefill_token_budget": 16, "block_size": 4},  # queueing, chunks crossing blocks
    {"max_batch_size": 3, "prefill_token_budget": 7, "block_size": 8},
    {"max_batch_size": 8, "mla_kv_cache": "expanded"},  # the per-head keys and values, for comparison
    {"max_batch_size": 2, "prefill_token_budget": 32, "kv_cache_layout": "slots"},  # expanded, one slot each
])
def test_greedy_matches_transformers(model, options):
    _, _, out, prompts, want = model
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, **options)
    latent = options.get("mla_kv_cache", "latent") == "latent" and options.get("kv_cache_layout") != "slots"
    assert isinstance(engine.cache, PagedLatentCache) == latent
    assert run_all(engine, [(p, GREEDY) for p in prompts]) == want
    assert engine.stats()["kv_cache_used"] == 0


def test_the_cache_holds_the_latent_and_is_smaller_by_the_shapes(model):
    """Bytes per token: n_layers x (kv_lora_rank + qk_rope_head_dim) values against n_layers x heads x
    (qk_nope + qk_rope + v) for the expanded cache; the caches' sizes at the same budget of tokens show it."""
    _, _, out, _, _ = model
    args = load_hf(out)[0]
    latent = PagedLatentCache.bytes_per_token(args, torch.float32)
    expanded = PagedKVCache.bytes_per_token(args, torch.float32)
    assert latent == args.n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * 4
    assert expanded == args.n_layers * args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim
                                                      + args.v_head_dim) * 4
    a = Engine.from_pretrained(out, max_batch_size=4, kv_cache_memory_bytes=64 * 16 * expanded)
    b = Engine.from_pretrained(out, max_batch_size=4, kv_cache_memory_bytes=64 * 16 * expanded,
                               mla_kv_cache="expanded")
    assert a.stats()["kv_cache_capacity"] // b.stats()["kv_cache_capacity"] == expanded // latent
    assert a.cache.nbytes == (a.stats()["kv_cache_capacity"] + 1) * 16 * latent
    assert int(a.cache.k.shape[-1]) == args.kv_lora_rank and int(a.cache.v.shape[-1]) == args.qk_rope_head_dim


def test_preemption_and_prefix_caching_on_the_latent(model):
    """A cache with room for barely more than one sequence: the newest requests are preempted and recomputed; a
    shared prefix is served from cached latent blocks (counted); every output is transformers' greedy one."""
    _, hf, out, prompts, want = model
    per_block = PagedLatentCache.bytes_per_token(load_hf(out)[0], torch.float32) * 4
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, max_batch_size=8, block_size=4, max_seq_len=64,
                                    kv_cache_memory_bytes=18 * per_block)
    assert run_all(engine, [(p, GREEDY) for p in prompts]) == want
    assert engine.stats()["num_preemptions"] > 0
    shared = list(range(60, 100))
    follow = [shared + [7, 8, 9], shared + [11, 12]]
    cached = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, block_size=8)
    run_all(cached, [(shared, GREEDY)])
    got = run_all(cached, [(p, GREEDY) for p in follow])
    assert cached.stats()["prefix_cache_hits"] >= 2 * 32
    with torch.no_grad():
        for prompt, tokens in zip(follow, got, strict=True):
            assert tokens == hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("kv_dtype, tol", [("auto", 1e-5), ("int8", 0.02), ("fp8", 0.08)])
def test_scattered_latent_blocks_match_the_uncached_forward(kv_dtype, tol):
    """Two sequences on scattered, interleaved blocks, prefilled in two chunks and decoded a token: the logits of
    attention on the latent equal the model's own forward (expanded keys and values, no cache) within the storage
    dtype's rounding. fp8 is served on CUDA only; the cache code is the same on every device."""
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, num_experts=4, top_k=2, intermediate_size=32,
                     max_seq_len=64, init_std=0.1, kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                     qk_rope_head_dim=4, v_head_dim=6, rope_interleave=True, attention_bias=True, dense_layers="0",
                     dense_intermediate_size=48)
    model = build_model(args, seed=1).eval()
    tokens = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
        cache = PagedLatentCache(args, num_blocks=16, block_size=4, kv_dtype=kv_dtype)
        tables = [[9, 2, 14, 5, 11, 7], [3, 12, 1, 15, 6, 10]]
        got = []
        for lo, hi in ((0, 13), (13, 22), (22, 23)):
            positions = torch.arange(lo, hi).expand(2, -1)
            got.append(model(tokens[:, lo:hi], positions, cache.bind(tables, positions, torch.float32)))
    err = ((torch.cat(got, dim=1) - want).abs().max() / want.abs().max()).item()
    assert err < tol, err
    assert cache.k[:, :, :4].abs().sum() == 0  # the scratch block: nothing real was written there


def test_quantized_weights_and_latents(model):
    """int8 and int4 weights (latent attention's projections and kv_b_proj included, dequantized once for the
    absorbed attention) keep the held-out loss within 1% and 5%, and decoding on the latent cache reports the
    log-probabilities of those quantized weights; int8 latents keep each greedy token's log-probability close."""
    _, _, out, prompts, _ = model
    texts = [corpus_text(300_000)[200_000 + i * 500:200_000 + i * 500 + 300] for i in range(6)]
    full = Engine.from_pretrained(out)
    want = full.score(texts)
    for method, bound in (("int8", 0.01), ("int4", 0.05)):
        engine = Engine.from_pretrained(out, quantization=method)
        got = engine.score(texts)
        assert got != want and abs(got - want) / want < bound, (method, got, want)
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
        engine.add_request(prompts[2], params)
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        tokens = [t for o in outs for t in o.token_ids]
        reported = -sum(lp for o in outs for lp, _ in o.logprobs)
        scored = engine.runner.loss(prompts[2] + tokens) - engine.runner.loss(prompts[2])
        assert abs(reported - scored) <= 1e-4 * scored, (method, reported, scored)
    int8_kv = Engine.from_pretrained(out, kv_cache_dtype="int8")
    assert int8_kv.cache.nbytes < 0.35 * full.cache.nbytes
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    for prompt in prompts[:2]:
        a = [(t, lp) for o in _steps(full, prompt, params) for t, (lp, _) in zip(o.token_ids, o.logprobs,
                                                                                   strict=True)]
        b = [(t, lp) for o in _steps(int8_kv, prompt, params) for t, (lp, _) in zip(o.token_ids, o.logprobs,
                                                                                      strict=True)]
        assert a[0][0] == b[0][0] and abs(a[0][1] - b[0][1]) < 0.02


def _steps(engine: Engine, prompt, params):
    engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_multi_lora_on_latent_attention(model, tmp_path):
    """Adapters on every latent-attention projection (kv_b_proj, which the latent cache absorbs, included), the
    dense layer's MLP and the routed experts, two at once, in one batch with base-model requests: each request gets
    the greedy tokens of its own adapter merged into the base model, served alone."""
    _, _, out, prompts, want = model
    args, state = load_hf(out)
    targets = ("attention", "dense_mlp", "experts")
    first = random_adapter(args, state, targets, 4, 1, tmp_path / "a", out)
    second = random_adapter(args, state, ("kv_b_proj",), 2, 2, tmp_path / "b", out)
    engine = Engine.from_pretrained(out, batch_wait_timeout_s=0.0, max_loras=2, max_lora_rank=4, block_size=4)
    assert isinstance(engine.cache, PagedLatentCache)
    engine.load_adapter("a", str(first[0]))
    engine.load_adapter("b", str(second[0]))
    got = run_all(engine, [(p, GREEDY) for p in prompts], adapters=["a", None, "b", "a"])
    assert got[1] == want[1]
    merged_a = Engine.from_pretrained(first[1], batch_wait_timeout_s=0.0, mla_kv_cache="expanded")
    merged_b = Engine.from_pretrained(second[1], batch_wait_timeout_s=0.0, mla_kv_cache="expanded")
    assert got[0] == run_all(merged_a, [(prompts[0], GREEDY)])[0] and got[0] != want[0]
    assert got[3] == run_all(merged_a, [(prompts[3], GREEDY)])[0]
    assert got[2] == run_all(merged_b, [(prompts[2], GREEDY)])[0] and got[2] != want[2]
