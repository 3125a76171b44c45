"""Ray Train fault tolerance on a real local Ray: training workers SIGKILLed at random moments (three times in a
60-step run, any rank, mid-step or mid-checkpoint) make Ray restart the worker group, every worker resumes from the
latest committed checkpoint, and the run ends bitwise where an uninterrupted run of the same layout ends, with each
step in metrics.jsonl exactly once and every sample consumed exactly once, in the same order. Plus the errors raised
before training. One Ray instance for the whole module."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a hung cluster fails, never stalls

from moe_platform.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from moe_platform.checkpoint.sharded import ShardedReader  # noqa: E402
from moe_platform.train.metrics import MetricsLog  # noqa: E402
from moe_platform.train.ray_launcher import launch_ray  # noqa: E402
from tinyrun import free_port, last_logged_step, local_ray, run_events  # noqa: E402

STEPS = 60
CHECKPOINT_INTERVAL = 8
KILLS = 3
END_MARGIN_STEPS = 15  # steps at the end of the run where no kill is aimed
SEED = int(os.environ.get("MOE_CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2):
        yield


def dp2_config(tiny_config, name: str, **extra):
    return tiny_config(**{"run.name": name, "parallel.dp": 2, "train.steps": STEPS, "train.log_sample_ids": True,
                          "checkpoint.interval": CHECKPOINT_INTERVAL, "checkpoint.keep": 2,
                          "failure.max_failures": KILLS, **extra})


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


def chaos(run_dir: Path, rng: random.Random, kills: list, deadline_s: float = 300.0) -> None:
    """Background: KILLS times, once the current worker group trains, wait a random number of steps and a random
    fraction of a step, then SIGKILL a random training worker (polling, bounded)."""
    end = time.monotonic() + deadline_s
    first = CHECKPOINT_INTERVAL + 1  # after the first committed checkpoint, so that every restart resumes
    # Spread the kills over the run, each in its own window of steps, and keep them clear of the end: a tiny step takes
    # tens of milliseconds, so the random delay below can carry the workers several steps past `at_step`.
    window = (STEPS - first - END_MARGIN_STEPS) // KILLS
    for i in range(KILLS):
        at_step = rng.randrange(first + i * window, first + (i + 1) * window)
        while time.monotonic() < end and not (len(run_events(run_dir)) > i and last_logged_step(run_dir) >= at_step):
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # anywhere in a step, or in a checkpoint write
        workers = ray_train_workers()
        if not workers or time.monotonic() >= end:
            return
        victim = rng.choice(workers)
        kills.append({"at_step": last_logged_step(run_dir), "pid": victim.pid})
        os.kill(victim.pid, signal.SIGKILL)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and checkpoint_step(ckpt) == STEPS
    return ShardedReader(ckpt).full_state_dict()


def test_unreachable_cluster(tiny_config):
    port = free_port()  # nothing listens on it
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


def test_three_random_kills_resume_bitwise_with_every_sample_once(ray_cluster, tiny_config):
    reference = launch_ray(dp2_config(tiny_config, "reference"), progress=False)
    assert reference["final_step"] == STEPS and reference["resumed_from"] is None
    assert reference["layout"].startswith("dp2")

    cfg = dp2_config(tiny_config, "killed")
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    kills: list = []
    killer = threading.Thread(target=chaos, args=(run_dir, random.Random(SEED), kills), daemon=True)
    killer.start()
    result = launch_ray(cfg, progress=False)
    killer.join(timeout=5)

    assert len(kills) == KILLS and kills[-1]["at_step"] < STEPS, f"seed {SEED}: kills {kills}"
    assert result["final_step"] == STEPS
    events = run_events(run_dir)
    assert [e["event"] for e in events] == ["start"] + ["resume"] * KILLS, f"seed {SEED}: {events}"
    # Each new group resumed from a committed checkpoint written before its kill.
    for kill, event in zip(kills, events[1:], strict=True):
        assert event["step"] <= kill["at_step"] and event["step"] % CHECKPOINT_INTERVAL == 0, (SEED, kills, events)
    assert result["ray_checkpoint"] == str(latest_checkpoint(result["run_dir"]))

    # After the restarts are de-duplicated, every step once, with the reference run's losses and samples.
    recs = MetricsLog(run_dir / "metrics.jsonl").read()
    ref = MetricsLog(Path(reference["run_dir"]) / "metrics.jsonl").read()
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), f"seed {SEED}: every step exactly once"
    assert [r["loss"] for r in recs] == [r["loss"] for r in ref], f"seed {SEED}"
    samples = [i for r in recs for i in r["sample_ids"]]
    assert samples == [i for r in ref for i in r["sample_ids"]], f"seed {SEED}: sample stream differs"
    assert len(samples) == len(set(samples)) == STEPS * cfg.train.global_batch_size, "a sample twice or skipped"

    want, got = final_params(Path(reference["run_dir"])), final_params(Path(result["run_dir"]))
    assert want.keys() == got.keys()
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different[:5]}"


def test_more_workers_than_the_cluster_can_host(ray_cluster, tiny_config):
    cfg = dp2_config(tiny_config, "too_big", **{"parallel.dp": 4, "train.global_batch_size": 8})
    with pytest.raises(ValueError, match=r"at least 4 training worker.*can host at most 2"):
        launch_ray(cfg, progress=False)

