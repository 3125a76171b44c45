"""The README's bring-your-own-model example for real: `bash scripts/finetune-example.sh` builds a tiny Qwen3-MoE with
transformers, a chat JSONL and preference pairs, fine-tunes it through `ray job submit` on 1-2 elastic Ray Train
workers with jobs/configs/finetune.toml, aligns the export with LoRA DPO (jobs/configs/dpo.toml) whose held-out
preference accuracy rises, deploys Serve from the fine-tuned export and asks /v1/chat/completions with the openai
client, then rolls the DPO export out to the live app behind the quality probe until it serves; afterwards nothing it
started runs and its files are gone."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from tinyrun import REPO, cluster_processes, venv_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_finetune_example_imports_trains_on_chat_serves_and_cleans_up(tmp_path):
    env = venv_env({k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
                   HOME=str(tmp_path))
    r = subprocess.run(["bash", "scripts/finetune-example.sh", "--train.steps=16", "--train.eval_interval=8",
                        "--checkpoint.interval=8"], cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    work = re.search(r"\[finetune\] working in (\S+)", out).group(1)
    assert "starting from" in out and "(Qwen3MoeForCausalLM)" in out, "training did not start from the import"
    assert re.search(r"chose dp2·tp1·pp1·ep2", out), "the job did not run on both elastic workers"
    assert "SUCCEEDED" in out, "the fine-tuning job did not report SUCCEEDED"
    assert "[finetune] exported architecture: Qwen3MoeForCausalLM" in out
    answer = re.search(r"^\[finetune\] answer: ('.*'|\".*\") \(finish_reason (\w+)\)$", out, re.MULTILINE)
    assert answer, f"no chat answer from the served model:\n{out[-3000:]}"
    assert ast.literal_eval(answer.group(1)), "the served model answered with an empty message"
    # DPO: a LoRA job on the fine-tuned export through `ray job submit`; its held-out preference accuracy rises
    assert out.count("SUCCEEDED") >= 2, "the DPO job did not report SUCCEEDED"
    rose = re.search(r"DPO raised the held-out preference accuracy from ([\d.]+) to ([\d.]+) over (\d+) held-out", out)
    assert rose and float(rose.group(2)) > float(rose.group(1)) and int(rose.group(3)) > 0, out[-4000:]
    # the rollout of the DPO export: loaded beside the running version, the quality probe scored both, promoted
    assert re.search(r"\[finetune\] rollout promoted: ", out), out[-4000:]
    probe = re.search(r"quality probe, mean loss on held-out texts \(nats/token\): stable ([\d.]+), dpo ([\d.]+)", out)
    assert probe, out[-4000:]
    live = re.search(r"^\[finetune\] live version 'dpo' answers .*: ('.*'|\".*\")$", out, re.MULTILINE)
    assert live and ast.literal_eval(live.group(1)), out[-3000:]
    assert not Path(work).exists(), f"the example left {work} behind"
    assert cluster_processes(f"{work}/cluster") == [], "the example left processes of its cluster running"
