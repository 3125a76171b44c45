"""Token auth on a real local cluster: `scripts/cluster-up.sh` starts `ray start --head` with RAY_AUTH_MODE=token and
its own 0600 token; `ray job submit` without the token, or with a wrong one, is refused and creates no job, while the
same submission with the token runs to SUCCEEDED. `scripts/cluster-down.sh` then stops that cluster and only it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tinyrun import BIN, scripted_cluster, submit_job, venv_env  # noqa: E402

pytestmark = [pytest.mark.timeout(240)]  # a hung cluster fails, never stalls

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    # HOME elsewhere: nothing falls back on a token in the real ~/.ray
    base = venv_env({k: v for k, v in os.environ.items() if k not in AUTH_VARS},
                    HOME=str(tmp_path_factory.mktemp("home")))
    with scripted_cluster(state, base, "--num-cpus=1") as env:
        yield SimpleNamespace(state=state, url=env["MOE_DASHBOARD_URL"], token=Path(env["RAY_AUTH_TOKEN_PATH"]),
                              base_env=base, with_token={**base, **env})


def submit(cluster, env: dict, job_id: str, code: str = "print(6 * 7)") -> subprocess.CompletedProcess:
    return submit_job(cluster.url, job_id, ["python", "-c", code], env, working_dir=False)


def list_jobs(cluster) -> str:
    r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cluster.url], env=cluster.with_token,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_token_file_is_private(cluster):
    assert stat.S_IMODE(cluster.token.stat().st_mode) == 0o600
    assert len(cluster.token.read_text().strip()) >= 32


@pytest.mark.parametrize("case", ["no token", "wrong token"])
def test_submission_without_the_token_is_refused(cluster, case):
    if case == "no token":
        env, expect = cluster.base_env, "Unauthorized: Missing authentication token"
    else:
        env, expect = {**cluster.base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, "Forbidden"
    job_id = f"refused-{case.replace(' ', '-')}-{os.getpid()}"
    r = submit(cluster, env, job_id)
    assert r.returncode != 0, f"submission with {case} was accepted:\n{r.stdout}\n{r.stderr}"
    assert expect in r.stdout + r.stderr, r.stdout + r.stderr
    assert job_id not in list_jobs(cluster), "a refused submission still created a job"


def test_raw_http_without_the_token_gets_401(cluster):
    body = json.dumps({"entrypoint": "python -c 'print(1)'"}).encode()
    req = urllib.request.Request(f"{cluster.url}/api/jobs/", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401


def test_submission_with_the_token_succeeds(cluster):
    job_id = f"accepted-{os.getpid()}"
    r = submit(cluster, cluster.with_token, job_id)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", cluster.url, "--follow", job_id],
                          env=cluster.with_token, capture_output=True, text=True, timeout=150)
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", cluster.url, job_id],
                            env=cluster.with_token, capture_output=True, text=True, timeout=60)
    assert "succeeded" in status.stdout.lower(), f"{status.stdout}\n{status.stderr}\n{logs.stdout}"
    assert "42" in logs.stdout.splitlines(), logs.stdout
