"""Hot model update: deploy serve/config.yaml, then change `user_config.model` while clients keep sending requests.
No request may fail, every answer comes whole from one of the two exports, and the new weights answer afterwards."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray")

from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPT = "KING RICHARD:\nNow is the winter"
BODY = {"model": "moe-platform", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
CLIENTS = 6
MAX_REQUESTS_PER_CLIENT = 300
SWITCH_DEADLINE_S = 120


def config_for(model: Path, port: int) -> dict:
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(model=str(model), max_batch_size=8, batch_wait_timeout_s=0.0)
    app["deployments"][0]["user_config"] = {"model": str(model)}
    return config


@pytest.fixture(scope="module")
def deployed(serving_export, serving_port):
    """serve/config.yaml deployed the way `serve run`/`serve deploy` do (a config pushed to the controller)."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        config = config_for(serving_export, serving_port)
        client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")

        def deploy(cfg: dict, blocking: bool) -> None:
            client.deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=blocking)

        deploy(config, blocking=True)
        yield deploy, f"http://127.0.0.1:{serving_port}"
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def completion(http: httpx.Client, stream: bool) -> tuple[int, str]:
    r = http.post("/v1/completions", json={**BODY, "stream": stream})
    if r.status_code != 200 or not stream:
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return 599, r.text  # a stream that broke off counts as a failure
    return 200, "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c["choices"])


def test_hot_update_under_load_drops_nothing(deployed, serving_export, serving_export_b, serving_port):
    deploy, url = deployed
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    old_text = Engine.from_pretrained(serving_export).generate(PROMPT, greedy)
    new_text = Engine.from_pretrained(serving_export_b).generate(PROMPT, greedy)
    assert old_text != new_text

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for n in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    break
                results.append(completion(http, stream=(i + n) % 2 == 0))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=url, timeout=60) as http:
        assert completion(http, stream=False) == (200, old_text)
        deploy(config_for(serving_export_b, serving_port), blocking=False)  # only user_config.model changes
        deadline = time.monotonic() + SWITCH_DEADLINE_S
        switched = False
        while not switched and time.monotonic() < deadline:
            status, text = completion(http, stream=False)
            assert status == 200, text
            switched = text == new_text
        assert switched, "the new export never answered"
        after = [completion(http, stream=s) for s in (False, True, False)]
    stop.set()
    for t in threads:
        t.join(timeout=120)

    assert after == [(200, new_text)] * 3
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    assert {text for _, text in results} <= {old_text, new_text}  # each answer wholly from one model
    assert len(results) >= CLIENTS

    from ray import serve

    status = serve.status().applications["moe-platform"]
    assert status.status == "RUNNING"
    assert status.deployments["MoEServer"].replica_states == {"RUNNING": 1}  # updated in place, not replaced
