"""The Serve application over HTTP: the official openai client (streaming included), bad input -> OpenAI-shaped 4xx,
413, overload -> 429 (never 500), health, models, API key. One Ray/Serve instance for the whole module."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402
from tinyrun import local_ray, poll, scrape_ray_metrics  # noqa: E402

MODEL = "moe-platform"
API_KEY = "sk-test-123"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def server(serving_export, serving_port):
    from ray import serve

    from moe_platform.serving.app import build_app, start_server

    with local_ray(num_cpus=4):
        try:
            url = start_server(serving_export, port=serving_port,
                               engine={"max_batch_size": 8, "batch_wait_timeout_s": 0.0})
            serve.run(build_app({"model": str(serving_export), "api_key": API_KEY, "engine": {"max_batch_size": 2}}),
                      name="secure", route_prefix="/secure")
            serve.run(build_app({"model": str(serving_export), "max_body_bytes": 4096,
                                 "engine": {"max_batch_size": 2, "max_waiting": 2, "batch_wait_timeout_s": 0.0}}),
                      name="tight", route_prefix="/tight")
            yield SimpleNamespace(url=url, http=httpx.Client(base_url=url, timeout=60))
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(serving_export):
    return Engine.from_pretrained(serving_export, batch_wait_timeout_s=0.0)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    err = response.json()["error"]
    assert set(err) == ERROR_KEYS and isinstance(err["message"], str) and err["message"]
    return err


def sse_events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


def test_health_and_models(server, client):
    r = server.http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_matches_the_engine(client, local):
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0)
    assert r.choices[0].text == local.generate("ROMEO:", greedy)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(local.encode("ROMEO:"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    many = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], max_tokens=4, n=2, temperature=0.8,
                                     seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    echoed = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("ROMEO:")


def test_chat_completion_uses_the_chat_template(client, local):
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who art thou?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    prompt = local.render_chat(messages)
    assert prompt.endswith("<|assistant|>\n")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == local.generate(prompt, SamplingParams(max_tokens=10, temperature=0))
    assert r.usage.prompt_tokens == len(local.encode(prompt))


def test_streaming_completion_and_chat(server, client):
    full = client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="To be, or not", max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    messages = [{"role": "user", "content": "Speak."}]
    chat = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chat[:-1])
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert text == whole.choices[0].message.content

    raw = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["total_tokens"] > 0


M = {"model": MODEL}
BAD_INPUTS = [
    # (endpoint, body (bytes are sent raw), status, param the error must name)
    ("completions", b'{"model": "moe-platform", "prompt": ', 400, None),
    ("completions", b"[1, 2, 3]", 400, None),
    ("completions", b'{"model": "moe-platform", "prompt": "hi", "temperature": NaN}', 400, None),
    ("completions", {**M}, 400, "prompt"),
    ("completions", {"prompt": "hi"}, 400, "model"),
    ("completions", {**M, "prompt": 5}, 400, "prompt"),
    ("completions", {**M, "prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ("completions", {**M, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {**M, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("completions", {**M, "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ("completions", {**M, "prompt": "word " * 400}, 400, "prompt"),
    ("completions", {**M, "prompt": [1, 999_999]}, 400, "prompt"),
    ("completions", {**M, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {**M, "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ("completions", {**M, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {**M, "prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("completions", {**M, "prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {**M, "prompt": "hi", "n": 100}, 400, "n"),
    ("completions", {**M, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {**M, "prompt": "hi", "stop": 5}, 400, "stop"),
    ("completions", {**M, "prompt": "hi", "seed": -1}, 400, "seed"),
    ("completions", {**M, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("completions", {**M, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("completions", {**M, "prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("completions", {**M, "prompt": "hi", "max_tokens": 0, "logprobs": 1}, 400, "max_tokens"),  # 0 needs echo
    # parameters this server does not know are refused by name, never silently dropped
    ("completions", {**M, "prompt": "hi", "frequency_penalty_x": 1}, 400, "frequency_penalty_x"),
    ("completions", {**M, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400,
     "stream_options.x"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "hi", "audio": {}}]}, 400,
     "messages[0].audio"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 1}, 400,
     "prompt_logprobs"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                          "top_logprobs": 30}, 400, "top_logprobs"),
    ("completions", {**M, "prompt": "hi", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("chat/completions", {**M, "messages": []}, 400, "messages"),
    ("chat/completions", {**M, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {**M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {**M, "messages": [{"role": "user"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, 400, "tools"),
    ("completions", {**M, "prompt": "a\udcffb"}, 400, "prompt"),  # lone surrogates: not Unicode text
    ("completions", {**M, "prompt": "hi", "stop": ["\ud800"]}, 400, "stop[0]"),
    ("chat/completions", {**M, "messages": [{"role": "user", "content": "\udfff"}]}, 400, "messages[0].content"),
]


@pytest.mark.parametrize("endpoint, body, status, param", BAD_INPUTS)
def test_bad_input_is_an_openai_4xx(server, endpoint, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post(f"/v1/{endpoint}", content=content, headers={"content-type": "application/json"})
    err = assert_openai_error(r, status)
    if param is not None:
        assert err["param"] == param, err
    assert server.http.get("/health").status_code == 200  # and the server keeps serving


def test_unknown_route_and_method_are_openai_errors(server):
    assert_openai_error(server.http.get("/v1/nope"), 404)
    assert_openai_error(server.http.get("/v1/completions"), 405)


def test_body_over_the_limit_is_413(server):
    big = b'{"model": "moe-platform", "prompt": "' + b"x" * 8192 + b'"}'
    err = assert_openai_error(server.http.post("/tight/v1/completions", content=big), 413)
    assert err["code"] == "payload_too_large"

    def chunked():  # no Content-Length: the limit applies while reading
        yield big[:4000]
        yield big[4000:]

    assert_openai_error(server.http.post("/tight/v1/completions", content=chunked()), 413)
    assert_openai_error(server.http.post("/v1/completions", content=b"x" * (2 << 20)), 413)
    assert server.http.post("/tight/v1/completions", json={**M, "prompt": "ok", "max_tokens": 2}).status_code == 200


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 300), st.floats(-5, 5, allow_nan=False),
                        st.text(max_size=12), st.lists(st.integers(-3, 600), max_size=4),
                        st.lists(st.text(max_size=4), max_size=5))


def mostly(good: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a valid value, sometimes any JSON value: whole requests are often valid, and every field gets broken."""
    return st.integers(0, 15).flatmap(lambda roll: JSON_VALUES if roll == 15 else good)


SAMPLING = {
    "max_tokens": mostly(st.integers(1, 12)),
    "temperature": mostly(st.floats(0, 2, allow_nan=False)),
    "top_p": mostly(st.floats(0.05, 1, allow_nan=False)),
    "top_k": mostly(st.integers(-1, 60)),
    "n": mostly(st.integers(1, 3)),
    "stop": mostly(st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=4))),
    "seed": mostly(st.integers(0, 2**32)),
    "stream": mostly(st.booleans()),
}
COMPLETION_BODIES = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)),
     "prompt": mostly(st.one_of(st.text(max_size=60), st.lists(st.integers(0, 520), min_size=1, max_size=8)))},
    optional={**SAMPLING, "echo": mostly(st.booleans())})
MESSAGES = st.lists(st.fixed_dictionaries({"role": mostly(st.sampled_from(["system", "user", "assistant"])),
                                           "content": mostly(st.text(max_size=40))}), min_size=1, max_size=3)
CHAT_BODIES = st.fixed_dictionaries({"model": mostly(st.just(MODEL)), "messages": mostly(MESSAGES)},
                                    optional=SAMPLING)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(request=st.one_of(st.tuples(st.just("completions"), COMPLETION_BODIES),
                         st.tuples(st.just("chat/completions"), CHAT_BODIES)))
def test_request_shapes_never_5xx(server, request):
    endpoint, body = request
    r = server.http.post(f"/v1/{endpoint}", json=body)
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        if body.get("stream") is True:
            assert sse_events(r.text)[-1] == "[DONE]"
        else:
            assert len(r.json()["choices"]) >= 1
    else:
        assert set(r.json()["error"]) == ERROR_KEYS


def test_overload_answers_429_with_retry_after_never_500(server):
    body = {**M, "prompt": "ROMEO:", "max_tokens": 48, "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            return await asyncio.gather(*(http.post("/tight/v1/completions", json=body) for _ in range(24)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2
    for r in responses:
        if r.status_code == 429:
            err = assert_openai_error(r, 429)
            assert err["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    assert server.http.post("/tight/v1/completions", json=body).status_code == 200  # recovered


def test_api_key_is_required_when_configured(server):
    assert_openai_error(server.http.get("/secure/v1/models"), 401)
    bad = openai.OpenAI(base_url=f"{server.url}/secure/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    good = openai.OpenAI(base_url=f"{server.url}/secure/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    assert server.http.get("/secure/health").status_code == 200  # probes need no key
    assert server.http.get("/v1/models").status_code == 200  # the key is per app, off by default
    # The API key is no admin key: with none configured, the admin routes are off for every client, key or not.
    user = {"Authorization": f"Bearer {API_KEY}"}
    for method, path, body in [("GET", "/secure/admin/rollout", None),
                               ("POST", "/secure/admin/rollout", {"action": "traffic", "weights": {"stable": 100}}),
                               ("POST", "/secure/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}),
                               ("POST", "/secure/v1/unload_lora_adapter", {"lora_name": "x"})]:
        err = assert_openai_error(server.http.request(method, path, headers=user, json=body), 403)
        assert err["code"] == "admin_disabled" and "no admin key is configured" in err["message"], (path, err)


def test_engine_stats_export_to_ray_metrics(server, local):
    from moe_platform.serving.replica_metrics import RayMetrics

    local.generate("ROMEO:", SamplingParams(max_tokens=4, temperature=0))
    metrics = RayMetrics("test-model")
    metrics.export(local)
    metrics.export(local)  # deltas: nothing new is counted twice
    assert local.drain_latency_samples() == ([], [])
    stats = local.stats()
    assert stats["generated_tokens"] >= 4
    want = {"ray_moe_serve_generated_tokens_total": float(stats["generated_tokens"]),
            "ray_moe_serve_queue_depth": 0.0, "ray_moe_serve_running_batch_size": 0.0,
            "ray_moe_serve_prefix_cache_hit_rate": stats["prefix_cache_hits"] / max(1, stats["prefix_cache_queries"]),
            "ray_moe_serve_expert_tokens_total": float(sum(map(sum, stats["expert_load"])))}  # summed over experts
    assert scrape_ray_metrics(set(want), 'model="test-model"') == want


def vllm_metrics(server) -> dict[str, float]:
    """GET /metrics parsed by prometheus_client's own parser: sample name -> value (the app's one model)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            assert s.labels.get("model_name") == MODEL, s
            if "le" not in s.labels:
                samples[s.name] = s.value
    return samples


def test_metrics_carry_vllm_names_for_the_whole_app(server, client):
    before = vllm_metrics(server)
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:request_success_total", "vllm:time_to_first_token_seconds_count",
            "vllm:e2e_request_latency_seconds_count", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "vllm:gpu_prefix_cache_hit_rate", "vllm:num_preemptions_total"} <= set(before)
    # The same long prompt three times: the later ones take the first one's cached KV blocks (one replica).
    prompt = "ROMEO: But soft, what light through yonder window breaks? " * 4
    done = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True}).usage for _ in range(3)]

    def counted():
        now = vllm_metrics(server)
        grown = {k: now[k] - before[k] for k in ("vllm:generation_tokens_total", "vllm:request_success_total",
                                                 "vllm:time_to_first_token_seconds_count",
                                                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                                                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")}
        return grown if grown["vllm:request_success_total"] >= 3 else None

    grown = poll(counted, 30, "the requests in /metrics")
    assert grown["vllm:generation_tokens_total"] >= sum(u.completion_tokens for u in done) == 15
    assert grown["vllm:prompt_tokens_total"] >= sum(u.prompt_tokens for u in done)
    assert grown["vllm:time_to_first_token_seconds_count"] >= 3 and grown["vllm:e2e_request_latency_seconds_count"] >= 3
    full_blocks = (done[0].prompt_tokens - 1) // 16
    assert full_blocks >= 2 and grown["vllm:prefix_cache_queries_total"] >= 3 * 16 * full_blocks
    assert grown["vllm:prefix_cache_hits_total"] >= 2 * 16 * full_blocks


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_request(server, stream):
    """The client drops the connection after the first token (streamed) or a moment in (not streamed): Ray Serve
    cancels the handler, the engine aborts the request, its KV blocks free and no more tokens are generated for it."""
    idle = poll(lambda: (m := vllm_metrics(server))["vllm:num_requests_running"] == 0 and m, 30, "an idle engine")
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 240, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.Client(base_url=server.url, timeout=60) as http, http.stream("POST", "/v1/completions",
                                                                                json=body) as r:
            next(r.iter_lines())  # the first event, then the client closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.1)

    def ended():  # a report with the request's tokens and no request running: the count is final
        m = vllm_metrics(server)
        grown = m["vllm:generation_tokens_total"] - idle["vllm:generation_tokens_total"]
        return grown if grown > 0 and m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0 \
            else None

    generated = poll(ended, 30, "the request to be aborted")
    assert 1 <= generated < 240, generated


def test_prompt_logprobs_through_the_openai_client(server, client, local):
    """Completions with echo and logprobs, as lm-eval sends them: the prompt's tokens and log-probabilities (none
    for its first token) come before the generated one's, equal to the engine's own prompt log-probabilities (checked
    against transformers in the engine tests), each top_logprobs entry holding the token itself and the top N;
    max_tokens 0 returns the prompt alone; streamed, the echo chunk carries the prompt's."""
    ids = local.encode("ROMEO: hark, what light")
    n = len(ids)
    rid = local.add_request(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))
    want = None
    while local.has_unfinished():
        want = next((o.prompt_logprobs for o in local.step() if o.request_id == rid and o.prompt_logprobs), want)
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, logprobs=2, echo=True, temperature=0,
                                  seed=1234)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("ROMEO: hark, what light") and len(lp.tokens) == n + 1
    assert lp.tokens[:n] == local.token_texts(ids) and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:n] == pytest.approx([v for v, _, _ in want[1:]], abs=1e-6)
    for piece, value, top, (_, rank, alts) in zip(lp.tokens[1:n], lp.token_logprobs[1:n], lp.top_logprobs[1:n],
                                                  want[1:], strict=True):
        assert top[piece] == value and len(top) <= 3  # the token itself, and the top 2
        assert max(top.values()) == pytest.approx(alts[0][1], abs=1e-6)
        assert (value == max(top.values())) == (rank == 1)  # lm-eval's greedy check
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens == 1
    alone = client.completions.create(model=MODEL, prompt=[ids], max_tokens=0, logprobs=2, echo=True)
    assert alone.choices[0].text == "ROMEO: hark, what light" and alone.usage.completion_tokens == 0
    assert alone.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n]
    body = {**M, "prompt": [ids], "max_tokens": 2, "logprobs": 2, "echo": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(e) for e in sse_events(server.http.post("/v1/completions", json=body).text)[:-1]]
    first = chunks[0]["choices"][0]
    assert first["text"] == "ROMEO: hark, what light" and first["logprobs"]["token_logprobs"] == lp.token_logprobs[:n]
    assert all("usage" in c for c in chunks) and chunks[-1]["usage"]["completion_tokens"] == 2


def test_logprobs_through_the_openai_client(server, client, local):
    """Completions `logprobs: N` and chat `logprobs` + `top_logprobs`, streamed and not, carry the engine's own
    log-probabilities (themselves checked against transformers in the engine tests) in OpenAI's shapes."""
    want = []
    rid = local.add_request("ROMEO:", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    while local.has_unfinished():
        want += [lp for out in local.step() if out.request_id == rid for lp in (out.logprobs or [])]
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([v for v, _ in want], abs=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for d, (_, top) in zip(lp.top_logprobs, want, strict=True):  # token strings -> logprob (two tokens whose text
        assert 1 <= len(d) <= 3 and max(d.values()) == pytest.approx(top[0][1], abs=1e-5)  # is alike share a key)
        assert all(any(abs(v - w) < 1e-5 for _, w in top) for v in d.values())
    streamed = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=3,
                                         stream=True, extra_body={"ignore_eos": True})
    assert [v for c in streamed for v in (c.choices[0].logprobs.token_logprobs if c.choices and
                                          c.choices[0].logprobs else [])] == pytest.approx(lp.token_logprobs, abs=1e-6)
    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.logprob <= 0 for c in content)
    assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content)
    assert all(c.token == c.top_logprobs[0].token for c in content)  # greedy: the most likely token each time
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, stream=True)
    assert [c.logprob for ch in chunks for c in (ch.choices[0].logprobs.content if ch.choices and
                                                ch.choices[0].logprobs else [])] == \
        pytest.approx([c.logprob for c in content], abs=1e-6)
