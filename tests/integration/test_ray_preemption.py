"""Spot preemption on a real two-node Ray (ray.cluster_utils.Cluster: a head and a worker raylet, 1 CPU each), from
the cloud's reclaim notice on.

An elastic dp run (1..2 workers) trains on both nodes. The worker node's spot agent (`moe-platform spot-agent`, the
process cluster.yaml starts on every worker) polls an AWS instance-metadata server (IMDSv2, real HTTP on loopback);
the cloud publishes a spot `terminate` instance-action there; the agent drains its node through Ray's drain API with
reason preemption and the notice's deadline; Ray Train tells the workers, which write a just-in-time checkpoint; right
after it commits (not at the deadline) Ray Train restarts the run on the one worker left, while the draining node
is still there, and it resumes from that checkpoint (resharded from dp2 to dp1) and finishes with every step logged
exactly once: 0 lost steps. At the deadline the node vanishes. One cluster for the module."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a hung cluster fails, never stalls

from moe_platform.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from moe_platform.train.ray_launcher import launch_ray  # noqa: E402
from tinyrun import (  # noqa: E402
    FakeCloud,
    last_logged_step,
    logged_steps,
    node_cluster,
    poll,
    run_events,
    scrape_ray_metrics,
)

STEPS = 150
DRAIN_AFTER_STEP = 3
DRAIN_DEADLINE_S = 20  # long enough that a restart which waited for it would show


@pytest.fixture(scope="module")
def two_nodes():
    with node_cluster(head_cpus=1, worker_cpus=1) as cluster:
        yield cluster, next(iter(cluster.worker_nodes))


@pytest.fixture()
def spot_agent(two_nodes):
    """The worker node's spot agent, watching the fake cloud's IMDSv2 (both nodes share this machine's IP, so it is
    told its node id)."""
    cluster, node = two_nodes
    with FakeCloud() as cloud:
        agent = cloud.start_agent(cluster.address, node.node_id)
        try:
            yield cloud, agent
        finally:
            agent.kill()
            agent.wait(timeout=30)


def preempt_node(cluster, node, cloud, agent, run_dir: Path, events: dict) -> None:
    """Background, as a cloud provider reclaiming a spot VM: once training runs, a spot terminate notice in the
    instance metadata, `DRAIN_DEADLINE_S` ahead; at that time the VM vanishes (no graceful shutdown)."""
    try:
        poll(lambda: last_logged_step(run_dir) >= DRAIN_AFTER_STEP, 180, "training to start")
        events["drained_at_step"] = last_logged_step(run_dir)
        deadline = cloud.publish_aws_terminate(DRAIN_DEADLINE_S + 1)
        out, err = agent.communicate(timeout=60)  # the agent exits once its drain is accepted
        events["agent"] = (agent.returncode, out, err[-2000:])
        poll(lambda: latest_checkpoint(run_dir) is not None, 60, "the just-in-time checkpoint")
        events["jit_step"] = checkpoint_step(latest_checkpoint(run_dir))
        events["jit_before_deadline"] = time.monotonic() < deadline
        poll(lambda: time.monotonic() > deadline, 60, "the drain deadline")
        events["removed_at"] = time.time()
        cluster.remove_node(node, allow_graceful=False)
        events["removed"] = True
    except BaseException as e:  # reported by the test
        events["error"] = repr(e)


def test_reclaim_notice_drains_checkpoints_and_resumes_on_fewer_workers(two_nodes, spot_agent, tiny_config,
                                                                        monkeypatch):
    cluster, worker_node = two_nodes
    cloud, agent = spot_agent
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # Ray Train's drain watcher (default 5 s)
    # Ray Train may still count the vanished node's CPU when it restarts, then waits this long (default 60 s) for a
    # worker group that cannot start before it settles for the workers there are.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    cfg = tiny_config(**{"run.name": "spot", "parallel.dp": 0, "elastic.min_workers": 1, "elastic.max_workers": 2,
                         "train.steps": STEPS, "checkpoint.interval": 0,  # only the just-in-time one before the end
                         # a preemption must not count as a failure; the grace covers noticing the vanished node (~3 s)
                         "failure.max_failures": 0, "failure.preemption_grace_s": 5})
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    events: dict = {}
    spot = threading.Thread(target=preempt_node, args=(cluster, worker_node, cloud, agent, run_dir, events),
                            daemon=True)
    spot.start()
    result = launch_ray(cfg, progress=False)
    spot.join(timeout=30)

    assert "error" not in events and events.get("removed"), events
    rc, out, err = events["agent"]
    assert rc == 0, err
    drained = json.loads(out)
    assert drained["node_id"] == worker_node.node_id and drained["provider"] == "aws"
    assert drained["kind"] == "terminate" and "draining this node" in err
    jit = events["jit_step"]
    assert events["drained_at_step"] <= jit < STEPS and events["jit_before_deadline"]
    # The run came back on the one node left, from the just-in-time checkpoint, resharded to one worker.
    assert result["final_step"] == STEPS
    assert result["world_size"] == 1 and result["layout"].startswith("dp1")
    assert result["resumed_from"] == jit
    # every rank took the stop for the preemption it was (not a resize), whichever of them saw the notice first
    history = run_events(run_dir)
    stop = max(i for i, e in enumerate(history) if e["event"] == "checkpoint_and_stop")
    assert [e["event"] for e in history[stop:]] == ["checkpoint_and_stop", "preempted", "resume"], history
    assert history[stop + 1]["step"] == jit and history[stop + 1]["deadline_ms"], history
    # The restart does not wait for the drain deadline when Ray Train's resource view already leaves the draining
    # node out (the run resumes while that node is still there). When Ray Train still counts the node, it retries a
    # two-worker group (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each) until the node is gone: a race inside Ray Train,
    # seen in 2 of 4 runs on 2 cores. Either way the resume comes within a bounded time of the node's removal.
    resumed_at, deadline_at = history[stop + 2]["time"], history[stop + 1]["deadline_ms"] / 1000
    assert deadline_at < events["removed_at"] and resumed_at < events["removed_at"] + 30, (
        resumed_at, deadline_at, events["removed_at"])
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert checkpoint_step(latest_checkpoint(run_dir)) == STEPS


def test_training_metrics_reach_prometheus(two_nodes):
    """The job's metrics as Prometheus scrapes them, the ones the alert rules (platform/prometheus/alerts.yml) read
    included: the step and its target, steps computed, step time, the last checkpoint's time."""
    from moe_platform.train.ray_worker import TrainMetrics

    metrics = TrainMetrics("metrics-check", 120)
    for step in (7, 8):
        metrics.record_step({"step": step, "loss": 2.5, "tokens_per_s": 1000.0, "mfu": 0.1, "expert_imbalance": 1.2,
                             "step_time_s": 0.25})
    metrics.checkpoint_time.set(1.7e9)
    want = {"ray_moe_train_step": 8.0, "ray_moe_train_target_steps": 120.0, "ray_moe_train_steps_total": 2.0,
            "ray_moe_train_step_seconds": 0.25, "ray_moe_train_last_checkpoint_timestamp_seconds": 1.7e9}
    assert scrape_ray_metrics(set(want), 'run="metrics-check"') == want


def test_dpo_metrics_reach_prometheus(two_nodes):
    """A DPO run's step metrics (rewards, log-probabilities, the held-out preference accuracy at eval steps) as
    Prometheus scrapes them: the gauges the worker adds for the run's objective (`Trainer.metric_gauges`)."""
    from moe_platform.post_train import DPOTrainer
    from moe_platform.train.ray_worker import TrainMetrics

    metrics = TrainMetrics("dpo-metrics-check", 40)
    metrics.add_gauges(DPOTrainer.metric_gauges)
    step = {"step": 20, "loss": 0.4, "tokens_per_s": 900.0, "mfu": 0.1, "expert_imbalance": 1.1, "step_time_s": 0.5,
            "rewards/chosen": 0.25, "rewards/rejected": -0.5, "rewards/margin": 0.75, "rewards/accuracy": 0.875,
            "logps/chosen": -40.0, "logps/rejected": -55.0, "ref_logps/chosen": -42.5, "ref_logps/rejected": -50.0,
            "val_loss": 0.375, "val_rewards/accuracy": 0.8125, "val_rewards/margin": 0.625}
    metrics.record_step(step)
    metrics.record_step({**step, "step": 21, "val_loss": None})  # a step without an evaluation keeps the last one
    want = {f"ray_{name}": step[key] for key, (name, _) in DPOTrainer.metric_gauges.items()}
    assert scrape_ray_metrics(set(want), 'run="dpo-metrics-check"') == want
