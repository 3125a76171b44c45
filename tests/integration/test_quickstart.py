"""The README's quickstart for real: `bash scripts/quickstart.sh` on this checkout starts a token-auth Ray head,
trains through `ray job submit`, deploys Serve from the export with `serve deploy`, asks it with the openai client and
prints the answer and the dashboard URL; afterwards nothing it started runs any more and its files are gone. Training
is shortened with the overrides the script passes on (it ends at ~4 minutes on 2 cores with its own 80 steps)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from tinyrun import REPO, cluster_processes, venv_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a hung cluster fails, never stalls



def test_quickstart_trains_serves_answers_and_cleans_up(tmp_path):
    env = venv_env({k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
                   HOME=str(tmp_path))  # no token from a real ~/.ray
    r = subprocess.run(["bash", "scripts/quickstart.sh", "--train.steps=16", "--train.warmup=4",
                        "--train.eval_interval=8", "--checkpoint.interval=8", "--data.max_bytes=400000"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    work = re.search(r"\[quickstart\] working in (\S+)", out).group(1)
    assert re.search(r"\[quickstart\] dashboard: http://127\.0\.0\.1:\d+", out), out[-3000:]
    assert "SUCCEEDED" in out, "the training job did not report SUCCEEDED"
    # the completion the openai client got back from the served model (its repr)
    answer = re.search(r"^\[quickstart\] answer: (.+)$", out, re.MULTILINE)
    assert answer, f"no answer from the served model:\n{out[-3000:]}"
    assert ast.literal_eval(answer.group(1)), "the served model answered with an empty completion"
    assert not Path(work).exists(), f"the quickstart left {work} behind"
    assert cluster_processes(f"{work}/cluster") == [], "the quickstart left processes of its cluster running"
