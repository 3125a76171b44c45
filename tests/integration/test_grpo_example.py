"""The README's online RL example for real: `bash scripts/grpo-example.sh` builds a tiny Qwen3-MoE and GRPO prompt
rows, starts a local token-auth Ray head, trains LoRA adapters with GRPO through `ray job submit` on 2 Ray Train
learner workers and 1 rollout worker (the adapters alone synced to the engine after every step, its log-probabilities
the learner's within 1e-5), deploys Serve from the run's export and asks /v1/chat/completions with the openai client;
afterwards nothing it started runs and its files are gone."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from tinyrun import REPO, cluster_processes, venv_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_grpo_example_trains_on_two_learners_and_a_rollout_worker_and_serves_the_export(tmp_path):
    env = venv_env({k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
                   HOME=str(tmp_path))
    r = subprocess.run(["bash", "scripts/grpo-example.sh", "--train.steps=8"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=840)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    work = re.search(r"\[grpo\] working in (\S+)", out).group(1)
    assert "SUCCEEDED" in out, "the GRPO job did not report SUCCEEDED"
    learners = re.search(r"\[grpo\] learner (\S+) on (\d+) steps; (\d+) rollout worker\(s\), weight sync: (\w+)", out)
    assert learners, out[-4000:]
    assert learners.group(1).startswith("dp2") and learners.groups()[1:] == ("8", "1", "adapters")
    sync = re.search(r"sync ([\d.]+) s \((\d+) KiB of adapters\)", out)
    assert sync and 0 < int(sync.group(2)) < 1024, out[-4000:]  # the adapters, not the model
    gap = re.search(r"largest engine/learner log-probability gap over the run: (\S+)", out)
    assert gap and float(gap.group(1)) <= 1e-5
    answer = re.search(r"^\[grpo\] answer: ('.*'|\".*\") \(finish_reason (\w+)\)$", out, re.MULTILINE)
    assert answer, f"no chat answer from the served export:\n{out[-3000:]}"
    assert isinstance(ast.literal_eval(answer.group(1)), str)
    assert not Path(work).exists(), f"the example left {work} behind"
    assert cluster_processes(f"{work}/cluster") == [], "the example left processes of its cluster running"
