"""`engine.backend = "vllm"`: vLLM's async engine behind our engine interface and our Serve app.

- in-process: greedy tokens equal the native engine's, log-probabilities (generated and prompt) and the quality
  probe's loss agree within 1e-4, stop strings and aborts finish the request in vLLM too, and refused options name
  themselves;
- in Serve, over HTTP with an API key: versions on the vllm backend, a canary with corrupted weights rolled back by
  the quality probe, then a blue-green switch to a registry:// version loaded on demand, with 0 failed requests, the
  audit log and the serving metrics under the native engine's names.
One vLLM engine per test in-process; one Ray/Serve instance for the module."""

from __future__ import annotations

import asyncio
import json
import queue

import httpx
import pytest

from hotswap import Load
from moe_platform.serving.engine import Engine, EngineConfig, SamplingParams
from moe_platform.serving.vllm_engine import VllmEngine
from tinyrun import corpus_text, free_port, local_ray, poll, scrape_ray_metrics

PROMPTS = ["ROMEO:\n", "KING RICHARD:\nNow is the winter", "First Citizen:\nBefore we proceed", [5, 6, 7, 8, 9]]
MODEL, API_KEY, ADMIN = "moe-platform", "vllm-test-key", "vllm-admin-key"


@pytest.fixture(scope="module")
def engines(export_a):
    vllm = VllmEngine.from_pretrained(export_a, backend="vllm", max_batch_size=8)
    try:
        yield vllm, Engine.from_pretrained(export_a, max_batch_size=8)
    finally:
        vllm.shutdown()


def test_greedy_tokens_and_log_probabilities_equal_the_native_engine(engines):
    vllm, native = engines
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=3, prompt_logprobs=2)
    ours, theirs = native.complete_batch(PROMPTS, params), vllm.complete_batch(PROMPTS, params, timeout=120)
    for a, b in zip(ours, theirs, strict=True):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason == "length"
        for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(lp_a - lp_b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]
        assert a.prompt_logprobs[0] is b.prompt_logprobs[0] is None
        for (lp_a, rank_a, top_a), (lp_b, rank_b, top_b) in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:],
                                                                 strict=True):
            assert abs(lp_a - lp_b) < 1e-4 and rank_a == rank_b and [t for t, _ in top_a] == [t for t, _ in top_b]
    probe = [corpus_text(20_000)[i:i + 400] for i in range(0, 4000, 1000)]
    assert abs(vllm.score(probe) - native.score(probe)) < 1e-4


def test_stop_strings_aborts_and_the_async_front(engines):
    vllm, native = engines
    whole = native.generate(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0))
    stop = whole[8:11]
    params = SamplingParams(max_tokens=24, temperature=0, stop=[stop])
    out = vllm.complete_batch([PROMPTS[1]], params, timeout=120)[0]
    assert out.finish_reason == "stop" and out.text == whole[:whole.index(stop)]
    assert out.text == native.complete_batch([PROMPTS[1]], params)[0].text

    async def stream_then_abort():
        handle = vllm.submit(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        first = await handle.__anext__()
        handle.abort()
        outs = [first, *[out async for out in handle]]
        return first, outs[-1]

    first, last = asyncio.run(stream_then_abort())
    assert first.token_ids and last.finished and last.finish_reason == "abort" and last.completion_tokens < 200
    poll(lambda: not vllm.has_unfinished(), 30, "the aborted request to leave the engine")
    # aborted as soon as added (before vLLM saw them): each still finishes, and leaves the engine
    got: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(8):
        vllm.abort(vllm.add_request(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0), sink=got.put))
    ends = []
    while len(ends) < 8:
        out = got.get(timeout=60)
        if out.finished:
            ends.append(out.finish_reason)
    assert ends == ["abort"] * 8 and not vllm.has_unfinished()
    vllm.check_health()
    stats = vllm.stats()
    assert set(native.stats()) <= set(stats)  # the replica's metrics and gauges read the same names
    assert stats["generated_tokens"] > 0 and stats["requests_finished"] >= 1 and stats["steps"] > 0


def test_options_vllm_does_not_take_are_refused_by_name(export_a):
    refused = [({"quantization": "int8"}, "quantization"), ({"kv_cache_layout": "slots"}, "kv_cache_layout"),
               ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"), ({"max_loras": 2}, "adapters")]
    for options, words in refused:
        with pytest.raises(ValueError, match=words):
            EngineConfig.from_options(backend="vllm", **options)
    with pytest.raises(ValueError, match="backend must be one of"):
        EngineConfig.from_options(backend="tgi")


@pytest.fixture(scope="module")
def app(export_a, export_b, export_corrupt, tmp_path_factory):
    import yaml
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from moe_platform.cluster import registry
    from tinyrun import REPO

    port = free_port()
    audit = tmp_path_factory.mktemp("vllm_audit") / "audit.jsonl"
    probe = tmp_path_factory.mktemp("vllm_probe") / "held_out.txt"
    probe.write_text("\n\n".join(corpus_text(200_000)[150_000 + i * 400:150_000 + i * 400 + 300] for i in range(8)))
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    spec = config["applications"][0]
    spec["args"].update(model=str(export_a), version="stable", versions={"corrupt": str(export_corrupt)},
                        api_key=API_KEY, admin_api_key=ADMIN, audit_log=str(audit), metrics_interval_s=0.25)
    spec["args"]["engine"].update(backend="vllm", max_batch_size=8)
    deployment = spec["deployments"][0]
    deployment.pop("autoscaling_config", None)
    deployment.update(num_replicas=1, user_config={})
    deployment.setdefault("ray_actor_options", {})["num_cpus"] = 1
    with local_ray(num_cpus=4):
        try:
            registry.publish_export(export_b, "vllm-green")
            client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
            client.deploy_apps(ServeDeploySchema.model_validate(config))  # two vLLM engines start: > 60 s here
            poll(lambda: serve.status().applications[MODEL].status == "RUNNING", 600, "the app")
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                headers={"Authorization": f"Bearer {API_KEY}"})
            yield {"http": http, "audit": audit, "probe": probe, "port": port}
        finally:
            serve.shutdown()


def admin() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def test_openai_requests_through_the_vllm_backend(app, export_a):
    http = app["http"]
    assert httpx.post(f"http://127.0.0.1:{app['port']}/v1/completions", json={"model": MODEL, "prompt": "x"}
                      ).status_code == 401
    want = Engine.from_pretrained(export_a).generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0))
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200 and r.headers["x-model-version"] == "stable", r.text
    assert r.json()["choices"][0]["text"] == want and r.json()["usage"]["completion_tokens"] == 12
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0,
                                           "stream": True})
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c["choices"]) == want
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 10_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text  # our validation, first
    r = http.post("/v1/completions", json={"model": f"{MODEL}:some-adapter", "prompt": "x", "max_tokens": 4})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    # sampled requests, many at once: vLLM's CPU sampler would fail its whole engine on a seeded one (refused)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, "seed": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text

    async def sampled() -> list[int]:
        async with httpx.AsyncClient(base_url=str(http.base_url), headers=dict(http.headers), timeout=120) as client:
            body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "top_k": 10**9}
            return [r.status_code for r in await asyncio.gather(*(client.post("/v1/completions", json=body)
                                                                  for _ in range(16)))]

    assert asyncio.run(sampled()) == [200] * 16
    assert http.get("/health").status_code == 200


def test_a_quality_rollback_then_a_blue_green_switch_to_a_registry_version(app):
    http = app["http"]
    quality = {"quality": {"file": str(app["probe"]), "max_loss_increase": 0.5}}
    with Load(str(http.base_url), clients=3, headers={"Authorization": f"Bearer {API_KEY}"}) as load:
        poll(lambda: load.statuses[200] >= 10, 120, "load")
        r = http.post("/admin/rollout", headers=admin(), json={"action": "start", "to": "corrupt", "steps": [10, 100],
                                                                "dwell_s": 60, "gates": quality})
        assert r.status_code == 200, r.text
        done = poll(lambda: (s := http.get("/admin/rollout", headers=admin()).json())["state"] != "running" and s,
                    120, "the canary rollout to end", 0.2)
        assert done["state"] == "rolled_back" and done["weights"] == {"stable": 100}, done
        assert done["losses"]["corrupt"] > done["losses"]["stable"] + 1, done

        start = {"action": "start", "to": "green", "source": "registry://vllm-green", "blue_green": True,
                 "dwell_s": 2, "gates": {"min_requests": 4, "max_p99_latency_ratio": 10, "max_p99_ttft_ratio": 10}}
        r = http.post("/admin/rollout", headers=admin(), json=start)
        assert r.status_code == 200 and r.json()["phase"] == "loading", r.text
        done = poll(lambda: (s := http.get("/admin/rollout", headers=admin()).json())["state"] != "running" and s,
                    240, "the blue-green switch", 0.2)
        poll(lambda: load.versions["green"] >= 4, 60, "green answers")
    assert done["state"] == "promoted" and done["weights"] == {"green": 100}, done
    assert set(load.statuses) == {200}, load.statuses  # 0 failed requests
    events = [json.loads(line)["event"] for line in app["audit"].read_text().splitlines()]
    assert events == ["start", "ready", "gate", "rollback", "start", "ready", "step", "gate", "promote"], events
    want = {"ray_moe_serve_generated_tokens_total", "ray_moe_serve_time_to_first_token_s_count",
            "ray_moe_serve_kv_cache_usage_perc"}
    got = scrape_ray_metrics(want, 'version="green"')
    assert got["ray_moe_serve_generated_tokens_total"] > 0 and got["ray_moe_serve_time_to_first_token_s_count"] > 0
