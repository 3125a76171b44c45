"""Trainer set-up pieces that need no process group: DeepSpeed's config as a pure function of the config and layout,
the one place that applies LoRA, activation checkpointing and parallelism to a model, and the rank-0-first block."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from moe_platform.model.transformer import build_model
from moe_platform.parallel.layout import Layout
from moe_platform.train.backends import build_deepspeed_config
from moe_platform.train.optim import clip_grad_norm
from moe_platform.train.trainer import DistContext, model_args_for, prepare_model, rank_zero_first


@pytest.mark.parametrize("layout, gas", [(Layout(), 8), (Layout(dp=2), 4), (Layout(dp=4, ep=2), 2),
                                         (Layout(dp=2, tp=2, pp=2), 4)])
def test_deepspeed_config_splits_the_batch_by_data_parallel_degree(tiny_config, layout, gas):
    cfg = tiny_config(**{"train.global_batch_size": 16, "train.micro_batch_size": 2, "train.grad_clip": 0.5,
                         "parallel.zero_stage": 1})
    ds = build_deepspeed_config(cfg, layout, "cpu", local_numel=1000)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == gas
    assert ds["train_batch_size"] == ds["gradient_accumulation_steps"] * 2 * layout.dp  # DeepSpeed's own check
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 1
    assert build_deepspeed_config(cfg, layout, "cpu", local_numel=1000) == ds  # pure: same input, same dict


def test_deepspeed_config_sizes_buckets_to_the_model(tiny_config):
    cfg = tiny_config()
    zero = [build_deepspeed_config(cfg, Layout(dp=2), "cpu", n)["zero_optimization"] for n in (10, 3 * 2**20, 10**10)]
    assert [z["reduce_bucket_size"] for z in zero] == [2**20, 3 * 2**20, 5 * 10**8]  # floor, the model, the cap
    assert all(z["allgather_bucket_size"] == z["reduce_bucket_size"] for z in zero)


@pytest.mark.parametrize("precision, device, bf16, fp16", [
    ("fp32", "cpu", False, False), ("bf16", "cpu", True, False), ("fp16", "cuda", False, True),
    ("auto", "cpu", False, False), ("auto", "cuda", True, False)])
def test_deepspeed_config_precision(tiny_config, precision, device, bf16, fp16):
    cfg = tiny_config(**{"train.precision": precision, "train.fp16_initial_scale_power": 12})
    ds = build_deepspeed_config(cfg, Layout(dp=2), device, 1000)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 12  # dynamic scaling from 2**12


def test_deepspeed_config_refuses_a_batch_that_does_not_split(tiny_config):
    cfg = tiny_config(**{"train.global_batch_size": 6, "train.micro_batch_size": 2})
    with pytest.raises(ValueError, match="global_batch_size 6 is not a whole number of micro batches of 2 on each of "
                                         "dp=2 ranks"):
        build_deepspeed_config(cfg, Layout(dp=2), "cpu", 1000)


def test_prepare_model_applies_lora_and_checkpointing_and_returns_full_shapes(tiny_config):
    cfg = tiny_config(**{"lora.enabled": True, "lora.rank": 4, "train.activation_checkpointing": "full"})
    model = build_model(model_args_for(cfg, 300), seed=0)
    before = {n for n, _ in model.named_parameters()}
    shapes = prepare_model(model, cfg, groups=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable), "LoRA leaves only adapters trainable"
    assert before < set(shapes) and trainable <= set(shapes) - before, "the shapes include the adapters"
    assert shapes == {n: tuple(t.shape) for n, t in model.state_dict().items()}  # one process: nothing sharded
    assert {layer.checkpointing for layer in model.model.layers} == {"full"}


def test_prepare_model_without_lora_leaves_every_weight_trainable(tiny_config):
    cfg = tiny_config()
    model = build_model(model_args_for(cfg, 300), seed=0)
    reference = {n: t.clone() for n, t in model.state_dict().items()}
    prepare_model(model, cfg, groups=None)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(reference[n], t) for n, t in model.state_dict().items())


class ThreadRanks(DistContext):
    """Ranks as threads of one process, meeting at a threading.Barrier: the ordering logic of rank_zero_first on
    its own (the process-group barrier it calls on several processes is tested by the distributed suite)."""

    def __init__(self, rank: int, world_size: int, meeting: threading.Barrier):
        super().__init__(rank=rank, world_size=world_size)
        self.meeting = meeting

    def barrier(self) -> None:
        self.meeting.wait(timeout=30)


def test_rank_zero_first_runs_rank_zero_before_every_other_rank():
    meeting, order, lock = threading.Barrier(3), [], threading.Lock()

    def rank(r: int) -> None:
        with rank_zero_first(ThreadRanks(r, 3, meeting)):
            with lock:
                order.append(("start", r))
            with lock:
                order.append(("end", r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (2, 1, 0)]  # the others are started first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert order[:2] == [("start", 0), ("end", 0)], order
    assert sorted(order[2:]) == [("end", 1), ("end", 2), ("start", 1), ("start", 2)]


def test_rank_zero_first_on_one_process_just_runs_the_block():
    ran = []
    with rank_zero_first(DistContext()):
        ran.append(True)
    assert ran == [True]


def test_clip_grad_norm_sums_in_fp64_and_clips_like_deepspeed():
    """One process clips with DeepSpeed's norm (each gradient's norm in fp64, then the norm of those) and coefficient,
    max_norm / (norm + 1e-6) at most 1. torch's fp32 vector_norm accumulates sequentially on CPU: 6e-5 low on the
    4096x128 head gradient of jobs/configs/tiny.toml, which set the one-process clip coefficient 9.4e-6 off every
    layout's."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((4096, 128), (16, 512, 128), (128,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    before = [p.grad.clone() for p in params]
    exact = math.sqrt(math.fsum(float(p.grad.double().pow(2).sum()) for p in params))

    assert abs(float(clip_grad_norm(params, 0.0)) - exact) <= 1e-12 * exact  # 0: the norm only, nothing clipped
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    assert abs(float(clip_grad_norm(params, 2 * exact)) - exact) <= 1e-12 * exact  # below max_norm: unchanged
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))

    assert abs(float(clip_grad_norm(params, exact / 4)) - exact) <= 1e-12 * exact  # the norm before clipping
    coef = (exact / 4) / (exact + 1e-6)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.grad, b * coef, rtol=1e-7, atol=0)
    assert float(clip_grad_norm([torch.nn.Parameter(torch.zeros(3))], 1.0)) == 0.0  # no gradient at all


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_backend_hands_the_loss_scale_to_the_balancing_losses(tiny_config, precision):
    from moe_platform.train.trainer import Trainer

    trainer = Trainer(tiny_config(**{"train.steps": 1, "train.warmup": 0, "train.precision": precision,
                                     "train.fp16_initial_scale_power": 12, "checkpoint.interval": 0}), progress=False)
    trainer.setup()
    trainer.train_step()
    want = 2.0**12 if precision == "fp16" else 1.0
    assert {moe.aux_grad_scale for moe in trainer.model.moe_layers()} == {want}
