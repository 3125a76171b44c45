"""AdamW with decay/no-decay groups, a stateless warmup + cosine schedule (the LR is a function of the step) and
global-norm gradient clipping computed as DeepSpeed computes it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from moe_platform.config import TrainConfig
from moe_platform.parallel.placement import is_expert_tensor


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms) and the embedding-free scalars do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps the CPU update order fixed, which exact resume relies on.
    kwargs = {"foreach": False} if fused is None else {"fused": fused}
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup then cosine down to lr * min_lr_ratio."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm_dtype(device: torch.device) -> torch.dtype:
    """What gradient norms are summed in: fp64 where the device has it (MPS has not), as DeepSpeed's ZeRO does."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global 2-norm of the gradients of `params` (fp64 where the device has it); when `max_norm` > 0 they are
    then scaled by max_norm / (norm + 1e-6) if that is below 1, the coefficient of torch.nn.utils.clip_grad_norm_ and
    of DeepSpeed. The norm is DeepSpeed's too (each gradient's norm in fp64, then the norm of those), so one process
    clips like every parallel layout: torch's fp32 `vector_norm` accumulates sequentially on CPU and comes out up to
    6e-5 low on a 5e5-element gradient (measured: 9.4e-6 low over the tiny MoE), which moved the single-process
    clip coefficient, and so every update, by that much against DeepSpeed's."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    dtype = grad_norm_dtype(grads[0].device)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=dtype) for g in grads]))
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return norm


EXPERT_PLACEHOLDER = "expert_placeholder"  # the name a pipeline stage's ExpertPlaceholder goes by in the groups


def deepspeed_param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig,
                           expert_parallel: bool) -> list[dict]:
    """decay/no-decay groups; under expert parallelism each split again into dense and expert parameters (DeepSpeed's
    'moe' groups, reduced over the expert-data-parallel group). Every pipeline stage must end up with the same groups
    (ZeRO reduces each group's gradient norm over the stages): without expert parallelism the experts share the dense
    groups, so a stage of dense layers only has the same groups as the others."""
    groups = []
    for is_expert in (False, True) if expert_parallel else (False,):
        for decay in (True, False):
            params = [p for n, p in named if p.requires_grad and (p.dim() >= 2) == decay and
                      (not expert_parallel or (is_expert_tensor(n) or n == EXPERT_PLACEHOLDER) == is_expert)]
            if not params:
                continue
            group = {"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                     "name": f"{'expert' if is_expert else 'dense'}-{'decay' if decay else 'no_decay'}"}
            if is_expert and getattr(params[0], "allreduce", True) is False:
                # DeepSpeed finds an expert group's reduction group by the group's name.
                group.update(moe=True, name=params[0].group_name)
            groups.append(group)
    return groups
