"""Config tree: TOML + overrides, and every kind of bad input named in the error."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from moe_platform.config import Config, config_to_toml, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


CONFIGS = REPO / "jobs" / "configs"
# What each shipped config is for, beyond the file's own lines (which the test compares one by one): the model it
# trains (the fine-tune takes its model from --init.from_hf), the layout and the workers it runs on.
SHIPPED = {
    "tiny.toml": {"model.dim": 128, "model.n_layers": 4, "model.num_experts": 16, "model.top_k": 2,
                  "model.n_shared_experts": 0, "model.balancing": "aux_loss", "data.format": "text",
                  "lora.enabled": False, "init.from_hf": "", "train.precision": "auto", "parallel.zero_stage": 1,
                  "elastic.min_workers": 1, "elastic.max_workers": 1, "layout@1": (1, 1, 1, 1),
                  "layout@2": (2, 1, 1, 1)},
    "finetune.toml": {"data.format": "chat", "data.packing": True, "data.truncation": "error", "init.from_hf": "",
                      "lora.enabled": False, "train.lr": 1e-5, "train.micro_batch_size": 1,
                      "parallel.dp": 0, "parallel.tp": 0, "parallel.pp": 0, "parallel.ep": 0,
                      "elastic.min_workers": 1, "elastic.max_workers": 8},
    "dpo.toml": {"train.objective": "dpo", "data.format": "preference", "init.from_hf": "", "lora.enabled": True,
                 "dpo.beta": 0.1, "dpo.loss_type": "sigmoid", "dpo.reference": "base", "train.micro_batch_size": 1,
                 "parallel.dp": 0, "parallel.ep": 0, "elastic.min_workers": 1, "elastic.max_workers": 8},
    "grpo.toml": {"train.objective": "grpo", "data.format": "prompts", "init.from_hf": "", "lora.enabled": True,
                  "grpo.group_size": 8, "grpo.clip_eps": 0.2, "grpo.kl_coef": 0.0, "grpo.loss_agg": "token_mean",
                  "grpo.reward": "moe_platform.rewards:exact_match", "grpo.rollout_workers": 1,
                  "train.global_batch_size": 64, "parallel.dp": 0, "elastic.min_workers": 1,
                  "elastic.max_workers": 8},
}


def test_every_shipped_config_is_in_the_table():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load(name, tmp_path):
    import tomllib

    from moe_platform.parallel import resolve_layout

    path = CONFIGS / name
    cfg = load_config(path)
    lines = 0
    for section, values in tomllib.loads(path.read_text()).items():  # every line of the file reaches the tree as is
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{name}: {section}.{key}"
            lines += 1
    assert lines >= 20, f"{name}: only {lines} settings read"
    for dotted, expected in SHIPPED[name].items():
        if dotted.startswith("layout@"):
            layout = resolve_layout(cfg, int(dotted.removeprefix("layout@")), cfg.model)
            assert (layout.dp, layout.tp, layout.pp, layout.ep) == expected, f"{name}: {dotted} is {layout}"
        else:
            section, key = dotted.split(".")
            assert getattr(getattr(cfg, section), key) == expected, f"{name}: {dotted}"
    rt = tmp_path / name
    rt.write_text(config_to_toml(cfg))
    assert load_config(rt) == cfg, f"{name} does not round-trip through config_to_toml"


def test_overrides_take_precedence_and_are_typed(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 0.5\nsteps = 10\nwarmup = 2\n")
    cfg = load_config(f, ["--train.lr=1e-3", "--parallel.dp", "2", "--train.deterministic=false", "--parallel.tp=auto"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 10
    assert cfg.parallel.dp == 2 and cfg.parallel.tp == 0 and cfg.train.deterministic is False


def test_toml_round_trip(tmp_path):
    cfg = load_config(None, ["--model.num_experts=8", "--run.name=x"])
    f = tmp_path / "rt.toml"
    f.write_text(config_to_toml(cfg))
    assert load_config(f) == cfg


def test_every_field_has_a_doc():
    def walk(cls, prefix):
        for fld in dataclasses.fields(cls):
            assert fld.metadata.get("doc"), f"{prefix}{fld.name} has no doc"

    walk(Config, "")
    for fld in dataclasses.fields(Config):
        walk(type(getattr(Config(), fld.name)), f"{fld.name}.")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--train.foo=1"], r"unknown config key 'train\.foo'"),
        (["--bogus.x=1"], r"unknown config section \[bogus\]"),
        (["--train.steps=ten"], r"train\.steps must be an integer"),
        (["--train.lr=fast"], r"train\.lr must be a number"),
        (["--train.deterministic=maybe"], r"train\.deterministic must be a boolean"),
        (["--train.steps=0"], r"train\.steps must be > 0"),
        (["--train.global_batch_size=10", "--train.micro_batch_size=4"], r"multiple of train\.micro_batch_size"),
        (["--model.n_heads=6", "--model.n_kv_heads=4"], r"n_heads \(6\) must be divisible by model\.n_kv_heads"),
        (["--model.top_k=20"], r"top_k \(20\) must be <= model\.num_experts"),
        (["--model.balancing=magic"], r"model\.balancing must be one of"),
        (["--data.format=sharegpt"], r"data\.format must be text, chat, preference or prompts, got 'sharegpt'"),
        (["--train.objective=ppo"], r"train\.objective must be lm, dpo or grpo, got 'ppo'"),
        (["--train.objective=dpo", "--init.from_hf=/m"], r"train\.objective = 'dpo' reads preference pairs: set "
                                                         r"data\.format = 'preference' \(got 'text'\)"),
        (["--data.format=preference"], r"data\.format = 'preference' is read by train\.objective = 'dpo' only"),
        (["--data.format=prompts"], r"data\.format = 'prompts' is read by train\.objective = 'grpo' only"),
        (["--train.objective=grpo"], r"train\.objective = 'grpo' reads prompts: set data\.format = 'prompts' "
                                     r"\(got 'text'\)"),
        (["--train.objective=grpo", "--data.format=prompts", "--grpo.group_size=6"],
         r"train\.global_batch_size \(16\) counts completions: it must be a multiple of grpo\.group_size \(6\)"),
        (["--train.objective=grpo", "--data.format=prompts", "--grpo.max_new_tokens=128"],
         r"grpo\.max_new_tokens \(128\) must be below train\.seq_len \(128\)"),
        (["--grpo.group_size=1"], r"grpo\.group_size must be >= 2"),
        (["--grpo.temperature=0"], r"grpo\.temperature must be a number > 0"),
        (["--grpo.top_p=0"], r"grpo\.top_p must be in \(0, 1\], got 0\.0"),
        (["--grpo.clip_eps=1.5"], r"grpo\.clip_eps must be in \(0, 1\), got 1\.5"),
        (["--grpo.kl_coef=-0.1"], r"grpo\.kl_coef must be a number >= 0, got -0\.1"),
        (["--grpo.loss_agg=sum"], r"grpo\.loss_agg must be token_mean or seq_mean, got 'sum'"),
        (["--grpo.reward=rewards.py"], r"grpo\.reward: 'rewards\.py' is not 'module:function'"),
        (["--grpo.reward=a:b,c:d", "--grpo.reward_weights=1"], r"grpo\.reward_weights has 1 weights for 2 reward"),
        (["--grpo.reward_weights=inf"], r"grpo\.reward_weights: 'inf' \(the weight of moe_platform\.rewards:exact_"
                                        r"match\) is not a finite number"),
        (["--grpo.rollout_workers=-1"], r"grpo\.rollout_workers must be >= 0"),
        (["--grpo.rollout_resources=CPU"], r"grpo\.rollout_resources: 'CPU' in 'CPU' is not NAME=amount"),
        (["--grpo.rollout_dtype=float16"], r"grpo\.rollout_dtype must be float32 or bfloat16"),
        (["--dpo.beta=0"], r"dpo\.beta must be a positive number, got 0\.0"),
        (["--dpo.loss_type=kto"], r"dpo\.loss_type must be one of sigmoid, ipo, hinge, got 'kto'"),
        (["--dpo.label_smoothing=0.5"], r"dpo\.label_smoothing must be in \[0, 0\.5\), got 0\.5"),
        (["--dpo.label_smoothing=0.1", "--dpo.loss_type=ipo"], r"dpo\.label_smoothing applies to loss_type = "
                                                               r"'sigmoid' only"),
        (["--dpo.reference="], r"dpo\.reference must be 'base' or a model directory"),
        (["--dpo.beta=sharp"], r"dpo\.beta must be a number"),
        (["--data.truncation=drop"], r"data\.truncation must be error or truncate"),
        (["--data.on_bad_row=ignore"], r"data\.on_bad_row must be error or skip"),
        (["--train.activation_checkpointing=some"], r"train\.activation_checkpointing must be none, full or selective"),
        (["--train.precision=fp8"], r"train\.precision must be auto, fp32, bf16 or fp16"),
        (["--train.fp16_loss_scale_window=0"], r"train\.fp16_loss_scale_window must be >= 1"),
        (["--train.seq_len=4096"], r"train\.seq_len \(4096\) must be <= model\.max_seq_len"),
        (["--data.vocab_size=100"], r"data\.vocab_size must be >= 264"),
        (["--elastic.min_workers=4", "--elastic.max_workers=2"], r"elastic\.max_workers \(2\) must be >="),
        (["--elastic.rank_cpus=1-x"], r"elastic\.rank_cpus: '1-x' in '1-x' is not a core or a range"),
        (["--elastic.rank_cpus=0-3;2"], r"elastic\.rank_cpus: cores \[2\] in '0-3;2' are given to two ranks"),
        (["--parallel.zero_stage=3"], r"parallel\.zero_stage must be 0, 1 or 2"),
        (["--train.lr=-1e-3"], r"train\.lr must be >= 0 \(0: a frozen run, the weights never move\), got -0\.001"),
        (["train.lr=1"], r"--section\.key=value"),
    ],
)
def test_bad_config_is_rejected_with_the_key_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_a_zero_learning_rate_is_a_frozen_run():
    from moe_platform.train.optim import lr_at

    cfg = load_config(None, ["--train.lr=0", "--train.steps=12", "--train.warmup=3"])
    assert cfg.train.lr == 0.0
    assert [lr_at(step, cfg.train) for step in range(12)] == [0.0] * 12  # warmup and cosine: zero throughout
    assert lr_at(2, load_config(None, ["--train.lr=0.3", "--train.steps=12", "--train.warmup=3"]).train) == 0.3


def test_bad_toml_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train\nlr = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_parse_overrides_needs_a_value():
    with pytest.raises(ValueError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_a_short_run_clamps_the_warmup_it_did_not_ask_for(caplog):
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.toml", ["--train.steps=12"])  # the file's warmup is 20
    assert cfg.train.steps == 12 and cfg.train.warmup == 12
    assert "train.warmup (20) is longer than the run" in caplog.text
    assert load_config(None, ["--train.steps=12", "--train.warmup=5"]).train.warmup == 5
    with pytest.raises(ValueError, match=r"train\.warmup must be in \[0, train\.steps\], got 30"):
        load_config(None, ["--train.steps=12", "--train.warmup=30"])  # asked for explicitly: an error


def test_rank_cpus_lists_each_local_ranks_cores():
    from moe_platform.config import rank_cpu_sets

    assert rank_cpu_sets("") == []
    assert rank_cpu_sets("0,2-3; 4-6") == [[0, 2, 3], [4, 5, 6]]


_PIN = """
import os, sys, threading
sys.path.insert(0, {platform!r})
from moe_platform.config import load_config
from moe_platform.train.launch import place_rank
import torch
ready, done = threading.Event(), threading.Event()
t = threading.Thread(target=lambda: (ready.set(), done.wait()), daemon=True)
t.start(); ready.wait()  # a thread that runs before the pinning, as torch's and Ray's do
place_rank(load_config(None, ["--elastic.rank_cpus=" + sys.argv[1]]), int(sys.argv[2]), 1)
print(sorted({{c for tid in os.listdir("/proc/self/task") for c in os.sched_getaffinity(int(tid))}}),
      torch.get_num_threads())
done.set(); t.join()
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_place_rank_pins_every_thread_of_the_rank(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "pin.py"
    script.write_text(_PIN.format(platform=str(Path(__file__).resolve().parents[2] / "platform")))
    cores = sorted(os.sched_getaffinity(0))
    spec = f"{cores[0]};{cores[1]}"

    def run(local_rank: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), spec, str(local_rank)], capture_output=True, text=True,
                              timeout=120)

    assert run(1).stdout.split("\n")[0] == f"[{cores[1]}] 1"  # every thread, the early one too, on rank 1's core
    out = run(2)
    assert out.returncode != 0 and "names cores for 2 local rank(s); local rank 2 has none" in out.stderr


def test_grpo_lists_and_tables_take_toml_arrays_or_commas(tmp_path):
    """grpo.reward, reward_weights and rollout_resources: a TOML array (or inline table) or the same comma-separated
    on the command line; config_to_toml writes them back in their string form."""
    from moe_platform.config import resource_amounts, reward_specs

    f = tmp_path / "g.toml"
    f.write_text('[train]\nobjective = "grpo"\n[data]\nformat = "prompts"\n[grpo]\n'
                 'reward = ["moe_platform.rewards:exact_match", "moe_platform.rewards:regex"]\n'
                 'reward_weights = [1.0, 0.5]\nrollout_resources = {CPU = 2, GPU = 0.5}\n')
    cfg = load_config(f)
    assert reward_specs(cfg.grpo.reward, cfg.grpo.reward_weights) == [("moe_platform.rewards:exact_match", 1.0),
                                                                      ("moe_platform.rewards:regex", 0.5)]
    assert resource_amounts(cfg.grpo.rollout_resources) == {"CPU": 2.0, "GPU": 0.5}
    same = load_config(None, ["--train.objective=grpo", "--data.format=prompts",
                              "--grpo.reward=moe_platform.rewards:exact_match, moe_platform.rewards:regex",
                              "--grpo.reward_weights=1.0,0.5", "--grpo.rollout_resources=CPU=2,GPU=0.5"])
    assert reward_specs(same.grpo.reward, same.grpo.reward_weights) == reward_specs(cfg.grpo.reward,
                                                                                    cfg.grpo.reward_weights)
    rt = tmp_path / "rt.toml"
    rt.write_text(config_to_toml(cfg))
    assert load_config(rt) == cfg
    f.write_text("[grpo]\nreward = [[1]]\n")
    with pytest.raises(ValueError, match=r"grpo.reward must be a string, a list of strings or numbers"):
        load_config(f)
