"""Switching a deployed model under load, shared by the hot-update and registry tests: serve/config.yaml with a given
model, one OpenAI completion (streamed or not) reduced to (status, text), and the switch itself while clients keep
sending requests; and a steady load of clients for rollouts (`Load`). A module of its own (not conftest) so test
files in every folder can import it by a unique name."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
PROMPT = "KING RICHARD:\nNow is the winter"
BODY = {"model": "moe-platform", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
CLIENTS = 6
MAX_REQUESTS_PER_CLIENT = 300
SWITCH_DEADLINE_S = 120


def serve_config(model: str | Path, port: int, user_model: str | Path | None = None) -> dict:
    """serve/config.yaml on `port`, built on `model`, with `user_config.model` (default: the same model)."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["model"] = str(model)
    app["args"]["engine"].update(max_batch_size=8, batch_wait_timeout_s=0.0)
    app["deployments"][0]["user_config"] = {"model": str(user_model if user_model is not None else model)}
    return config


def completion(http: httpx.Client, stream: bool) -> tuple[int, str]:
    """POST BODY to /v1/completions: (status, completion text); a stream that breaks off counts as status 599."""
    r = http.post("/v1/completions", json={**BODY, "stream": stream})
    if r.status_code != 200 or not stream:
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return 599, r.text
    return 200, "".join(c["choices"][0]["text"] for c in map(json.loads, events[:-1]) if c["choices"])


def switch_under_load(url: str, switch: Callable[[], None], old_text: str, new_text: str) -> None:
    """With CLIENTS clients sending completions (every other one streamed), check that `old_text` answers, call
    `switch()` (which starts the model change without waiting for it), and wait until `new_text` answers. Every
    request before, during and after must succeed, and every answer must come whole from one of the two models."""
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
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert completion(http, stream=False) == (200, old_text)
            switch()
            deadline = time.monotonic() + SWITCH_DEADLINE_S
            switched = False
            while not switched and time.monotonic() < deadline:
                status, text = completion(http, stream=False)
                assert status == 200, text
                switched = text == new_text
            assert switched, f"the new model never answered within {SWITCH_DEADLINE_S} s"
            after = [completion(http, stream=s) for s in (False, True, False)]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)

    assert after == [(200, new_text)] * 3
    failures = [r for r in results if r[0] != 200]
    assert not failures, failures[:3]
    assert {text for _, text in results} <= {old_text, new_text}  # each answer wholly from one model
    assert len(results) >= CLIENTS


class Load:
    """Clients sending completions until stopped (every third one streamed); counts statuses (a stream that breaks
    off counts as "broken STATUS") and the versions that answered."""

    def __init__(self, base_url: str, clients: int = 4, headers: dict | None = None, model: str = "moe-platform"):
        self.base_url, self.clients, self.headers, self.model = base_url, clients, headers or {}, model
        self.statuses: Counter = Counter()
        self.versions: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=120, headers=self.headers) as http:
            async def client(k: int) -> None:
                n = 0
                while not self._stop.is_set():
                    n += 1
                    body = {"model": self.model, "prompt": "ROMEO:", "max_tokens": 8, "stream": n % 3 == k % 3}
                    r = await http.post("/v1/completions", json=body)
                    ok = r.status_code == 200 and (not body["stream"] or r.text.rstrip().endswith("data: [DONE]"))
                    self.statuses[r.status_code if ok else f"broken {r.status_code}"] += 1
                    self.versions[r.headers.get("x-model-version")] += 1
            await asyncio.gather(*(client(k) for k in range(self.clients)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(120)
