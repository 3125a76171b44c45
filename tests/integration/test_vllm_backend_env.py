"""The vllm backend's own tests (tests/vllm_backend: greedy tokens equal to the native engine's, a rollout through it
over HTTP, refused options) run in the venv of scripts/setup-vllm.sh, where vLLM's CPU build lives with its own pins.
scripts/setup.sh creates that venv; without it this test fails (it does not skip): the backend would go untested."""

from __future__ import annotations

import os
import subprocess
import sys

from tinyrun import REPO

VLLM_PYTHON = os.environ.get("MOE_PLATFORM_VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))


def test_the_vllm_backend_passes_its_tests_in_the_vllm_venv():
    assert os.access(VLLM_PYTHON, os.X_OK), (
        f"{VLLM_PYTHON} is missing: run `bash scripts/setup-vllm.sh` (scripts/setup.sh does) to create the venv the "
        f"vllm backend's tests run in, or point MOE_PLATFORM_VLLM_PYTHON at one")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([VLLM_PYTHON, "-m", "pytest", "tests/vllm_backend", "-q", "-p", "no:cacheprovider", "-x"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    summary = proc.stdout[-6000:]
    sys.stdout.write(summary)
    assert proc.returncode == 0, f"tests/vllm_backend failed in {VLLM_PYTHON}:\n{summary}"
    assert " passed" in summary.splitlines()[-1] and "skipped" not in summary.splitlines()[-1], summary
