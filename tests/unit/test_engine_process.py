"""The native engine in a process of its own (`engine.core: process`, `ProcessEngine`), against the same engine in
this process: the same greedy tokens, streams and aborts, the same errors at submit (400, 404, 429), adapters
loaded through the pipe, the quality probe and statistics, and a child that dies failing its requests (503)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from moe_platform.checkpoint.hf import export_hf, load_hf
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import build_model
from moe_platform.serving.engine import Engine, SamplingParams
from moe_platform.serving.engine_process import ProcessEngine
from moe_platform.serving.errors import (
    ContextLengthError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
)
from moe_platform.serving.loader import load_engine
from tinyrun import poll, random_adapter, tiny_tokenizer

OPTIONS = {"max_batch_size": 4, "max_waiting": 3, "max_loras": 1, "max_lora_rank": 8}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tok_dir = tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab=384)
    args = ModelArgs(vocab_size=384, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64, num_experts=4,
                     top_k=2, max_seq_len=128, init_std=0.1)
    model_dir = export_hf(build_model(args, seed=0).state_dict(), args, tmp_path_factory.mktemp("m"),
                          tokenizer_dir=tok_dir)
    a_args, state = load_hf(model_dir)
    adapter = random_adapter(a_args, state, ("q_proj", "v_proj"), 4, 1, tmp_path_factory.mktemp("ad"), model_dir)[0]
    return {"model": model_dir, "adapter": adapter}


@pytest.fixture(scope="module")
def engines(exports):
    here = Engine.from_pretrained(exports["model"], **OPTIONS).start()
    apart = load_engine(exports["model"], **OPTIONS)  # core auto: a process of its own for an export directory
    assert isinstance(apart, ProcessEngine) and apart.running
    yield here, apart
    here.shutdown()
    apart.shutdown()


def test_same_tokens_streams_and_probe_as_in_process(engines, exports):
    here, apart = engines
    assert apart.generate_batch(PROMPTS, GREEDY) == here.generate_batch(PROMPTS, GREEDY)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=7)
    assert apart.generate(PROMPTS[0], sampled) == here.generate(PROMPTS[0], sampled)
    assert apart.score(PROMPTS) == pytest.approx(here.score(PROMPTS), rel=1e-6)

    async def stream(engine) -> tuple[list[str], str | None]:
        pieces, reason = [], None
        async for out in engine.stream(PROMPTS[1], GREEDY):
            pieces.append(out.text)
            reason = out.finish_reason
        return pieces, reason

    pieces, reason = asyncio.run(stream(apart))
    assert "".join(pieces) == here.generate(PROMPTS[1], GREEDY) and reason == "length" and len(pieces) > 1

    async def abort_midway() -> str | None:
        handle = apart.submit(PROMPTS[2], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
        async for _ in handle:
            handle.abort()
        return _.finish_reason

    assert asyncio.run(abort_midway()) == "abort"
    poll(lambda: not apart.has_unfinished(), 30, "the aborted request to finish")
    stats = apart.stats()
    assert stats["requests_finished"] >= 5 and stats["generated_tokens"] > 0 and stats["running"] == 0
    ttft, itl = apart.drain_latency_samples()
    assert ttft and itl


def test_errors_come_at_submit_as_in_process(engines):
    _, apart = engines
    with pytest.raises(ContextLengthError):
        apart.add_request("x " * 500, GREEDY)
    with pytest.raises(InvalidRequestError, match="token id"):
        apart.add_request([10**6], GREEDY)
    with pytest.raises(NotFoundError, match="no adapter named 'nope'"):
        apart.add_request(PROMPTS[0], GREEDY, adapter="nope")
    rid = apart.add_request(PROMPTS[0], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match="already running"):
        apart.add_request(PROMPTS[0], GREEDY, request_id=rid)
    # max_waiting 3: requests sent with no output yet count, so a burst past it gets 429 at once
    ids = [rid]
    with pytest.raises(EngineOverloadedError):
        for _ in range(OPTIONS["max_waiting"] + 1):
            ids.append(apart.add_request(PROMPTS[1], SamplingParams(max_tokens=60, temperature=0.0)))
    for i in ids:
        apart.abort(i)
    poll(lambda: not apart.has_unfinished(), 30, "the aborted requests to finish")


def test_adapters_load_through_the_pipe(engines, exports):
    here, apart = engines
    for engine in engines:
        engine.load_adapter("ad", str(exports["adapter"]))
    assert [a["name"] for a in apart.loaded_adapters()] == ["ad"]
    assert apart.generate_batch(PROMPTS, GREEDY, adapters=["ad"] * 3) == \
        here.generate_batch(PROMPTS, GREEDY, adapters=["ad"] * 3) != apart.generate_batch(PROMPTS, GREEDY)
    with pytest.raises(ValueError, match="all 1 adapter slots are in use"):
        apart.load_adapter("other", str(exports["adapter"]))
    apart.unload_adapter("ad")
    with pytest.raises(NotFoundError):
        apart.add_request(PROMPTS[0], GREEDY, adapter="ad")
    assert apart.loaded_adapters() == []
    with pytest.raises(ValueError, match="in-place weight sync"):
        apart.update_weights({})


def test_a_bad_export_fails_in_the_replica_naming_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((ValueError, OSError)):
        load_engine(tmp_path, core="process")


def test_a_dead_engine_process_fails_its_requests_and_its_health(exports):
    engine = load_engine(exports["model"], core="process", max_batch_size=2)
    calm = load_engine(exports["model"], core="process")
    calm.shutdown()  # a child that exits because it was asked to is no failure
    assert calm.failure is None and not calm.running
    with pytest.raises(RuntimeError, match="shut down"):
        calm.check_health()
    outs = []
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True),
                       sink=outs.append)
    poll(lambda: outs, 30, "the first output")
    os.kill(engine._proc.pid, signal.SIGKILL)
    poll(lambda: outs[-1].finished, 30, "the request to fail")
    assert outs[-1].error and "engine" in outs[-1].error and not outs[-1].request_failed  # 503, not 500
    with pytest.raises(RuntimeError, match="engine"):
        engine.check_health()
    with pytest.raises(EngineUnavailableError):
        engine.add_request(PROMPTS[0], GREEDY)
    engine.shutdown()


@pytest.mark.parametrize("interval", [0, 4])
def test_streams_gather_tokens_per_output_under_load(exports, interval):
    """stream_interval N: after the first output (never held), each carries at least N new tokens (the last, what is
    left); 0 (auto): one token per output while few requests run, more once over 16 are in flight."""
    engine = Engine.from_pretrained(exports["model"], max_batch_size=32, stream_interval=interval)
    params = SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)

    async def run(n: int) -> tuple[int, list[list[int]]]:
        handles = [engine.submit(PROMPTS[i % 3], params) for i in range(n)]
        want = engine.tokens_per_output()

        async def sizes(handle) -> list[int]:
            return [len(out.token_ids) async for out in handle]

        return want, await asyncio.gather(*(sizes(h) for h in handles))

    try:
        for n, auto in ((1, 1), (32, 2)):
            want, runs = asyncio.run(run(n))
            assert want == (interval or auto)
            for sizes in runs:
                assert sum(sizes) == 21 and min(sizes[1:-1], default=want) >= want
            if want > 1:
                assert max(len(sizes) for sizes in runs) <= 1 + -(-20 // want)
    finally:
        engine.shutdown()
