"""Autoscaling for real, on one machine: Ray's fake multi-node provider (cluster-local.yaml) launches and terminates
worker nodes as raylets here. `scripts/cluster-up.sh` starts a token-auth head with 0 CPUs and the autoscaler, on a
copy of cluster-local.yaml with 1-CPU workers (0..2 of them) and a 30 s idle timeout; training goes in through
`ray job submit` with elastic.min_workers=1, max_workers=2, cpus_per_worker=1.

1. The cluster has no worker node at all (min_workers=0, as the spot GPU type of cluster.yaml): the job is accepted
   (its autoscaler can add nodes), the autoscaler adds a node for each of its workers, starting from zero, and the
   job SUCCEEDS with a committed final checkpoint and every step in metrics.jsonl once.
2. A job running on both nodes loses one (its raylet and everything under it SIGKILLed, as when a spot VM vanishes
   without notice): Ray Train restarts the group on the node left (shrinks to 1 worker) from the latest committed
   checkpoint, and the job still SUCCEEDS with every step once. Afterwards the idle node is terminated too: the
   cluster is back to zero worker nodes."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a hung cluster fails, never stalls

from moe_platform.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from tinyrun import (  # noqa: E402
    REPO,
    config_overrides,
    last_logged_step,
    logged_steps,
    poll,
    run_events,
    scripted_cluster,
    submit_job,
    venv_env,
)

IDLE_TIMEOUT_S = 30
MAX_WORKER_NODES = 2
STEPS = 120
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB = {"elastic.min_workers": 1, "elastic.max_workers": 2, "elastic.cpus_per_worker": 1, "elastic.resize_interval_s": 2,
       "parallel.dp": 0, "train.steps": STEPS, "train.global_batch_size": 16, "train.micro_batch_size": 4,
       "train.seq_len": 64, "model.max_seq_len": 64}


class Cluster(SimpleNamespace):
    def api(self, path: str):
        """GET on the dashboard's REST API, with the cluster's token."""
        req = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def worker_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return [n for n in nodes if not n["is_head_node"] and n["state"] == "ALIVE"]

    def job_status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    def job_logs(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}/logs")["logs"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    cfg = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    cfg["idle_timeout_minutes"] = IDLE_TIMEOUT_S / 60
    cfg["max_workers"] = MAX_WORKER_NODES
    cfg["available_node_types"]["worker"].update(min_workers=0, max_workers=MAX_WORKER_NODES, resources={"CPU": 1})
    config = state.parent / "autoscaling-test.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = venv_env({k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
                   AUTOSCALER_UPDATE_INTERVAL_S="1")  # the autoscaler's loop (default 5 s)
    # A dead node is noticed after 3 missed 1 s health checks (default 5 x 3 s).
    system = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
    with scripted_cluster(state, env, "--num-cpus=0", f"--autoscaling-config={config}",
                          f"--system-config={system}") as exports:
        c = Cluster(state=state, url=exports["MOE_DASHBOARD_URL"], env={**env, **exports},
                    token=Path(exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip())
        poll(lambda: c.api("/api/v0/nodes?limit=100") is not None, 120, "the dashboard's node list", 0.5)
        yield c


def submit(cluster: Cluster, job_id: str, cfg) -> None:
    r = submit_job(cluster.url, job_id, ["python", "jobs/train.py", "--config", "jobs/configs/tiny.toml",
                                         *config_overrides(cfg)], cluster.env)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"


def assert_succeeded_with_every_step_once(cluster: Cluster, job_id: str, run_dir: Path) -> None:
    status = cluster.job_status(job_id)
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{cluster.job_logs(job_id)[-6000:]}"
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and checkpoint_step(ckpt) == STEPS, "no committed final checkpoint"
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "export" / "model.safetensors").exists()


def kill_node_of_a_training_worker(cluster: Cluster) -> str:
    """SIGKILL the raylet of a node that hosts a Ray Train worker of this cluster, and everything under it."""
    for p in psutil.process_iter():
        try:
            ours = p.environ().get("MOE_CLUSTER_STATE") == str(cluster.state)
            if not ours or "RayTrainWorker" not in " ".join(p.cmdline()):
                continue
            raylet = p.parent()
            node_id = raylet.environ()["RAY_OVERRIDE_NODE_ID_FOR_TESTING"]  # the fake provider's id for the node
            victims = [raylet, *raylet.children(recursive=True)]
        except (psutil.Error, KeyError):
            continue
        for v in victims:
            try:
                v.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return node_id
    raise AssertionError("no Ray Train worker process of this cluster found")


def test_a_job_on_a_cluster_with_no_worker_node_makes_the_autoscaler_add_nodes(cluster, tiny_config):
    cfg = tiny_config(**{**JOB, "run.name": "grow", "checkpoint.interval": 20, "checkpoint.keep": 1})
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    assert cluster.worker_nodes() == [], "the cluster should start without worker nodes (min_workers=0)"
    job_id = f"autoscale-grow-{os.getpid()}"
    submit(cluster, job_id, cfg)
    most = 0
    end = time.monotonic() + 240
    while cluster.job_status(job_id) not in TERMINAL and time.monotonic() < end:
        most = max(most, len(cluster.worker_nodes()))
        time.sleep(0.5)
    most = max(most, len(cluster.worker_nodes()))
    assert_succeeded_with_every_step_once(cluster, job_id, run_dir)
    assert most == MAX_WORKER_NODES, "the autoscaler did not add a worker node for each of the job's workers"
    print("events:", [(e["event"], e["step"], e["world_size"]) for e in run_events(run_dir)])


def test_losing_a_node_mid_run_shrinks_the_job_which_still_succeeds(cluster, tiny_config):
    cfg = tiny_config(**{**JOB, "run.name": "shrink", "checkpoint.interval": 10, "checkpoint.keep": 2})
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    # Both nodes are still up after the first test (30 s idle timeout); if not, the job's request brings one back.
    job_id = f"autoscale-shrink-{os.getpid()}"
    submit(cluster, job_id, cfg)

    def on_two_workers_past_a_checkpoint():
        if cluster.job_status(job_id) in TERMINAL:
            raise AssertionError(f"job ended before it ran on 2 workers: {[e for e in run_events(run_dir)]}\n"
                                 f"{cluster.job_logs(job_id)[-4000:]}")
        ev, ckpt = run_events(run_dir), latest_checkpoint(run_dir)
        group = [e for e in ev if e["event"] in ("start", "resume")]
        if not group or group[-1]["world_size"] != 2 or ckpt is None or checkpoint_step(ckpt) <= group[-1]["step"]:
            return False
        return last_logged_step(run_dir) >= checkpoint_step(ckpt) + 2

    poll(on_two_workers_past_a_checkpoint, 180, "a 2-worker group past its first checkpoint", 0.1)
    killed_at, killed_time = last_logged_step(run_dir), time.time()
    assert killed_at < STEPS
    node_id = kill_node_of_a_training_worker(cluster)
    poll(lambda: cluster.job_status(job_id) in TERMINAL, 200, f"job {job_id} to end", 0.5)

    assert_succeeded_with_every_step_once(cluster, job_id, run_dir)
    ev = run_events(run_dir)
    restarts = [e for e in ev if e["event"] == "resume" and e["time"] > killed_time]
    assert restarts, f"no restart after the kill at step {killed_at}: {ev}"
    # the group shrank onto the node left, from a checkpoint committed before the kill
    assert restarts[0]["world_size"] == 1 and restarts[0]["step"] <= killed_at, (killed_at, ev)
    print(f"killed node {node_id[-5:]} at step {killed_at}; events:",
          [(e["event"], e["step"], e["world_size"]) for e in ev])
    assert node_id not in {n["node_id"] for n in cluster.worker_nodes()}
    # Idle again: the autoscaler terminates the node left (down to min_workers=0).
    poll(lambda: cluster.worker_nodes() == [], IDLE_TIMEOUT_S + 90, "scale-down to no worker node", 1.0)
