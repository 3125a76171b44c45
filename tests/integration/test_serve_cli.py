"""`moe-platform serve` as a user runs it: a subprocess of the real console script, in a session of its own, with a
tiny export. The API key comes from a file and the admin key from the environment, and each guards only its routes;
without an admin key the admin routes are off; the app's /metrics shows its request counters at 0 before any
request; and SIGTERM, or SIGINT where a script started the server with SIGINT ignored, stops it with exit code 0,
leaving none of its processes behind (the local Ray's GCS, raylet, dashboard and workers included).

Each server gets its own Ray temp dir (RAY_TMPDIR) and HTTP port, and a marker in its environment that every process
it starts inherits, so other Ray clusters on the machine are neither joined nor mistaken for its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tinyrun import BIN, free_port, poll

EXE = shutil.which("moe-platform", path=str(BIN)) or "moe-platform"
MARKER = "MOE_TEST_SERVE_CLI"
API_KEY, ADMIN_KEY = "sk-user-4f1e", "sk-admin-9c2d"
START_S, STOP_S = 240, 120


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries `marker`: everything the server started, however far down."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER) == marker and alive(p):
                found.append(p)
        except psutil.Error:
            continue
    return found


def in_group(pgid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and alive(p):
                found.append(p)
        except (OSError, psutil.Error):
            continue
    return found


def ask(url: str, path: str, key: str | None = None, method: str = "GET", **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kw)


def openai_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err["message"]


def check_keys(url: str) -> None:
    """API key from a file, admin key from the environment: each opens its own routes only."""
    openai_error(ask(url, "/v1/models"), 401, "invalid_api_key")
    assert ask(url, "/v1/models", API_KEY).status_code == 200
    assert ask(url, "/v1/models", ADMIN_KEY).status_code == 401
    openai_error(ask(url, "/admin/rollout", API_KEY), 401, "invalid_api_key")  # every API client holds that one
    openai_error(ask(url, "/v1/load_lora_adapter", API_KEY, "POST", json={"lora_name": "x", "lora_path": "/etc"}),
                 401, "invalid_api_key")
    status = ask(url, "/admin/rollout", ADMIN_KEY)
    assert status.status_code == 200 and "state" in status.json(), status.text


def check_admin_off(url: str) -> None:
    """No key at all: /v1 is open, the admin routes are off, whatever key a client sends."""
    assert ask(url, "/v1/models").status_code == 200
    for key in (None, "anything"):
        message = openai_error(ask(url, "/admin/rollout", key, "POST", json={"action": "abort"}), 403,
                               "admin_disabled")
        assert "no admin key is configured" in message
    openai_error(ask(url, "/v1/unload_lora_adapter", None, "POST", json={"lora_name": "x"}), 403, "admin_disabled")


def check_metrics_start_at_zero(url: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(ask(url, "/metrics").text)}
    requests = {s.labels["status"]: s.value for s in families["moe_serve_app_requests"].samples}
    assert requests == {"2xx": 0, "5xx": 0}
    assert [s.value for s in families["vllm:request_success"].samples] == [0]


@pytest.mark.parametrize("how", ["sigterm-with-keys", "sigint-from-a-script-without-keys"])
def test_serve_answers_then_stops_cleanly_on_a_signal(serving_export, tmp_path, how):
    ray_tmp = tempfile.mkdtemp(prefix="moe-cli-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MOE_PLATFORM_API_KEY", "MOE_PLATFORM_ADMIN_KEY")}
    env.update({"PYTHONWARNINGS": "ignore", "RAY_TMPDIR": ray_tmp, MARKER: marker})
    args = []
    if how.startswith("sigterm"):
        key_file = tmp_path / "api-key"
        key_file.write_text(API_KEY + "\n")
        key_file.chmod(0o600)
        args = ["--api-key-file", str(key_file)]
        env["MOE_PLATFORM_ADMIN_KEY"] = ADMIN_KEY
    sig = signal.SIGTERM if how.startswith("sigterm") else signal.SIGINT
    # A script's background job (`moe-platform serve ... &` in bash) starts with SIGINT ignored.
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sig == signal.SIGINT else None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([EXE, "serve", "--model", str(serving_export), "--port", str(port), *args], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=ignore_sigint)

    def log_text() -> str:
        return Path(log_path).read_text()[-4000:]

    def healthy() -> bool:
        assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log_text()}"
        try:
            return ask(url, "/health").status_code == 200
        except httpx.HTTPError:
            return False

    rc, spawned = None, []
    try:
        poll(healthy, START_S, "moe-platform serve to answer /health", interval_s=0.25)
        check_metrics_start_at_zero(url)  # before any completion request
        if args:
            check_keys(url)
        else:
            check_admin_off(url)
        spawned = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in spawned if alive(p)}
        assert {"raylet", "gcs_server"} <= names, names  # it started a Ray of its own
        proc.send_signal(sig)
        rc = proc.wait(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        left = {p.pid: p.name() for p in [*spawned, *in_group(proc.pid), *marked(marker)] if alive(p)}
        for pid in left:  # a failed run must not leave its Ray behind for the rest of the suite
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, log_text()
    assert f"{signal.Signals(sig).name}: shutting down" in log_text()
    assert left == {}, f"processes left running after serve exited: {left}\n{log_text()}"
