"""A GRPO learner preempted through the spot agent, on a real two-node Ray (a head and a worker raylet, 1 CPU each).

The learner runs on Ray Train as an elastic dp run (1..2 workers) with one rollout worker beside rank 0. The worker
node's spot agent reads a spot `terminate` notice from an AWS instance-metadata server (IMDSv2, real HTTP on
loopback) and drains its node; the learner writes a just-in-time checkpoint and Ray Train restarts it on the one node
left, resharded to one worker. The rollout worker went with the old rank 0; the new rank 0 starts a new one on the
checkpoint's weights. The run finishes with every step logged exactly once (no lost step), the engines' log-
probabilities equal the learner's within 1e-5 at every step after the restart as before it, and every round's
sampling seeds are the ones a run without the preemption draws (the rollout generator resumed with the checkpoint)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]  # a hung cluster fails, never stalls

from moe_platform.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from moe_platform.config import load_config  # noqa: E402
from moe_platform.post_train import GRPOTrainer  # noqa: E402
from moe_platform.train.ray_launcher import launch_ray  # noqa: E402
from tinyrun import (  # noqa: E402
    FakeCloud,
    chatml_tokenizer,
    last_logged_step,
    logged_steps,
    node_cluster,
    poll,
    run_events,
    save_tiny_hf_model,
)

STEPS = 40
DRAIN_AFTER_STEP = 4
DRAIN_DEADLINE_S = 20
GROUP = 4
PROMPTS_PER_STEP = 2
ROLLOUT_STREAM = 0x47525030


@pytest.fixture(scope="module")
def two_nodes():
    with node_cluster(head_cpus=1, worker_cpus=1) as cluster:
        yield cluster, next(iter(cluster.worker_nodes))


def preempt(cluster, node, cloud, agent, run_dir: Path, events: dict) -> None:
    """As a cloud reclaiming the spot VM once training runs: the notice, then the VM gone at its deadline."""
    try:
        poll(lambda: last_logged_step(run_dir) >= DRAIN_AFTER_STEP, 240, "training to start")
        cloud.publish_aws_terminate(DRAIN_DEADLINE_S + 1)
        out, err = agent.communicate(timeout=60)
        events["agent"] = (agent.returncode, out, err[-2000:])
        poll(lambda: latest_checkpoint(run_dir) is not None, 90, "the just-in-time checkpoint")
        events["jit_step"] = checkpoint_step(latest_checkpoint(run_dir))
        poll(lambda: any(e["event"] == "resume" for e in run_events(run_dir)), 120, "the resumed run")
        cluster.remove_node(node, allow_graceful=False)
        events["removed"] = True
    except BaseException as e:  # reported by the test
        events["error"] = repr(e)


def test_a_preempted_learner_resumes_with_no_lost_step_and_resynced_engines(two_nodes, tmp_path, monkeypatch):
    cluster, worker_node = two_nodes
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    policy = save_tiny_hf_model("Qwen3MoeForCausalLM", tmp_path / "policy", chatml_tokenizer(tmp_path / "tok"),
                                router_aux_loss_coef=0.0, output_router_logits=False)[1]
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Count: {i}", "pattern": r".*e.*"}) + "\n" for i in range(32)))
    overrides = {"run.name": "spot-grpo", "run.storage_path": tmp_path / "runs", "init.from_hf": policy,
                 "data.path": rows, "data.format": "prompts", "train.objective": "grpo", "data.val_fraction": 0,
                 "train.steps": STEPS, "train.warmup": 0, "train.global_batch_size": PROMPTS_PER_STEP * GROUP,
                 "train.micro_batch_size": GROUP, "train.seq_len": 48, "train.lr": 1e-3,
                 "checkpoint.interval": 0, "checkpoint.export": "false", "parallel.dp": 0,
                 "elastic.min_workers": 1, "elastic.max_workers": 2, "failure.max_failures": 0,
                 "failure.preemption_grace_s": 5, "grpo.group_size": GROUP, "grpo.max_new_tokens": 8,
                 "grpo.reward": "moe_platform.rewards:regex", "grpo.rollout_workers": 1,
                 # the rollout worker takes no CPU of its own here, so that Ray Train's elastic sizing (which counts
                 # the cluster's CPUs) and the rollout worker never wait for each other on this 2-CPU cluster
                 "grpo.rollout_resources": "CPU=0"}
    cfg = load_config(None, [f"--{k}={v}" for k, v in overrides.items()])
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    events: dict = {}
    with FakeCloud() as cloud:
        agent = cloud.start_agent(cluster.address, worker_node.node_id)
        try:
            spot = threading.Thread(target=preempt, args=(cluster, worker_node, cloud, agent, run_dir, events),
                                    daemon=True)
            spot.start()
            result = launch_ray(cfg, progress=False, trainer_cls=GRPOTrainer)
            spot.join(timeout=120)
        finally:
            agent.kill()
            agent.wait(timeout=30)

    assert "error" not in events and events.get("removed"), events
    assert events["agent"][0] == 0, events["agent"][2]
    jit = events["jit_step"]
    assert result["final_step"] == STEPS and result["resumed_from"] == jit and result["world_size"] == 1
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # no step lost, none logged twice
    history = run_events(run_dir)
    starts = [e for e in history if e["event"] == "rollouts"]
    assert [e["from_checkpoint"] for e in starts] == [None, jit], starts  # new engines on the checkpoint's weights
    stop = max(i for i, e in enumerate(history) if e["event"] == "checkpoint_and_stop")
    assert [e["event"] for e in history[stop:]] == ["checkpoint_and_stop", "preempted", "resume", "rollouts"]
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["logp_gap"] <= 1e-5 for r in recs), [(r["step"], r["logp_gap"]) for r in recs]
    rng = np.random.Generator(np.random.PCG64([cfg.train.seed, ROLLOUT_STREAM]))
    straight = [int(rng.integers(0, 2**63 - 1, size=PROMPTS_PER_STEP * GROUP, dtype=np.int64)[0])
                for _ in range(STEPS)]
    assert [r["rollout_seed"] for r in recs] == straight
