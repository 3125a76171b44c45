"""vLLM's OpenAI server as a peer, for the benchmarks that drive it (bench/eval.py, bench/serve_vs_vllm.py,
bench/serve_path.py): started from its own venv (scripts/setup-vllm.sh) on loopback, offline, and awaited."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def wait_healthy(url: str, proc: subprocess.Popen | None, log: Path | None, what: str) -> None:
    """Wait (up to 10 minutes) until `url`/health answers 200; fail with the log's tail if `proc` exits first."""
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{what} did not come up within 10 minutes")


def start_vllm(python: str, export: Path, port: int, log: Path, model: str, max_model_len: int,
               api_key: str | None = None, threads: int | None = None) -> subprocess.Popen:
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, float32) on 127.0.0.1:`port`, serving
    `export` as `model`, once healthy. With `threads`, its engine's OpenMP threads are bound to that many cores (by
    default it takes one core and keeps the other for its HTTP process)."""
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len), "--served-model-name",
           model, *(["--api-key", api_key] if api_key else [])]
    env = {**os.environ, **OFFLINE, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    env.pop("PYTHONPATH", None)  # nothing of ours in vLLM's process
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}", proc, log, "vLLM's server")
    return proc
