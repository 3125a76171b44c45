"""The training job through the real Ray CLI: `ray start --head`, `ray job submit --working-dir <repo> -- python
jobs/train.py --config jobs/configs/tiny.toml ...`; the job succeeds, its logs show progress, and the run directory
holds a committed checkpoint and metrics for every step, which Ray's own Result also knows. One head for the module,
stopped by signalling the `ray start --block` process this module started (`ray stop` would stop every Ray on the
machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # a hung cluster fails, never stalls

from moe_platform.checkpoint import checkpoint_step, latest_checkpoint  # noqa: E402
from tinyrun import BIN, REPO, config_overrides, free_ports, logged_steps, poll, submit_job, venv_env  # noqa: E402

STEPS = 6


def _answers(url: str) -> bool:
    """Whether `url` answers at all (the dashboard needs the auth token for real answers; any status will do)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_head():
    gcs, dashboard, agent, client = free_ports(4)
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # its own temp dir: no other Ray attaches to it
    # The cluster runs in the venv, so the job's `python` is the venv's; RAY_AUTH_MODE=token makes the CLI send the
    # token that `ray start` uses (~/.ray/auth_token).
    env = venv_env(RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 (closed at teardown)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        poll(lambda: _answers(f"http://127.0.0.1:{dashboard}/api/version"), 120, "the dashboard", 0.5)
        yield SimpleNamespace(address=f"http://127.0.0.1:{dashboard}", env=env)
    finally:
        head.send_signal(signal.SIGINT)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(head, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=head.env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_train_job_through_ray_job_submit(ray_head, tiny_config):
    # keep=1: the trainer deletes checkpoints that Ray's index may still name (the launcher prunes the index)
    cfg = tiny_config(**{"run.name": "job", "train.steps": STEPS, "checkpoint.interval": 3, "checkpoint.keep": 1})
    job_id = f"moe-train-{os.getpid()}-{int(time.time())}"
    r = submit_job(ray_head.address, job_id, ["python", "jobs/train.py", "--config", "jobs/configs/tiny.toml",
                                              *config_overrides(cfg)], ray_head.env)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout}\n{r.stderr}"
    logs = ray_cli(ray_head, "job", "logs", "--address", ray_head.address, "--follow", job_id, timeout=300)
    status = ray_cli(ray_head, "job", "status", "--address", ray_head.address, job_id)
    assert "succeeded" in status.stdout.lower(), f"{status.stdout}\n{status.stderr}\n--- job logs ---\n{logs.stdout}"

    out = logs.stdout
    assert f"step {STEPS}/{STEPS}" in out, out  # the workers' progress lines reach the job's logs
    result = [json.loads(line) for line in out.splitlines() if line.startswith('{"run_dir"')][-1]  # printed last
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    assert result["final_step"] == STEPS and Path(result["run_dir"]) == run_dir

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and checkpoint_step(ckpt) == STEPS
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))
    assert (run_dir / "export" / "model.safetensors").exists()
    # Ray Train's view of the same run (its index pruned of the checkpoints the trainer deleted): the latest
    # checkpoint is the trainer's committed one.
    from ray.train import Result

    assert Path(Result.from_path(str(run_dir)).checkpoint.path) == ckpt

