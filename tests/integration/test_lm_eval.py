"""lm-evaluation-harness against the Serve app over HTTP, and the eval gate of rollouts. lm-eval itself runs a local
multiple-choice task and a perplexity task through `local-completions` (tokenizing with the server's /tokenize):
every per-choice log-likelihood, and the perplexities, equal lm-eval's own transformers (`hf`) backend on the same
export within 1e-4, so the accuracies are equal; `moe-platform eval` gives the same scores against the URL, on the
export and on its registry version in-process; a rollout of a version that is worse on the task is rolled back by
the eval gate with the scores in the audit log, and one that is as good passes the gate at every step. One
Ray/Serve instance for the module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import httpx
import pytest

from evaltasks import (
    GENERATION,
    MULTIPLE_CHOICE,
    OFFLINE_ENV,
    PERPLEXITY,
    choice_docs,
    contexts,
    label_with,
    write_task,
)
from tinyrun import REPO, corpus_text, local_ray, poll

MODEL = "moe-platform"
ADMIN = "eval-admin-key"
TOL = 1e-4
# The eval gate alone decides: latency bounds on a few requests, beside an evaluation on the same cores, are noise.
NO_LATENCY = {"min_requests": 1, "max_p99_ttft_ratio": None, "max_p99_latency_ratio": None}


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Nothing downloads: lm-eval reads the local JSONL through `datasets`, whose cache goes to a temporary
    directory."""
    saved = dict(os.environ)
    os.environ.update(OFFLINE_ENV, HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf_datasets")))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tasks(serving_export, tmp_path_factory):
    """tiny_mc: 24 four-way choices whose right answer is the one the stable export finds most likely; tiny_ppl:
    6 passages of the corpus."""
    from moe_platform.serving.engine import Engine

    engine = Engine.from_pretrained(serving_export, batch_wait_timeout_s=0.0)
    text = corpus_text(200_000)
    root = tmp_path_factory.mktemp("tasks")
    write_task(root, "tiny_mc", choice_docs(engine, contexts(text, 24), text), MULTIPLE_CHOICE)
    label_with(engine, root, "tiny_mc")
    write_task(root, "tiny_ppl", [{"text": t} for t in contexts(text, 6, chars=400, seed=1)], PERPLEXITY)
    write_task(root, "tiny_gen", [{"context": t, "target": ""} for t in contexts(text, 6, seed=2)], GENERATION)
    return root


@pytest.fixture(scope="module")
def server(serving_export, serving_export_b, serving_port, tmp_path_factory):
    from ray import serve

    from moe_platform.serving.app import build_app

    same = tmp_path_factory.mktemp("same") / "export"
    shutil.copytree(serving_export, same)
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with local_ray(num_cpus=3) as address:
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": serving_port})
            serve.run(build_app({"model": str(serving_export), "version": "stable",
                                 "versions": {"worse": str(serving_export_b), "same": str(same)},
                                 "admin_api_key": ADMIN, "audit_log": str(audit), "metrics_interval_s": 0.25,
                                 "engine": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}}),
                      name="moe-platform", route_prefix="/")
            url = f"http://127.0.0.1:{serving_port}"
            yield {"url": url, "http": httpx.Client(base_url=url, timeout=120), "audit": audit, "address": address}
        finally:
            serve.shutdown()


def local_completions(url: str, batch_size: int):
    """lm-eval's own OpenAI-completions client on our server, as `--model local-completions` builds it."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=MODEL, max_length=256,
                               batch_size=batch_size, num_concurrent=2, max_retries=1)


@pytest.fixture(scope="module")
def hf_results(serving_export, tasks):
    """lm-eval's transformers backend on the same export: the reference."""
    from moe_platform.serving.evaluation import simple_evaluate

    return simple_evaluate("hf", ["tiny_mc", "tiny_ppl"], str(tasks), None, log_samples=True, bootstrap_iters=0,
                           model_args={"pretrained": str(serving_export), "dtype": "float32", "device": "cpu",
                                       "batch_size": 8})


def per_choice(results: dict) -> list[list[float]]:
    return [[r[0] for r in s["filtered_resps"]] for s in sorted(results["samples"]["tiny_mc"],
                                                                key=lambda s: s["doc_id"])]


def test_lm_eval_over_http_equals_its_transformers_backend(server, tasks, hf_results):
    from moe_platform.serving.evaluation import simple_evaluate

    lm = local_completions(server["url"], batch_size=4)  # batched token-id prompts: [[ids], [ids], ...]
    assert lm.tokenizer_backend == "remote"  # found /tokenizer_info and /tokenize: the server's own tokenizer
    ours = simple_evaluate(lm, ["tiny_mc", "tiny_ppl"], str(tasks), None, log_samples=True, bootstrap_iters=0)
    got, want = per_choice(ours), per_choice(hf_results)
    assert len(got) == len(want) == 24 and all(len(c) == 4 for c in got)
    worst = max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert worst < TOL, worst
    assert ours["results"]["tiny_mc"]["acc,none"] == hf_results["results"]["tiny_mc"]["acc,none"] == 1.0
    assert ours["results"]["tiny_mc"]["acc_norm,none"] == hf_results["results"]["tiny_mc"]["acc_norm,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a, b = ours["results"]["tiny_ppl"][metric], hf_results["results"]["tiny_ppl"][metric]
        assert abs(a - b) <= TOL * abs(b), (metric, a, b)


def test_generation_in_process_equals_generation_over_http(server, tasks, serving_export):
    """A generate_until task: lm-eval in-process on the engine (`EngineLM`) writes exactly what it gets from the
    server."""
    from moe_platform.serving.engine import Engine
    from moe_platform.serving.evaluation import simple_evaluate
    from moe_platform.serving.lm_eval_backend import EngineLM

    def generated(results: dict) -> list[str]:
        return [s["resps"][0][0] for s in sorted(results["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]

    engine = Engine.from_pretrained(serving_export, batch_wait_timeout_s=0.0).start()
    try:
        here = simple_evaluate(EngineLM(engine), ["tiny_gen"], str(tasks), None, log_samples=True, bootstrap_iters=0)
    finally:
        engine.shutdown()
    there = simple_evaluate(local_completions(server["url"], batch_size=3), ["tiny_gen"], str(tasks), None,
                            log_samples=True, bootstrap_iters=0)
    assert generated(here) == generated(there)
    assert len(generated(here)) == 6 and all(generated(here)), generated(here)


def test_eval_cli_scores_the_url_the_export_and_the_registry_version_alike(server, tasks, serving_export, tmp_path):
    from moe_platform.cluster.registry import publish_export

    version = publish_export(serving_export, "evaltest")
    cli = [sys.executable, "-m", "moe_platform.cli", "eval", "--tasks", "tiny_mc,tiny_ppl", "--include-path",
           str(tasks), "--limit", "12", "--bootstrap-iters", "0"]
    env = {**os.environ, "RAY_ADDRESS": server["address"]}
    scores = {}
    for name, model in (("url", server["url"]), ("export", str(serving_export)),
                        ("registry", f"registry://evaltest@{version}")):
        out = tmp_path / f"{name}.json"
        done = subprocess.run([*cli, "--model", model, "--output", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = done.stdout.strip().splitlines()[-1]
        assert summary.startswith("tiny_mc: ") and "acc=1.0000" in summary and f"results {out}" in summary
        scores[name] = json.loads(out.read_text())["results"]
        assert scores[name]["tiny_mc"]["acc,none"] == 1.0
    ppl = [scores[name]["tiny_ppl"]["word_perplexity,none"] for name in ("url", "export", "registry")]
    assert max(ppl) - min(ppl) <= TOL * min(ppl), ppl
    bad = subprocess.run([*cli[:-4], "--model", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "not an export directory" in bad.stderr


def test_tokenizer_routes_and_prompt_logprobs_shapes(server):
    http = server["http"]
    tok = http.post("/tokenize", json={"prompt": "ROMEO: speak", "add_special_tokens": False}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256 and tok["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "ROMEO: speak"}
    assert http.get("/tokenizer_info").json()["eos_token"] == "<|endoftext|>"
    for path, body, param in (("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
                               "messages"), ("/detokenize", {"tokens": [10**6]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "extra": 1}, "extra")):
        r = http.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    body = {"model": MODEL, "prompt": tok["tokens"], "echo": True, "logprobs": 2, "max_tokens": 0}
    alone = http.post("/v1/completions", json=body).json()["choices"][0]
    assert alone["text"] == "ROMEO: speak" and alone["finish_reason"] == "length"
    lp = alone["logprobs"]
    assert len(lp["tokens"]) == tok["count"] and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(len(t) <= 3 and max(t.values()) >= v for t, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:],
                                                                    strict=True))
    vllm_style = http.post("/v1/completions", json={"model": MODEL, "prompt": tok["tokens"], "max_tokens": 1,
                                                    "prompt_logprobs": 1}).json()["choices"][0]
    entries = vllm_style["prompt_logprobs"]
    assert entries[0] is None and len(entries) == tok["count"]
    for token, entry, value in zip(tok["tokens"][1:], entries[1:], lp["token_logprobs"][1:], strict=True):
        assert abs(entry[str(token)]["logprob"] - value) < 1e-6 and entry[str(token)]["rank"] >= 1


def rollout(server, spec: dict) -> dict:
    http = server["http"]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    stop = threading.Event()

    def load() -> None:  # the canary's dwell needs finished requests
        with httpx.Client(base_url=server["url"], timeout=120) as client:
            while not stop.is_set():
                client.post("/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2})

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        r = http.post("/admin/rollout", headers=auth, json={"action": "start", **spec})
        assert r.status_code == 200, r.text
        return poll(lambda: (s := http.get("/admin/rollout", headers=auth).json())["state"] != "running" and s,
                    300, "the rollout to finish", 0.5)
    finally:
        stop.set()
        thread.join(60)


def test_a_version_worse_on_the_task_is_rolled_back_by_the_eval_gate(server, tasks):
    gate = {"task": "tiny_mc", "include_path": str(tasks), "limit": 24, "max_drop": 0.1}
    done = rollout(server, {"to": "worse", "steps": [50, 100], "dwell_s": 0, "gates": {**NO_LATENCY, "eval": gate}})
    assert done["state"] == "rolled_back" and done["weights"] == {"stable": 100}, done
    assert done["reason"].startswith("eval gate: tiny_mc acc,none"), done["reason"]
    events = [json.loads(line) for line in server["audit"].read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "ready", "gate", "rollback"]
    scores = events[2]["scores"]
    assert events[2]["gate"] == "eval" and events[2]["passed"] is False and events[2]["documents"] == 24
    assert scores["stable"] == 1.0 and scores["worse"] < 0.9, scores


def test_a_version_as_good_passes_the_eval_gate_at_every_step(server, tasks):
    before = len(server["audit"].read_text().splitlines())
    gate = {"task": "tiny_mc", "include_path": str(tasks), "limit": 8, "max_drop": 0.0}
    done = rollout(server, {"to": "same", "steps": [50, 100], "dwell_s": 0, "gates": {**NO_LATENCY, "eval": gate}})
    assert done["state"] == "promoted" and done["weights"] == {"same": 100}, done
    events = [json.loads(line) for line in server["audit"].read_text().splitlines()[before:]]
    evals = [e for e in events if e.get("gate") == "eval"]
    assert len(evals) == 2 and all(e["passed"] and e["scores"] == {"stable": 1.0, "same": 1.0} for e in evals)
    kinds = [(e["event"], e.get("gate")) for e in events]
    assert kinds == [("start", None), ("ready", None), ("gate", "eval"), ("step", None), ("gate", "metrics"),
                     ("gate", "eval"), ("step", None), ("gate", "metrics"), ("promote", None)], kinds
