"""Autograd-aware collectives that mark the entry and exit of a model-parallel region.

A tensor-parallel block keeps its input replicated on every rank of a group, computes a partial result from its
weight shard, and combines the partial results at the end. Each collective here is the forward of such a boundary
paired with the backward that keeps gradients exact:

=====================  ===============================  ===============================
function               forward                          backward
=====================  ===============================  ===============================
``copy_to_group``      identity                         all-reduce (sum) over the group
``reduce_from_group``  all-reduce (sum) over the group  identity
``gather_from_group``  all-gather, concatenate on dim   keep this rank's slice
``scatter_to_group``   keep this rank's slice           all-gather, concatenate on dim
=====================  ===============================  ===============================

``copy_to_group``/``reduce_from_group`` are conjugate: a replicated input enters a sharded computation through the
first (each rank's gradient is only its shard's part, so the parts are summed) and the partial outputs leave through
the second (the output is replicated, so every rank already holds the full gradient). ``gather_from_group`` assumes
what follows the gather runs replicated, so each rank's incoming gradient is the full one and its own slice is exact.

Every function is a no-op when `group` is None or has one rank (``ProcessGroups`` gives None for a degree of 1).
The collectives use only ``all_reduce`` and list ``all_gather``, which gloo (CPU) and NCCL (GPU) both implement.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["copy_to_group", "reduce_from_group", "gather_from_group", "scatter_to_group", "group_size", "group_rank",
           "sum_grad_over_group"]


def group_size(group) -> int:
    """Ranks in `group`; 1 for None (no parallelism along that axis)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This rank's index in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # A fresh contiguous buffer: collectives work in place, and autograd inputs/grads must not be modified.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def sum_grad_over_group(param: torch.Tensor, group) -> None:
    """Make `param`'s gradient the sum over `group` (a replicated parameter used inside a parallel region, where
    each rank's gradient covers only its part of the work, such as per-head query/key norms under tensor
    parallelism); every rank then holds the single-device gradient."""
    if group is not None and dist.get_world_size(group) > 1 and param.requires_grad:  # frozen (LoRA's base): none
        param.register_hook(lambda grad: _all_reduce(grad, group))


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)  # world x (..., n, ...) -> (..., world*n, ...)


def _own_slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[dim] % size:
        raise ValueError(
            f"cannot split dim {dim} of a tensor of shape {tuple(x.shape)} evenly over a group of {size} ranks"
        )
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)  # a new autograd node; no copy

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherOrScatter(torch.autograd.Function):
    """All-gather along `dim` (gather=True) or keep this rank's slice of it; each is the other's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, dim: int, gather: bool) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.gather = group, dim, gather
        return _all_gather(x, group, dim) if gather else _own_slice(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = _own_slice(grad, ctx.group, ctx.dim) if ctx.gather else _all_gather(grad, ctx.group, ctx.dim)
        return back, None, None, None


def _inactive(group) -> bool:
    return group is None or dist.get_world_size(group) == 1


def _normalise_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a parallel region: forward returns `x` unchanged, backward sums the gradient over `group`."""
    return x if _inactive(group) else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a parallel region: forward sums the partial results over `group`, backward passes the gradient on."""
    return x if _inactive(group) else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in group-rank order; backward keeps this rank's slice.

    Every rank must pass a tensor of the same shape.
    """
    return x if _inactive(group) else _GatherOrScatter.apply(x, group, _normalise_dim(x, dim), True)


def scatter_to_group(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Split `x` into equal chunks along `dim` and keep this rank's; backward all-gathers the gradient.

    Raises ValueError when the group size does not divide `x.shape[dim]`.
    """
    return x if _inactive(group) else _GatherOrScatter.apply(x, group, _normalise_dim(x, dim), False)


def collective_device() -> torch.device:
    """Where a small control tensor must live to take part in a collective: NCCL only reduces CUDA tensors."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank of the world (one all-reduce of a one-element tensor);
    `flag` itself when there is no process group."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
