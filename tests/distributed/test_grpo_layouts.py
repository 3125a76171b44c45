"""GRPO on every parallel layout trains like one process: real multi-process gloo runs on DeepSpeed (data, expert,
tensor and pipeline parallel) with the rollout engine in rank 0, compared per step with the single-process run (the
same rollouts and rewards, the loss and KL within 1e-5) and at the end (every parameter). Each layout recomputes the
policy's log-probabilities on its own shards and gathers its weights (or, with LoRA, its adapters) onto rank 0 for
the engine after every step: the engine's log-probabilities equal the learner's within 1e-5 at every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_platform.checkpoint import latest_checkpoint
from moe_platform.checkpoint.sharded import ShardedReader
from moe_platform.config import load_config
from moe_platform.post_train import GRPOTrainer
from moe_platform.train.launch import launch_local
from moe_platform.train.metrics import MetricsLog
from tinyrun import chatml_tokenizer, save_tiny_hf_model

STEPS = 6
GROUP = 4
COMMON = {"train.steps": STEPS, "train.global_batch_size": 2 * GROUP, "train.micro_batch_size": 2,
          "train.warmup": 0, "train.lr": 3e-3, "train.seq_len": 48, "checkpoint.interval": 0,
          "checkpoint.export": "false", "data.val_fraction": 0, "data.format": "prompts", "train.objective": "grpo",
          "grpo.group_size": GROUP, "grpo.max_new_tokens": 8, "grpo.reward": "tinyrun:checksum_reward",
          "grpo.rollout_workers": 0, "grpo.kl_coef": 0.05}
LAYOUTS = {"dp2-ep2": dict(dp=2, ep=2), "tp2": dict(tp=2), "pp2": dict(pp=2)}
LORA = {"lora.enabled": "true", "lora.targets": "q_proj,k_proj,v_proj,o_proj,experts", "lora.rank": 4}
# What each step logs that comes from the layout's own computation, compared like the loss; what comes from the
# rollouts (rewards, lengths) must be equal outright: the same weights make the same completions.
LEARNER = ("loss", "kl", "logps")
ROLLOUTS = ("reward", "reward_std", "response_length", "rollout_seed", "row_width")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpo-layouts")
    model = save_tiny_hf_model("Qwen3MoeForCausalLM", root / "qwen3", chatml_tokenizer(root / "tok"))[1]
    rows = root / "prompts.jsonl"
    # prompts of several lengths: the learner's rows (the round's longest sequence) change width from step to step
    rows.write_text("".join(json.dumps({"prompt": f"Count: {i}" + " and more" * (i % 4)}) + "\n" for i in range(24)))
    return {"model": model, "rows": rows, "storage": root / "runs"}


def config(inputs, name: str, degrees: dict | None = None, **extra):
    overrides = {**COMMON, "run.name": name, "run.storage_path": inputs["storage"], "init.from_hf": inputs["model"],
                 "data.path": inputs["rows"], **{f"parallel.{k}": v for k, v in (degrees or {}).items()}, **extra}
    return load_config(None, [f"--{k}={v}" for k, v in overrides.items()])


def run(cfg):
    return launch_local(cfg, progress=False, trainer_cls=GRPOTrainer)


def outcome(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    return MetricsLog(run_dir / "metrics.jsonl").read(), ShardedReader(latest_checkpoint(run_dir)).full_state_dict(
        "model")


def assert_matches(name: str, got: tuple, reference: tuple, param_atol: float) -> None:
    (recs, state), (ref_recs, ref_state) = got, reference
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for key in ROLLOUTS:
        assert [r[key] for r in recs] == [r[key] for r in ref_recs], f"{name}: {key}"
    for key in LEARNER:
        gaps = [abs(a[key] - b[key]) / max(abs(b[key]), 1.0) for a, b in zip(recs, ref_recs, strict=True)]
        assert max(gaps) <= 1e-5, f"{name}: per-step {key} gaps {gaps}"
    assert all(r["logp_gap"] <= 1e-5 for r in recs), f"{name}: {[r['logp_gap'] for r in recs]}"
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=param_atol, msg=lambda m, k=key: f"{name}: {k}: {m}")


# The weights after 6 steps agree within 1e-3 (a third of the learning rate), not 1e-5. Measured: at dp2·ep2 1 of the
# output head's 19k elements 1.3e-5 apart, at tp2 1 of a q_proj's 6144 elements 2.6e-4 apart, every other element
# within 1e-5. Such an element's gradient is rounding-sized (most of the head's rows belong to tokens no completion
# holds), and Adam divides each gradient by its own running size, which turns the layouts' summation order in a
# near-zero gradient into an lr-sized step (DPO's layouts see the same, tests/distributed/test_dpo_layouts.py). A
# wrong shard or a missed gradient moves whole rows by several learning rates.
PARAM_ATOL = 1e-3


@pytest.fixture(scope="module")
def reference(inputs):
    got = outcome(run(config(inputs, "single")).run_dir)
    assert len({r["reward"] for r in got[0]}) > 1 and all(r["logp_gap"] <= 1e-5 for r in got[0])
    assert len({r["row_width"] for r in got[0]}) > 1, "the rows' width must change for the pipeline to be tested"
    return got


@pytest.mark.parametrize("name", LAYOUTS)
def test_grpo_on_layouts_matches_one_process(name, inputs, reference):
    """Full fine-tuning with the KL penalty against a frozen reference copy sharded like the policy; every step's
    weights gathered from the shards onto rank 0 for the engine."""
    got = outcome(run(config(inputs, name, LAYOUTS[name])).run_dir)
    assert_matches(name, got, reference, param_atol=PARAM_ATOL)


def test_lora_grpo_on_a_pipeline_matches_one_process(inputs):
    """LoRA with the base as the KL reference on a pipeline: the adapters of both stages reach the engine."""
    single = outcome(run(config(inputs, "lora-single", **LORA)).run_dir)
    got = outcome(run(config(inputs, "lora-pp2", dict(pp=2), **LORA)).run_dir)
    assert_matches("LoRA at pp2", got, single, param_atol=PARAM_ATOL)
    assert all(r["sync_bytes"] == single[0][0]["sync_bytes"] for r in got[0])  # the adapters alone, whole
