"""Ray Train fault tolerance on a real local Ray: a training worker SIGKILLed mid-run makes Ray restart the worker
group, every worker resumes from the latest committed checkpoint, and the run ends bitwise where an uninterrupted
run of the same layout ends, with each step in metrics.jsonl exactly once. Plus the errors raised before training.
One Ray instance for the whole module."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a hung cluster fails, never stalls
psutil = pytest.importorskip("psutil")

from moe_platform.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from moe_platform.checkpoint.sharded import ShardedReader  # noqa: E402
from moe_platform.train.metrics import MetricsLog  # noqa: E402
from moe_platform.train.ray_launcher import launch_ray  # noqa: E402

STEPS = 30
CHECKPOINT_INTERVAL = 8
KILL_AFTER_STEP = 10  # past the first committed checkpoint, well before the end


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def dp2_config(tiny_config, name: str, **extra):
    return tiny_config(**{"run.name": name, "parallel.dp": 2, "train.steps": STEPS,
                          "checkpoint.interval": CHECKPOINT_INTERVAL, "checkpoint.keep": 2, "failure.max_failures": 2,
                          **extra})


def ray_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of this test's Ray (all descendants of this process)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def last_logged_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written right now
            continue
    return max(steps, default=0)


def kill_a_worker_after(metrics: Path, step: int, killed: dict, deadline_s: float = 180.0) -> None:
    """Background: once `metrics` shows `step`, SIGKILL one training worker (polling, bounded)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if last_logged_step(metrics) >= step:
            workers = ray_train_workers()
            if workers:
                victim = workers[-1]
                killed["step"] = last_logged_step(metrics)
                os.kill(victim.pid, signal.SIGKILL)
                killed["pid"] = victim.pid
                return
        time.sleep(0.02)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and checkpoint_step(ckpt) == STEPS
    return ShardedReader(ckpt).full_state_dict()


def test_unreachable_cluster(tiny_config):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config()
    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    with pytest.raises(ValueError, match=f"no Ray cluster reachable at '127.0.0.1:{port}'"):
        launch_ray(cfg, address=f"127.0.0.1:{port}", progress=False)


def test_unwritable_storage(tiny_config, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    cfg = tiny_config(**{"run.storage_path": str(blocker / "runs")})
    with pytest.raises(ValueError, match="is not writable"):
        launch_ray(cfg, progress=False)


def test_killed_worker_resumes_from_checkpoint_bitwise(local_ray, tiny_config):
    reference = launch_ray(dp2_config(tiny_config, "reference"), progress=False)
    assert reference["final_step"] == STEPS and reference["resumed_from"] is None
    assert reference["layout"].startswith("dp2")

    cfg = dp2_config(tiny_config, "killed")
    metrics = Path(cfg.run.storage_path) / cfg.run.name / "metrics.jsonl"
    killed: dict = {}
    killer = threading.Thread(target=kill_a_worker_after, args=(metrics, KILL_AFTER_STEP, killed), daemon=True)
    killer.start()
    result = launch_ray(cfg, progress=False)
    killer.join(timeout=5)

    assert "pid" in killed, "no training worker was killed"
    assert killed["step"] < STEPS, "the run finished before the worker could be killed"
    assert result["final_step"] == STEPS
    # The new group resumed from a committed checkpoint written before the kill.
    assert result["resumed_from"] is not None and CHECKPOINT_INTERVAL <= result["resumed_from"] <= killed["step"]
    assert result["ray_checkpoint"] == str(latest_checkpoint(result["run_dir"]))

    steps = [r["step"] for r in MetricsLog(metrics).read()]
    assert steps == list(range(1, STEPS + 1)), "every step exactly once"
    ref_losses = [r["loss"] for r in MetricsLog(Path(reference["run_dir"]) / "metrics.jsonl").read()]
    assert [r["loss"] for r in MetricsLog(metrics).read()] == ref_losses

    want, got = final_params(Path(reference["run_dir"])), final_params(Path(result["run_dir"]))
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different[:5]}"


def test_more_workers_than_the_cluster_can_host(local_ray, tiny_config):
    cfg = dp2_config(tiny_config, "too_big", **{"parallel.dp": 4, "train.global_batch_size": 8})
    with pytest.raises(ValueError, match=r"at least 4 training worker.*can host at most 2"):
        launch_ray(cfg, progress=False)

