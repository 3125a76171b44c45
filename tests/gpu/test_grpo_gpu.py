"""GRPO on CUDA in bf16: the rollout engine (bfloat16 weights and KV cache on the GPU) and the learner (bf16 autocast
over fp32 weights on the same GPU) give the sampled tokens the same log-probabilities up to bf16 rounding, at step 0
and after each sync, and both stay close to the CPU fp32 learner's. Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_platform.config import load_config
from moe_platform.post_train import GRPOTrainer
from moe_platform.post_train.grpo import token_logps
from tinyrun import chatml_tokenizer, save_tiny_hf_model

pytestmark = pytest.mark.gpu

GROUP = 4
# bf16 keeps 8 bits of mantissa: logits of a few units round by ~1e-2, and the two sides round in other places
# (the engine's bf16 KV cache and attention, the learner's fp32 norms and softmax under autocast).
MEAN_GAP, MAX_GAP = 0.02, 0.15


def grpo_cfg(tmp_path: Path, **extra):
    root = tmp_path / "m"
    policy = save_tiny_hf_model("Qwen3MoeForCausalLM", root / "policy", chatml_tokenizer(root / "tok"),
                                router_aux_loss_coef=0.0, output_router_logits=False)[1]
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Count: {i}", "pattern": r".*e.*"}) + "\n" for i in range(16)))
    overrides = {"run.name": "gpu", "run.storage_path": tmp_path / "runs", "init.from_hf": policy, "data.path": rows,
                 "data.format": "prompts", "train.objective": "grpo", "data.val_fraction": 0, "train.steps": 4,
                 "train.warmup": 0, "train.global_batch_size": 2 * GROUP, "train.micro_batch_size": GROUP,
                 "train.seq_len": 48, "train.lr": 5e-2, "checkpoint.interval": 0, "checkpoint.export": "false",
                 "grpo.group_size": GROUP, "grpo.max_new_tokens": 8, "grpo.reward": "tinyrun:checksum_reward",
                 "grpo.rollout_workers": 0, "train.device": "cuda", "train.precision": "bf16",
                 "grpo.rollout_device": "cuda", "grpo.rollout_dtype": "bfloat16", **extra}
    return load_config(None, [f"--{k}={v}" for k, v in overrides.items()])


def logps(trainer: GRPOTrainer, rnd: dict, state: dict, device: str, autocast: bool) -> tuple:
    """(the learner's log-probability of every sampled token under `state`, the engine's), on `device`."""
    model = trainer.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.to(device)
    inputs, (targets, _, side) = trainer._micro_batch(rnd, np.arange(len(rnd["tokens"])))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        ours = token_logps(model(inputs.to(device)), targets.to(device)).float().cpu()
    model.to(trainer.device)
    model.load_state_dict(saved)
    engine = side[..., 2].cpu()
    counted = ~torch.isnan(engine)
    return ours[counted], engine[counted]


def test_bf16_engine_and_learner_logps_agree_on_cuda_at_step_0_and_after_each_sync(tmp_path):
    trainer = GRPOTrainer(grpo_cfg(tmp_path), progress=False)
    trainer.setup()
    assert trainer.device.type == "cuda" and trainer.rollouts.engine.engine.device.type == "cuda"
    weights = [{k: v.clone() for k, v in trainer.model.state_dict().items()}]
    for step in range(4):
        rec = trainer.train_step()
        rnd = trainer.last_round
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        learner, engine = logps(trainer, rnd, weights[step], "cuda", autocast=True)
        gap = (learner - engine).abs()
        assert float(gap.mean()) <= MEAN_GAP and float(gap.max()) <= MAX_GAP, (step, gap.mean(), gap.max())
        assert rec["logp_gap"] <= MAX_GAP, (step, rec["logp_gap"])
        exact, _ = logps(trainer, rnd, weights[step], "cpu", autocast=False)  # the CPU fp32 learner's
        assert float((exact - engine).abs().mean()) <= MEAN_GAP, step
        if step:  # the check has teeth: the weights from before the sync score the tokens far further off
            stale, _ = logps(trainer, rnd, weights[step - 1], "cuda", autocast=True)
            assert float((stale - engine).abs().mean()) > 3 * float(gap.mean()), step
    trainer.close_rollouts()
