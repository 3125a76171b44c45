"""Training and serving on one Ray cluster, serving first (moe_platform.cluster.arbiter).

One 4-CPU Ray: a Serve app (serve/config.yaml, one replica of 1 CPU) and an elastic training job (1..3 workers of
1 CPU) that takes the other 3 CPUs. Clients keep sending requests while Serve is scaled to 2 replicas: the arbiter
reserves the second replica's CPU ahead of training, Ray Train resizes the job to 2 workers after a checkpoint of
the running ones, and the new replica starts on the freed CPU. Serve goes back to 1 replica and the job grows back
to 3 workers, again from a fresh checkpoint. No request fails, no training step is computed twice, every step is
logged once and the job finishes. The job publishes its export to the object-store registry, and the running Serve
app swaps it in (user_config) and answers with the trained weights."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

from hotswap import serve_config  # noqa: E402
from moe_platform.cluster import registry  # noqa: E402
from moe_platform.cluster.arbiter import ensure_arbiter, stop_arbiter  # noqa: E402
from moe_platform.serving.engine import Engine, SamplingParams  # noqa: E402
from moe_platform.train.ray_launcher import launch_ray  # noqa: E402
from tinyrun import local_ray, logged_steps, poll, run_events, start_in_background  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 500
BODY = {"model": "moe-platform", "prompt": "ROMEO:\nBut soft", "max_tokens": 8, "temperature": 0}






def _resumes(run_dir: Path, world_size: int) -> int:
    return sum(e["event"] == "resume" and e["world_size"] == world_size for e in run_events(run_dir))


def _running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("moe-platform")
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


@pytest.fixture(scope="module")
def cluster(serving_export, serving_port):
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(serving_export, serving_port)
    dep = config["applications"][0]["deployments"][0]
    dep.pop("autoscaling_config")

    def scale_serving(replicas: int, blocking: bool, model: str | None = None) -> None:
        dep["num_replicas"] = replicas
        if model is not None:
            dep["user_config"] = {"model": model}
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=blocking)

    with local_ray(num_cpus=4):
        client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
        try:
            ensure_arbiter(interval_s=0.5)
            scale_serving(1, blocking=True)
            yield scale_serving, f"http://127.0.0.1:{serving_port}"
        finally:
            stop_arbiter()
            serve.shutdown()


def test_serving_scale_up_shrinks_training_and_scale_down_grows_it_back(cluster, tiny_config):
    scale_serving, url = cluster
    cfg = tiny_config(**{"run.name": "shared", "parallel.dp": 0, "elastic.min_workers": 1, "elastic.max_workers": 3,
                         "elastic.resize_interval_s": 1, "train.steps": STEPS, "train.global_batch_size": 12,
                         "checkpoint.interval": 0, "failure.max_failures": 0, "checkpoint.publish_to": "shared"})
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    answered, failed = [], []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/v1/completions", json=BODY)
                    (answered if r.status_code == 200 else failed).append(r.status_code)
                except httpx.HTTPError as e:
                    failed.append(repr(e))

    trainer, out = start_in_background(lambda: launch_ray(cfg, progress=False,
                                                                    on_export=registry.export_publisher(cfg)))
    poll(lambda: [e for e in run_events(run_dir) if e["event"] == "start"] or "error" in out, 180, "training to start")
    assert run_events(run_dir)[0]["world_size"] == 3, run_events(run_dir)  # all CPUs Serve does not need
    clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        scale_serving(2, blocking=False)
        poll(lambda: _resumes(run_dir, 2) >= 1 or "result" in out or "error" in out, 180, "training to shrink")
        poll(lambda: _running_replicas() == 2, 120, "the second replica to run")
        served_at_two = len(answered)
        scale_serving(1, blocking=False)
        poll(lambda: _resumes(run_dir, 3) >= 1 or "result" in out or "error" in out, 180, "training to grow back")
        poll(lambda: len(answered) > served_at_two, 60, "requests after the scale-down")
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
    trainer.join(timeout=300)
    assert "error" not in out, out.get("error")
    result = out["result"]

    assert failed == [] and len(answered) > 0, (failed[:5], len(answered))
    events = run_events(run_dir)
    sizes = [e["world_size"] for e in events if e["event"] in ("start", "resume")]
    assert sizes[:3] == [3, 2, 3], events
    assert all(e["lost_steps"] == 0 for e in events if e["event"] == "resume"), events
    assert result["final_step"] == STEPS
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))

    # Promotion: the job published its export; the running app swaps it in from the object store.
    published = registry.resolve("registry://shared")
    assert published.version == 1 and published.step == STEPS, published
    scale_serving(1, blocking=True, model="registry://shared@1")
    greedy = SamplingParams(max_tokens=BODY["max_tokens"], temperature=0.0)
    want = Engine.from_pretrained(result["export_dir"]).generate(BODY["prompt"], greedy)
    with httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json=BODY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
