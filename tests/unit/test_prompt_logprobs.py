"""Prompt log-probabilities in the engine (no Ray): every prompt position's log-probability, rank and top
alternatives equal transformers' log-softmax of its logits within 1e-5, across chunked prefill, a prefix-cache hit
(recomputed), a batch mixing scored prompts with requests that ask for nothing and with running decodes, preemption,
both KV layouts and a LoRA adapter; only the requests that ask pay for it."""

from __future__ import annotations

import pytest
import torch

from moe_platform.checkpoint.hf import export_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.engine import Engine, SamplingParams
from moe_platform.tokenizer import load_tokenizer
from tinyrun import random_adapter, tiny_tokenizer

TOL = 1e-5
TEXTS = ["ROMEO:\nWhat light through yonder window breaks?", "a", "First Citizen:\nBefore we proceed any further, hear",
         "KING HENRY " * 9, "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? Deny thy father"]


def model_args(vocab: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     num_experts=4, top_k=2, max_seq_len=128, init_std=0.1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    args = model_args(load_tokenizer(tok).get_vocab_size())
    base_state = build_model(args, seed=0).state_dict()
    base = export_hf(base_state, args, tmp_path_factory.mktemp("base"), tokenizer_dir=tok)
    adapter, merged = random_adapter(args, base_state, ("q_proj", "v_proj", "experts"), 4, 1,
                                     tmp_path_factory.mktemp("adapter"), tok)
    return {"base": base, "adapter": adapter, "merged": merged}


@pytest.fixture(scope="module")
def prompts(setup):
    engine = Engine.from_pretrained(setup["base"])
    return [engine.encode(t) for t in TEXTS]


def reference(model_dir, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every position of `prompt` -> (len, vocab)."""
    hf = _hf(str(model_dir))
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)


_HF: dict = {}


def _hf(model_dir: str):
    import transformers

    if model_dir not in _HF:
        _HF[model_dir] = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _HF[model_dir]


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams, str | None]]) -> list:
    """Submit everything at once, step until done; each request's merged output."""
    ids = [engine.add_request(p, sp, adapter=a) for p, sp, a in requests]
    merged: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            merged[out.request_id] = merged[out.request_id].merge(out) if out.request_id in merged else out
    return [merged[i] for i in ids]


def assert_matches(got: list, prompt: list[int], ref: torch.Tensor, top: int) -> None:
    """`got` (the engine's prompt_logprobs) against the reference log-softmax rows (position i predicts token
    i + 1)."""
    assert len(got) == len(prompt) and got[0] is None
    for pos in range(1, len(prompt)):
        lp, rank, alts = got[pos]
        row = ref[pos - 1]
        token = prompt[pos]
        assert abs(lp - row[token].item()) < TOL, (pos, lp, row[token].item())
        near = int(((row - row[token]).abs() < TOL).sum()) - 1  # other tokens too close to order reliably
        want_rank = int((row > row[token] + TOL).sum()) + 1
        assert want_rank <= rank <= want_rank + near, (pos, rank, want_rank)
        want_values, want_ids = torch.topk(row, top)
        assert len(alts) == top
        assert all(abs(v - w) < TOL for (_, v), w in zip(alts, want_values.tolist(), strict=True))
        assert [t for t, _ in alts] == want_ids.tolist() or top == 0
        if rank == 1 and top:
            assert lp == alts[0][1]  # the greedy check clients make compares these floats exactly


@pytest.mark.parametrize("options", [
    {"prefill_token_budget": 512},  # every prompt in one prefill step
    {"prefill_token_budget": 7, "block_size": 4},  # chunks smaller than a prompt, crossing blocks
    {"prefill_token_budget": 13, "kv_cache_layout": "slots"},
])
def test_prompt_logprobs_equal_transformers_at_every_position(setup, prompts, options):
    """Scored prompts batched with one that asks for nothing and one that samples, top-N of 0, 1 and 5."""
    engine = Engine.from_pretrained(setup["base"], max_batch_size=8, batch_wait_timeout_s=0.0, **options)
    tops = [5, 0, 1, None, 3]
    requests = [(p, SamplingParams(max_tokens=3, temperature=0.0 if k != 1 else 0.8, seed=1, ignore_eos=True,
                                   prompt_logprobs=k), None) for p, k in zip(prompts, tops, strict=True)]
    outs = run(engine, requests)
    for (prompt, sp, _), out in zip(requests, outs, strict=True):
        assert len(out.token_ids) == 3
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        assert_matches(out.prompt_logprobs, prompt, reference(setup["base"], prompt), sp.prompt_logprobs)
    asked = sum(len(p) - 1 for p, k in zip(prompts, tops, strict=True) if k is not None)
    assert engine.stats()["prompt_logprob_tokens"] == asked  # only the requests that ask are scored
    plain = Engine.from_pretrained(setup["base"], max_batch_size=8, batch_wait_timeout_s=0.0, **options)
    run(plain, [(p, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), None) for p, _, _ in requests])
    for key in ("prefill_forwards", "decode_forwards", "steps"):  # scored in the same forwards: batched, not serial
        assert engine.stats()[key] == plain.stats()[key], key
    if options["prefill_token_budget"] < 512:
        assert engine.stats()["prefill_forwards"] > len(prompts)  # the prompts really were chunked


def test_a_prefix_cache_hit_is_recomputed_for_a_scored_prompt(setup, prompts):
    engine = Engine.from_pretrained(setup["base"], max_batch_size=4, batch_wait_timeout_s=0.0, block_size=4)
    prompt = prompts[2]
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    run(engine, [(prompt, plain, None)])  # its full blocks are now in the prefix cache
    hits = engine.stats()["prefix_cache_hits"]
    run(engine, [(prompt, plain, None)])
    assert engine.stats()["prefix_cache_hits"] > hits, "a request that does not score its prompt takes the hit"
    hits = engine.stats()["prefix_cache_hits"]
    out, = run(engine, [(prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2), None)])
    assert engine.stats()["prefix_cache_hits"] == hits
    assert_matches(out.prompt_logprobs, prompt, reference(setup["base"], prompt), 2)
    again, = run(engine, [(prompt, plain, None)])  # and the blocks it computed stay shareable
    assert engine.stats()["prefix_cache_hits"] > hits and again.token_ids == out.token_ids


def test_scored_prompts_join_running_decodes_and_survive_preemption(setup, prompts):
    """Long generations decode while scored prompts prefill beside them; a KV cache too small for all of them
    preempts some, whose prompts are then scored again (or not at all, once handed out) with the same values."""
    args = model_args(load_tokenizer(setup["base"]).get_vocab_size())
    from moe_platform.serving.cache import PagedKVCache

    per_token = PagedKVCache.bytes_per_token(args, torch.float32)
    engine = Engine.from_pretrained(setup["base"], max_batch_size=8, batch_wait_timeout_s=0.0, block_size=4,
                                    prefill_token_budget=16, kv_cache_memory_bytes=per_token * 4 * 40)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    first = [engine.add_request(p, long) for p in prompts[:2]]
    for _ in range(3):
        engine.step()
    scored = [(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, prompt_logprobs=4), None)
              for p in prompts[2:]]
    outs = run(engine, scored)
    assert engine.stats()["num_preemptions"] >= 1
    assert not engine.has_unfinished() and first
    for (prompt, _, _), out in zip(scored, outs, strict=True):
        assert_matches(out.prompt_logprobs, prompt, reference(setup["base"], prompt), 4)


def test_prompt_logprobs_under_a_lora_adapter(setup, prompts):
    """An adapter's scored prompt equals transformers on the merged model; the base model's in the same batch
    equals the base model's."""
    engine = Engine.from_pretrained(setup["base"], max_loras=1, max_lora_rank=4, batch_wait_timeout_s=0.0,
                                    prefill_token_budget=9)
    engine.load_adapter("a", str(setup["adapter"]))
    sp = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    outs = run(engine, [(prompts[0], sp, "a"), (prompts[0], sp, None), (prompts[4], sp, "a")])
    assert_matches(outs[0].prompt_logprobs, prompts[0], reference(setup["merged"], prompts[0]), 3)
    assert_matches(outs[1].prompt_logprobs, prompts[0], reference(setup["base"], prompts[0]), 3)
    assert_matches(outs[2].prompt_logprobs, prompts[4], reference(setup["merged"], prompts[4]), 3)
    assert abs(outs[0].prompt_logprobs[5][0] - outs[1].prompt_logprobs[5][0]) > 1e-4, "the adapter changed nothing"


def test_prompt_logprobs_are_validated():
    with pytest.raises(ValueError, match=r"prompt_logprobs must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be an integer in \[0, 20\]"):
        SamplingParams(prompt_logprobs=True)


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "GptOssForCausalLM"])
def test_prompt_logprobs_on_the_latent_and_the_windowed_caches(arch, tmp_path_factory):
    """Chunked scoring on a DeepSeek-V3 model (attention on its latent cache) and on gpt-oss (sliding layers holding
    only their window's blocks, sinks): transformers' log-softmax at every position of a prompt longer than the
    window."""
    from tinyrun import save_tiny_hf_model

    hf, out = save_tiny_hf_model(arch, tmp_path_factory.mktemp(arch), tiny_tokenizer(tmp_path_factory.mktemp("t")))
    engine = Engine.from_pretrained(out, prefill_token_budget=7, block_size=4, batch_wait_timeout_s=0.0)
    prompt = list(range(20, 60))
    got = run(engine, [(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2),
                        None)])[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert_matches(got.prompt_logprobs, prompt, ref, 2)
