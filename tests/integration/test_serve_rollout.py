"""Rollouts in a real Serve app under a steady loopback load, with 0 failed client requests throughout:
- a version with corrupted weights, started by `serve deploy` with a `rollout:` section, is rolled back by the
  quality probe;
- a slow version, started with `moe-platform rollout start`, is rolled back by the latency gates within its first
  dwell;
- refusals over the authenticated admin route (no key, unknown version, another base model, a second rollout)
  leave the split as it is;
- a blue-green switch to a version loaded on demand moves all traffic once it is healthy on both replicas.
Every event lands in the audit log and the rollout metrics. One Ray/Serve instance for the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from hotswap import Load, serve_config  # noqa: E402
from moe_platform.checkpoint.hf import export_hf  # noqa: E402
from moe_platform.model.args import ModelArgs  # noqa: E402
from moe_platform.model.transformer import build_model  # noqa: E402
from moe_platform.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402
from tinyrun import REPO, corpus_text, local_ray, poll, scrape_ray_metrics  # noqa: E402

MODEL = "moe-platform"
ADMIN = "rollout-admin-key"


@pytest.fixture(scope="module")
def versions(serving_export, serving_tokenizer_dir, make_tiny_export, tmp_path_factory) -> dict[str, Path]:
    """stable (the tiny export), corrupt (its output head scaled 30x: fluent-looking garbage), slow (same tokenizer,
    a much larger model) and other (another tokenizer: another base model)."""
    root = tmp_path_factory.mktemp("rollout_versions")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    for f in serving_export.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    weights = load_file(corrupt / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 30
    save_file(weights, corrupt / "model.safetensors", metadata={"format": "pt"})
    vocab = load_tokenizer(serving_tokenizer_dir).get_vocab_size()
    big = ModelArgs(vocab_size=vocab, dim=384, n_layers=8, n_heads=8, n_kv_heads=4, intermediate_size=768,
                    num_experts=8, top_k=2, max_seq_len=256, init_std=0.1)
    slow = export_hf(build_model(big, seed=2).state_dict(), big, root / "slow", tokenizer_dir=serving_tokenizer_dir)
    text = corpus_text(60_000)
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 384)
    other = make_tiny_export(save_tokenizer(tok, root / "tok384", model_max_length=256), root / "other",
                         seed=3)
    return {"stable": serving_export, "corrupt": corrupt, "slow": slow, "other": other}


@pytest.fixture(scope="module")
def app(versions, serving_port, tmp_path_factory):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    audit = tmp_path_factory.mktemp("rollout_audit") / "audit.jsonl"
    probe = tmp_path_factory.mktemp("rollout_probe") / "held_out.txt"
    probe.write_text("\n\n".join(corpus_text(200_000)[150_000 + i * 400:150_000 + i * 400 + 300] for i in range(8)))

    def config(rollout: dict | None = None, traffic: dict | None = None) -> dict:
        cfg = serve_config(versions["stable"], serving_port)
        spec = cfg["applications"][0]
        spec["args"].update(version="stable", versions={k: str(v) for k, v in versions.items() if k != "stable"},
                            admin_api_key=ADMIN, audit_log=str(audit), metrics_interval_s=0.25)
        deployment = spec["deployments"][0]
        deployment.pop("autoscaling_config", None)
        user_config = {**({"rollout": rollout} if rollout else {}), **({"traffic": traffic} if traffic else {})}
        deployment.update(num_replicas=2, user_config=user_config)
        deployment.setdefault("ray_actor_options", {})["num_cpus"] = 1
        return cfg

    with local_ray(num_cpus=4) as address:
        try:
            client = serve_api.serve_start(http_options=config()["http_options"], proxy_location="HeadOnly")

            def deploy(rollout: dict | None = None, traffic: dict | None = None) -> None:
                client.deploy_apps(ServeDeploySchema.model_validate(config(rollout, traffic)), _blocking=True)

            deploy()
            http = httpx.Client(base_url=f"http://127.0.0.1:{serving_port}", timeout=120)
            poll(lambda: http.get("/admin/rollout", headers=auth()).json()["replicas"] == 2, 60, "both replicas")
            yield {"deploy": deploy, "http": http, "audit": audit, "probe": probe, "address": address}
        finally:
            serve.shutdown()


def auth(key: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {key}"}


def status(http: httpx.Client) -> dict:
    return http.get("/admin/rollout", headers=auth()).json()


def finished(http: httpx.Client, timeout_s: float) -> dict:
    return poll(lambda: (s := status(http))["state"] != "running" and s, timeout_s, "the rollout to finish", 0.2)


def audit_events(app) -> list[dict]:
    return [json.loads(line) for line in app["audit"].read_text().splitlines()]


def test_corrupted_weights_are_rolled_back_by_the_quality_probe(app):
    http = app["http"]
    with Load(str(http.base_url)) as load:
        poll(lambda: load.statuses[200] >= 20, 60, "load")
        app["deploy"]({"to": "corrupt", "steps": [5, 25, 100], "dwell_s": "60s",
                       "gates": {"quality": {"file": str(app["probe"]), "max_loss_increase": 0.5}}})
        done = finished(http, 60)
    assert done["state"] == "rolled_back" and done["weights"] == {"stable": 100}, done
    assert "quality probe: mean loss" in done["reason"] and done["losses"]["corrupt"] > done["losses"]["stable"] + 1
    assert set(load.statuses) == {200}, load.statuses  # 0 failed requests
    events = audit_events(app)
    assert [e["event"] for e in events] == ["start", "ready", "gate", "rollback"]
    assert events[0]["by"] == "serve deploy" and events[-1]["by"] == "controller"
    assert events[-1]["reason"] == done["reason"]


def test_a_slow_version_is_rolled_back_by_latency_within_one_dwell(app):
    http = app["http"]
    env = {**os.environ, "RAY_ADDRESS": app["address"]}
    cli = [sys.executable, "-m", "moe_platform.cli", "rollout"]
    with Load(str(http.base_url)) as load:
        poll(lambda: load.statuses[200] >= 20, 60, "load")
        started = subprocess.run([*cli, "start", "--to", "slow", "--steps", "20,100", "--dwell", "120s",
                                  "--min-requests", "15", "--max-p99-latency-ratio", "1.5"], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["weights"] == {"stable": 80, "slow": 20}
        done = finished(http, 110)  # within the first dwell
    assert done["state"] == "rolled_back" and done["step"] == 1 and "p99" in done["reason"], done
    assert done["canary"]["requests"] >= 15 and load.versions["slow"] >= 15
    assert set(load.statuses) == {200}, load.statuses
    shown = subprocess.run([*cli, "status"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert json.loads(shown.stdout)["reason"] == done["reason"]
    events = [e for e in audit_events(app) if e.get("version") == "slow"]
    assert [e["event"] for e in events] == ["start", "ready", "step", "gate", "rollback"]
    assert events[0]["by"].startswith("cli:") and events[-2]["passed"] is False
    again = subprocess.run([*cli, "promote"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "no rollout is running to promote" in again.stderr


def test_a_bad_config_change_is_recorded_and_changes_nothing(app):
    """A `serve deploy` with a split that does not sum to 100 and a rollout section with a bad step list: the
    replicas stay up (Serve would restart a replica whose reconfigure fails), the split stays, and each refusal is
    recorded once with its reason."""
    from ray import serve

    http = app["http"]
    before = status(http)
    replicas = serve.status().applications["moe-platform"].deployments["MoEServer"].replica_states
    app["deploy"]({"to": "slow", "steps": [50]}, traffic={"stable": 60, "slow": 30})
    refused = [e for e in audit_events(app) if e["event"] == "refused"]
    assert [e["reason"] for e in refused] == [
        "user_config.traffic is not applied: traffic weights must sum to 100, got 90 ({'stable': 60, 'slow': 30})",
        "invalid rollout: rollout: the last step must be 100 (the new version takes all traffic), got [50]"]
    assert all(e["by"] == "serve deploy" for e in refused)
    after = status(http)
    assert (after["state"], after["weights"], after["generation"]) == (before["state"], before["weights"],
                                                                      before["generation"])
    assert after["last_refusal"] in {e["reason"] for e in refused}  # the replicas report in any order
    assert serve.status().applications["moe-platform"].deployments["MoEServer"].replica_states == replicas
    assert Counter(completion_version(http) for _ in range(10)) == {"stable": 10}
    app["deploy"]()


def test_refusals_and_a_blue_green_switch_with_no_failed_request(app, serving_export_b):
    http = app["http"]
    start = {"action": "start", "to": "green", "source": str(serving_export_b), "blue_green": True, "dwell_s": 3,
             "gates": {"min_requests": 10, "max_p99_latency_ratio": 10, "max_p99_ttft_ratio": 10}}
    before = status(http)
    refusals = [
        (http.post("/admin/rollout", json=start), 401, "invalid_api_key"),
        (http.get("/admin/rollout", headers=auth("wrong")), 401, "invalid_api_key"),
        (http.post("/admin/rollout", headers=auth(), json={**start, "to": "v9", "source": None}), 404,
         "model_not_found"),
        (http.post("/admin/rollout", headers=auth(), json={**start, "to": "other", "source": None}), 400,
         "version_base_mismatch"),
        (http.post("/admin/rollout", headers=auth(), json={**start, "steps": [5, 100]}), 400, "invalid_rollout"),
        (http.post("/admin/rollout", headers=auth(), content=b"{not json"), 400, "invalid_json"),
        (http.post("/admin/rollout", headers=auth(), json={"action": "traffic", "weights": {"stable": 80, "slow": 10}}),
         400, "invalid_rollout"),
        (http.post("/admin/rollout", headers=auth(), json={"action": "traffic", "weights": {"stable": 90, "v9": 10}}),
         404, "model_not_found"),
        (http.post("/admin/rollout", headers=auth(), json={"action": "deploy"}), 400, None),
    ]
    for r, code, error_code in refusals:
        assert r.status_code == code and r.json()["error"]["code"] == error_code, r.text
    message = refusals[3][0].json()["error"]["message"]
    assert message.startswith("version 'other' is for another base model than 'stable': ") and \
        "vocab_size 384 vs 512" in message and "ray::" not in message, message
    assert status(http)["generation"] == before["generation"]

    with Load(str(http.base_url)) as load:
        poll(lambda: load.statuses[200] >= 20, 60, "load")
        r = http.post("/admin/rollout", headers=auth(), json=start)
        assert r.status_code == 200 and r.json()["phase"] == "loading", r.text
        second = http.post("/admin/rollout", headers=auth(), json={**start, "to": "slow", "source": None})
        assert second.status_code == 409 and second.json()["error"]["code"] == "rollout_in_progress"
        done = finished(http, 120)
        served = Counter(completion_version(http) for _ in range(10))
    assert done["state"] == "promoted" and done["weights"] == {"green": 100}, done
    assert served == {"green": 10} and load.versions["green"] >= 10 and load.versions["stable"] >= 20
    assert set(load.statuses) == {200}, load.statuses
    events = [e for e in audit_events(app) if e.get("version") == "green"]
    assert [e["event"] for e in events] == ["start", "ready", "step", "gate", "promote"]
    assert events[0]["by"] == "admin-route:admin" and "loaded and healthy on 2 replica(s)" in events[1]["reason"]

    want = {"ray_moe_serve_rollout_state": 2.0, "ray_moe_serve_rollout_weight": 100.0,
            "ray_moe_serve_rollout_rollbacks_total": 2.0}
    poll(lambda: scrape_ray_metrics(set(want), f'model="{MODEL}"') == want, 60, f"rollout metrics {want}")


def completion_version(http: httpx.Client) -> str:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.headers["x-model-version"]


def test_a_finished_training_run_rolls_its_published_version_out(app, versions, tmp_path):
    """`[rollout] auto = true` with `checkpoint.publish_to`: fine-tune the stable version for two steps; the run
    publishes its export to the registry and starts a blue-green rollout of it, which the replicas load from the
    object store and which takes all traffic once its gates hold."""
    from moe_platform.cli import main

    http = app["http"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(40_000))
    overrides = {"run.name": "finetuned", "run.storage_path": str(tmp_path / "runs"), "init.from_hf":
                 str(versions["stable"]), "data.path": str(corpus), "data.cache_dir": str(tmp_path / "cache"),
                 "train.steps": 2, "train.warmup": 0, "train.global_batch_size": 2, "train.micro_batch_size": 2,
                 "train.seq_len": 32, "train.eval_interval": 0, "checkpoint.interval": 0,
                 "checkpoint.publish_to": "finetuned", "rollout.auto": "true", "rollout.blue_green": "true",
                 "rollout.dwell": "1s"}
    assert main(["train", "--config", str(REPO / "jobs" / "configs" / "tiny.toml"), "--no-progress",
                 *[f"--{k}={v}" for k, v in overrides.items()]]) == 0
    assert status(http)["to"] == "finetuned-1"
    with Load(str(http.base_url)) as load:
        done = finished(http, 120)
    assert done["state"] == "promoted" and done["weights"] == {"finetuned-1": 100}, done
    assert set(load.statuses) == {200} and load.versions["finetuned-1"] > 0, load.statuses
    events = [e for e in audit_events(app) if e.get("version") == "finetuned-1"]
    assert events[0]["event"] == "start" and events[0]["by"] == "training:finetuned"
    assert events[0]["source"] == "registry://finetuned@1"
