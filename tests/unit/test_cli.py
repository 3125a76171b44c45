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
    for sub in ("train", "export", "publish", "arbiter", "generate", "serve", "demo", "rollout", "eval", "bench"):
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


def test_generate_takes_a_deepseek_directory_as_it_is(tmp_path):
    """`generate --model` on a DeepSeek-V3 directory saved by transformers: the engine's greedy completion on its
    latent KV cache, transformers' tokens."""
    import torch
    import transformers

    from moe_platform.tokenizer import load_tokenizer
    from tinyrun import save_tiny_hf_model, tiny_tokenizer

    hf, model = save_tiny_hf_model("DeepseekV3ForCausalLM", tmp_path / "dsv3", tiny_tokenizer(tmp_path / "tok"))
    out = cli("generate", "--model", str(model), "--prompt", "ROMEO:", "--max-tokens", "10")
    assert out.returncode == 0, out.stderr[-2000:]
    tok = load_tokenizer(model)
    prompt = tok.encode("ROMEO:").ids
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                          eos_token_id=transformers.AutoConfig.from_pretrained(model).eos_token_id)[0, len(prompt):]
    assert out.stdout == tok.decode(ids.tolist(), skip_special_tokens=True) + "\n"


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
    (["rollout", "start", "--to", "v2", "--eval-task", "mc", "--max-eval-drop", "-1"], "gates.eval.max_drop"),
    (["eval", "--model", "/nonexistent", "--tasks", "mc"], "not an export directory"),
    (["eval", "--model", "http://127.0.0.1:9", "--tasks", "mc", "--include-path", "/nonexistent"],
     "--include-path /nonexistent: not a directory"),
    (["eval", "--model", "http://127.0.0.1:9", "--tasks", "mc"], "cannot reach the server at http://127.0.0.1:9"),
    (["train", "--config", "jobs/configs/tiny.toml", "--rollout.auto=true"], "rollout.auto needs "
                                                                              "checkpoint.publish_to"),
])
def test_bad_input_exits_2_with_a_message(args, message):
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr


# -- `serve`: keys from files or the environment, and no open server on a public address ------------------------------
EXPOSED = "is not a loopback address and no API key is set"
NO_MODEL = "has no config.json"


def serve_fails_before_ray(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`moe-platform serve ARGS`, which must exit 2 before any Ray starts (Ray makes its session under RAY_TMPDIR)."""
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in ("MOE_PLATFORM_API_KEY", "MOE_PLATFORM_ADMIN_KEY")}
    out = subprocess.run([EXE, "serve", "--model", str(tmp_path / "no-export"), *args], capture_output=True, text=True,
                         timeout=120, env={**base, "PYTHONWARNINGS": "ignore", "RAY_TMPDIR": str(ray_tmp), **env})
    assert out.returncode == 2, out.stderr[-2000:]
    assert list(ray_tmp.iterdir()) == [], "a Ray was started"
    return out


def key_file(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "serve.example.com", ""])
def test_serve_refuses_a_public_address_without_an_api_key(tmp_path, host):
    out = serve_fails_before_ray(tmp_path, "--host", host)
    assert EXPOSED in out.stderr and "--api-key-file" in out.stderr and "--allow-unauthenticated" in out.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_serve_on_loopback_needs_no_key(tmp_path, host):
    out = serve_fails_before_ray(tmp_path, "--host", host)
    assert EXPOSED not in out.stderr and NO_MODEL in out.stderr  # got past the check, to the (missing) model


def test_serve_public_address_with_allow_unauthenticated_warns(tmp_path):
    out = serve_fails_before_ray(tmp_path, "--host", "0.0.0.0", "--port", "8123", "--allow-unauthenticated")
    assert "WARNING: serving on 0.0.0.0:8123 WITHOUT AUTHENTICATION" in out.stderr and NO_MODEL in out.stderr


def test_serve_reads_keys_from_files_or_the_environment_only(tmp_path):
    # an API key from the environment or from a file opens the public address (the run then stops at the model)
    out = serve_fails_before_ray(tmp_path, "--host", "0.0.0.0", MOE_PLATFORM_API_KEY="sk-env")
    assert EXPOSED not in out.stderr and NO_MODEL in out.stderr
    out = serve_fails_before_ray(tmp_path, "--host", "0.0.0.0", "--api-key-file", key_file(tmp_path, "k", "sk-f\n"))
    assert EXPOSED not in out.stderr and NO_MODEL in out.stderr and "can be read by other users" not in out.stderr
    # a key file others can read is used, with a warning
    out = serve_fails_before_ray(tmp_path, "--api-key-file", key_file(tmp_path, "open", "sk-o", 0o644))
    assert "can be read by other users; chmod 600 it" in out.stderr and NO_MODEL in out.stderr
    # an admin key alone does not open a public address: it guards the admin routes, not /v1
    out = serve_fails_before_ray(tmp_path, "--host", "0.0.0.0", MOE_PLATFORM_ADMIN_KEY="adm")
    assert EXPOSED in out.stderr


@pytest.mark.parametrize("case, message", [
    ("argv", "keys are not taken from the command line"),
    ("admin-argv", "keys are not taken from the command line"),
    ("empty-file", "the file is empty"),
    ("missing-file", "cannot read the key"),
    ("same-keys", "the admin key must differ from the API key"),
    ("same-keys-env", "the admin key must differ from the API key"),
])
def test_serve_refuses_bad_keys(tmp_path, case, message):
    secret = "sk-do-not-print-me"
    args, env = {
        "argv": (["--api-key", secret], {}),
        "admin-argv": (["--admin-key", secret], {}),
        "empty-file": (["--api-key-file", key_file(tmp_path, "empty", " \n")], {}),
        "missing-file": (["--admin-key-file", str(tmp_path / "nope")], {}),
        "same-keys": (["--api-key-file", key_file(tmp_path, "a", secret), "--admin-key-file",
                       key_file(tmp_path, "b", secret + "\n")], {}),
        "same-keys-env": ([], {"MOE_PLATFORM_API_KEY": secret, "MOE_PLATFORM_ADMIN_KEY": secret}),
    }[case]
    out = serve_fails_before_ray(tmp_path, *args, **env)
    assert message in out.stderr and secret not in out.stdout + out.stderr


@pytest.mark.parametrize("option, message", [
    ("nope=1", "unknown engine options ['nope']"),
    ("core=fast", "core must be one of ['auto', 'process', 'thread']"),
    ("stream_interval=-1", "stream_interval must be an integer >= 0"),
    ("stream_interval", "expected KEY=VALUE"),
])
def test_serve_refuses_bad_engine_options_naming_them(tmp_path, option, message):
    out = serve_fails_before_ray(tmp_path, "--engine", option)
    assert message in out.stderr


def test_serve_engine_options_read_as_yaml_values():
    from moe_platform.cli_support import engine_options

    assert engine_options(["core=thread", "stream_interval=2", "enable_prefix_caching=false", "dtype=bfloat16"]) == {
        "core": "thread", "stream_interval": 2, "enable_prefix_caching": False, "dtype": "bfloat16"}
