"""Several model versions in one Serve app, over real HTTP: requests split by `traffic` (the observed fractions match
the weights within 3 points over 2,000 requests), `MODEL@VERSION` pins a version, `X-Session-Id` keeps a
conversation on one version on every replica, and `user_config.traffic` moves the split without a restart (the
`serve deploy` path). One Ray/Serve instance for the module."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest

from hotswap import serve_config  # noqa: E402
from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402
from moe_platform.serving.traffic import TrafficSplit  # noqa: E402
from tinyrun import local_ray, poll  # noqa: E402

MODEL = "moe-platform"
PROMPT = "ROMEO:"


def versions_config(export_a, export_b, port: int, traffic: dict[str, int]) -> dict:
    """serve/config.yaml serving export_a as v1 and export_b as v2 on two replicas, the split in user_config."""
    config = serve_config(export_a, port)
    app = config["applications"][0]
    app["args"].update(version="v1", versions={"v2": str(export_b)}, traffic={"v1": 80, "v2": 20})
    deployment = app["deployments"][0]
    deployment.pop("autoscaling_config", None)
    deployment.update(num_replicas=2, user_config={"traffic": traffic})
    deployment.setdefault("ray_actor_options", {})["num_cpus"] = 1
    return config


@pytest.fixture(scope="module")
def deployed(serving_export, serving_export_b, serving_port):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    with local_ray(num_cpus=4):
        try:
            config = versions_config(serving_export, serving_export_b, serving_port, {"v1": 80, "v2": 20})
            client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")

            def deploy(traffic: dict[str, int]) -> None:
                cfg = versions_config(serving_export, serving_export_b, serving_port, traffic)
                client.deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=True)

            deploy({"v1": 80, "v2": 20})
            yield deploy, httpx.Client(base_url=f"http://127.0.0.1:{serving_port}", timeout=120)
        finally:
            serve.shutdown()


def completion(http: httpx.Client, model: str = MODEL, session: str | None = None, stream: bool = False):
    headers = {"X-Session-Id": session} if session else {}
    return http.post("/v1/completions", headers=headers, json={
        "model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": stream})


def served_fractions(base_url: str, n: int, concurrency: int = 16) -> Counter:
    async def run() -> Counter:
        counts: Counter = Counter()
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            async def worker(k: int) -> None:
                for _ in range(k):
                    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1})
                    assert r.status_code == 200, r.text
                    counts[r.headers["x-model-version"]] += 1
            await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        return counts

    return asyncio.run(run())


def test_requests_split_by_weight_and_pins_and_sessions_hold(deployed, serving_export, serving_export_b):
    _, http = deployed
    counts = served_fractions(str(http.base_url), 2000)
    assert sum(counts.values()) == 2000
    assert abs(100 * counts["v1"] / 2000 - 80) <= 3 and abs(100 * counts["v2"] / 2000 - 20) <= 3, counts

    # a pin answers from that version's own weights, streamed or not
    greedy = SamplingParams(max_tokens=6, temperature=0)
    want = {"v1": Engine.from_pretrained(serving_export).generate(PROMPT, greedy),
            "v2": Engine.from_pretrained(serving_export_b).generate(PROMPT, greedy)}
    assert want["v1"] != want["v2"]
    for version, text in want.items():
        r = completion(http, f"{MODEL}@{version}")
        assert r.status_code == 200 and r.headers["x-model-version"] == version
        assert r.json()["choices"][0]["text"] == text and r.json()["model"] == f"{MODEL}@{version}"
        r = completion(http, f"{MODEL}@{version}", stream=True)
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.headers["x-model-version"] == version and events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c["choices"]) == text

    # every request of a session goes to the version its id hashes to, whichever replica takes it
    split = TrafficSplit.of({"v1": 80, "v2": 20}, ["v1", "v2"])
    for i in range(12):
        session = f"conversation-{i}"
        seen = {completion(http, session=session).headers["x-model-version"] for _ in range(4)}
        assert seen == {split.choose(session)}, session

    for model in (f"{MODEL}@v9", "other@v1"):
        r = completion(http, model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_user_config_traffic_moves_the_split_without_a_restart(deployed):
    from ray import serve

    deploy, http = deployed
    replicas = serve.status().applications["moe-platform"].deployments["MoEServer"].replica_states
    deploy({"v1": 0, "v2": 100})
    assert {completion(http).headers["x-model-version"] for _ in range(20)} == {"v2"}
    assert completion(http, f"{MODEL}@v1").headers["x-model-version"] == "v1"  # still loaded, pinned on demand
    assert serve.status().applications["moe-platform"].deployments["MoEServer"].replica_states == replicas
    deploy({"v1": 80, "v2": 20})
    poll(lambda: "v1" in {completion(http).headers["x-model-version"] for _ in range(10)}, 30, "v1 back in the split")


def test_bad_version_arguments_are_refused_before_deploying(serving_export, serving_export_b):
    from moe_platform.serving.app import build_app

    base = {"model": str(serving_export), "version": "v1", "versions": {"v2": str(serving_export_b)}}
    for bad, match in [({"traffic": {"v1": 80, "v2": 10}}, r"must sum to 100, got 90"),
                       ({"traffic": {"v1": 80, "v3": 20}}, r"unknown version\(s\) \['v3'\]"),
                       ({"versions": {"v1": str(serving_export_b)}}, r"differ from version 'v1'"),
                       ({"versions": {"v2": "/nonexistent/export"}}, r"/nonexistent/export has no config.json")]:
        with pytest.raises(ValueError, match=match):
            build_app({**base, **bad})
