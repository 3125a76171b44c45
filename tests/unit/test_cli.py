"""The `moe-platform` command line, run as a user would (a real subprocess of the installed console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinyrun import tiny_overrides

EXE = shutil.which("moe-platform", path=str(Path(sys.executable).parent)) or "moe-platform"
TINY_MODEL = [o for o in tiny_overrides(Path("x"), Path("y")) if o.startswith("--model.")]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_subcommand():
    out = cli("--help")
    assert out.returncode == 0
    for sub in ("train", "export", "publish", "arbiter", "generate", "serve", "demo", "rollout", "bench"):
        assert sub in out.stdout
    train_help = cli("train", "--help").stdout
    assert "--config" in train_help and "--section.key=value" in train_help


def test_demo_trains_exports_and_generates(tmp_path, corpus_file):
    out = cli("demo", f"--storage-path={tmp_path}", "--train.steps=6", "--train.eval_interval=3",
              "--checkpoint.interval=3", f"--data.path={corpus_file}", "--data.vocab_size=320",
              f"--data.cache_dir={tmp_path / 'cache'}", "--train.seq_len=32", "--train.warmup=2", *TINY_MODEL)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith("[demo] ") and ": " in line)
    # Greedy: Ray Serve (weights from the object-store registry) answers what the in-process engine generated.
    assert lines["[demo] served completion"].startswith(lines["[demo] completion"] + " ("), out.stdout
    assert "registry://demo@1" in out.stdout
    export = tmp_path / "demo" / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == "mixtral"


def test_generate_prints_only_the_completion(tmp_path, corpus_file):
    from moe_platform.config import load_config
    from moe_platform.train.trainer import train

    result = train(load_config(None, tiny_overrides(corpus_file, tmp_path, **{"train.steps": 4})), progress=False)
    args = ["generate", "--model", str(result.export_dir), "--prompt", "ROMEO:", "--max-tokens", "12"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout, "greedy generation is deterministic"
    from moe_platform.serving.engine import Engine, SamplingParams

    want = Engine.from_pretrained(result.export_dir).generate("ROMEO:", SamplingParams(max_tokens=12, temperature=0))
    assert want and first.stdout == want + "\n", "the completion alone, as the engine generates it"
    sampled = [cli(*args, "--temperature", "1.0", "--seed", "3").stdout for _ in range(2)]
    assert sampled[0] == sampled[1], "a seed makes sampling repeatable"


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "/nonexistent.toml"], "config file not found"),
    (["train", "--config", "jobs/configs/tiny.toml", "--train.nope=1"], "unknown config key 'train.nope'"),
    (["export", "/nonexistent", "/tmp/x"], "error"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "error"),
    (["bench", "no_such_bench"], "unknown benchmark"),
    (["serve", "--model", "/nonexistent", "--adapter", "support"], "expected NAME=DIR"),
    (["rollout", "start"], "rollout start needs --to VERSION"),
    (["rollout", "start", "--to", "v2", "--steps", "50,25,100"], "steps must be increasing whole percentages"),
    (["rollout", "start", "--to", "v2", "--dwell", "soon"], "not a duration: 'soon'"),
    (["rollout", "start", "--to", "v2", "--probe-file", "/nonexistent.txt"], "cannot read the probe prompts"),
    (["train", "--config", "jobs/configs/tiny.toml", "--rollout.auto=true"], "rollout.auto needs "
                                                                              "checkpoint.publish_to"),
])
def test_bad_input_exits_2_with_a_message(args, message):
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
