"""Expert parallelism: shard each MoE layer's routed experts over the ranks of an expert-parallel group.

`apply_ep(model, groups)` changes a single-device model in place: every MoE layer keeps only the experts this rank
owns (a contiguous block of E/ep experts, sliced along dim 0 of the stacked weights) and gets an all-to-all token
dispatcher in its `token_dispatcher` hook. The router stays replicated, so every rank still scores all E experts.

One MoE forward on an ep group of P ranks, each owning L = E/P experts::

    route locally          sort this rank's (token, expert) assignments by global expert id (+ capacity drop)
    exchange counts        all_to_all of (E,) counts -> (P, L): rows each source sends for each local expert
    send rows              all_to_all with split sizes: the rows for experts of rank j go to rank j
    regroup                received rows are (source, local expert) ordered -> permute to (local expert, source)
    experts                one grouped GEMM over the L local experts
    return                 inverse permutation, all_to_all back to the sources
    combine                weight by the router and index_add_ into the tokens, in global expert order

Both row exchanges are differentiable (`all_to_all_rows`: the backward is the same exchange with the split sizes
swapped), so the backward runs the mirror-image all-to-alls and each rank's expert weights receive the gradient of
every token that any rank of its ep group routed to them.

Gradient reduction: expert parameters are replicated only over the expert-data-parallel (edp) group, everything
else over the whole data-parallel group. Expert parameters carry DeepSpeed's MoE markers (`allreduce = False`,
`group_name = "ep_size_<ep>"`); DeepSpeed all-reduces such gradients over the expert-data-parallel group of that
name and averages them by the full data-parallel size, exactly what `reduce_expert_grads` does with plain
torch.distributed (the reference the tests use).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from moe_platform.model.moe import MoE

__all__ = [
    "EXPERT_TENSOR_SUFFIXES",
    "AllToAllDispatcher",
    "all_to_all_rows",
    "apply_ep",
    "ep_shard",
    "ep_unshard",
    "expert_param_names",
    "is_expert_param",
    "is_expert_tensor_name",
    "mark_expert_param",
    "reduce_expert_grads",
]

# State-dict names (suffixes) of the stacked routed-expert weights: (E, 2I, D) and (E, D, I), sharded on dim 0.
EXPERT_TENSOR_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.experts.gate_up_proj_bias",
                          "mlp.experts.down_proj_bias", "mlp.experts.lora.gate_up_proj.A",
                          "mlp.experts.lora.gate_up_proj.B", "mlp.experts.lora.down_proj.A",
                          "mlp.experts.lora.down_proj.B")


# ---- differentiable all-to-all -----------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Rows input_splits[j] of x go to rank j; rows output_splits[j] of the result come from rank j.

    The gradient of a received row belongs to the rank that sent it, so backward sends the gradients back along
    the same routes: the same all-to-all with input and output split sizes swapped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _all_to_all(grad_out, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable variable-size all-to-all along dim 0 of x over `group`.

    x: (sum(input_splits), ...) -> (sum(output_splits), ...). input_splits[j] rows (in order) go to group rank j;
    output_splits[j] is how many rows group rank j sends here. Every rank of `group` must call it (and, when a
    gradient is needed, run its backward) in the same order.
    """
    if len(output_splits) != len(input_splits):
        raise ValueError(f"all_to_all_rows: {len(output_splits)} output splits but {len(input_splits)} input splits")
    if x.shape[0] != sum(input_splits):
        raise ValueError(f"all_to_all_rows: x has {x.shape[0]} rows but input_splits sum to {sum(input_splits)}")
    return _AllToAllRows.apply(x, list(output_splits), list(input_splits), group)


# ---- the dispatcher ----------------------------------------------------------------------------------------------
def _source_to_expert_order(counts: torch.Tensor) -> torch.Tensor:
    """Gather index that reorders rows grouped (source, expert) into (expert, source) order.

    counts: (S, L) rows of each (source, expert) block, laid out source-major. Returns (R,) with R = counts.sum():
    position p of the expert-major layout takes row index[p] of the source-major layout.
    """
    blocks = counts.reshape(-1)  # (S, L) -> (S*L,), source-major block sizes
    src_start = (torch.cumsum(blocks, 0) - blocks).view_as(counts)  # first row of each block, source-major
    sizes = counts.t().reshape(-1)  # (L, S) -> (L*S,), expert-major block sizes
    dst_start = torch.cumsum(sizes, 0) - sizes
    total = int(blocks.sum())
    # every row moves by (its block's source-major start - its block's expert-major start)
    shift = torch.repeat_interleave(src_start.t().reshape(-1) - dst_start, sizes, output_size=total)
    return torch.arange(total, device=counts.device) + shift


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


class AllToAllDispatcher:
    """`MoE.token_dispatcher` for expert parallelism: routes rows to the ranks owning their experts and back.

    Called as `dispatcher(flat (N, D), weights (N, k), indices (N, k)) -> (N, D)`, a drop-in for
    `MoE._dispatch_local`: same sort by expert, same capacity drop (applied on the sending rank before the
    exchange, with the capacity of this rank's N tokens), same summation order per token (its experts in global
    expert order). Every rank of the ep group must call it for the same layers in the same order.
    """

    def __init__(self, moe: MoE, group, ep_size: int, ep_rank: int):
        if moe.num_experts % ep_size:
            raise ValueError(f"model.num_experts ({moe.num_experts}) must be divisible by ep ({ep_size})")
        self.moe = moe
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = moe.num_experts // ep_size
        # (ep, local experts): rows this rank's experts received from each source in the last forward (metrics/tests)
        self.last_received_counts = torch.zeros(ep_size, self.num_local_experts, dtype=torch.long)

    @property
    def local_expert_range(self) -> range:
        """Global ids of the experts this rank owns."""
        first = self.ep_rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def __repr__(self) -> str:
        r = self.local_expert_range
        return f"AllToAllDispatcher(ep={self.ep_size}, ep_rank={self.ep_rank}, experts={r.start}..{r.stop - 1})"

    def _exchange_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts (E,) this rank sends per global expert -> (ep, L) rows each source sends to each local expert."""
        received = torch.empty_like(counts)
        # E = ep blocks of L: block j (the counts for rank j's experts) goes to rank j
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        return received.view(self.ep_size, self.num_local_experts)

    def __call__(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        # (M,) kept assignments sorted by global expert, exactly as the single-device path keeps and orders them
        order, counts, token_of = moe.sort_assignments(indices)
        scores = weights.reshape(-1)[order]  # (M,)
        rows = flat.index_select(0, token_of)  # (N, D) -> (M, D)

        received_counts = self._exchange_counts(counts)  # (ep, L)
        self.last_received_counts = received_counts.detach()
        # sorted by global expert = grouped by owning rank, so one split per destination
        send_splits = counts.view(self.ep_size, self.num_local_experts).sum(1).tolist()
        recv_splits = received_counts.sum(1).tolist()
        received = all_to_all_rows(rows, recv_splits, send_splits, self.group)  # (R, D), (source, expert) order

        to_expert_major = _source_to_expert_order(received_counts)  # (R,)
        grouped = received.index_select(0, to_expert_major)  # (R, D), (expert, source) order
        expert_out = moe.experts(grouped, received_counts.sum(0))  # one grouped GEMM over the local experts
        expert_out = expert_out.index_select(0, _inverse_permutation(to_expert_major))  # back to (source, expert)
        out_rows = all_to_all_rows(expert_out, send_splits, recv_splits, self.group)  # (M, D), this rank's order

        out_rows = out_rows * scores[:, None].to(out_rows.dtype)
        # rows are sorted by global expert, so each token sums its experts in expert order, as _dispatch_local does
        return torch.zeros_like(flat).index_add_(0, token_of, out_rows)


# ---- parameter marking -------------------------------------------------------------------------------------------
def mark_expert_param(param: nn.Parameter, ep_size: int) -> None:
    """Tag `param` as an expert parameter with DeepSpeed's MoE attributes (see the module docstring)."""
    param.allreduce = False
    param.group_name = f"ep_size_{ep_size}"


def is_expert_param(param: torch.Tensor) -> bool:
    """True for parameters sharded by expert parallelism (DeepSpeed's `is_moe_param` test)."""
    return getattr(param, "allreduce", True) is False


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert-parallel parameters of `model`, in `named_parameters` order."""
    return [name for name, p in model.named_parameters() if is_expert_param(p)]


# ---- apply -------------------------------------------------------------------------------------------------------
def apply_ep(model: nn.Module, groups) -> None:
    """Shard the routed experts of every MoE layer of `model` over `groups.ep` and install all-to-all dispatch.

    In place. Rank `groups.ep_rank` keeps experts [ep_rank*E/ep, (ep_rank+1)*E/ep) of each layer (new, contiguous
    Parameters marked with `mark_expert_param`); the router and shared experts stay replicated. With ep = 1 the
    model is left unchanged (ordinary data parallelism reduces every gradient). Apply before building the optimizer,
    as the expert Parameters are replaced.
    """
    ep_size, ep_rank = groups.ep_size, groups.ep_rank
    if ep_size == 1:
        return
    if groups.ep is None:
        raise ValueError(
            f"expert parallelism over {ep_size} ranks needs the ep process group, but groups.ep is None; "
            "create the groups with build_process_groups after init_process_group"
        )
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for i, moe in enumerate(layers):  # validate everything before changing anything
        if moe.num_experts % ep_size:
            raise ValueError(
                f"model.num_experts ({moe.num_experts}) must be divisible by ep ({ep_size}) to shard experts evenly"
            )
        if moe.token_dispatcher is not None:
            raise ValueError(f"MoE layer {i} already has a token dispatcher ({moe.token_dispatcher!r}); "
                             "apply_ep must run once, on the unsharded model")
        held = moe.experts.gate_up_proj.shape[0]
        if held != moe.num_experts or moe.experts.down_proj.shape[0] != moe.num_experts:
            raise ValueError(f"MoE layer {i} holds {held} of {moe.num_experts} experts: it is already sharded")
    for moe in layers:
        n_local = moe.num_experts // ep_size
        first = ep_rank * n_local
        lora = getattr(moe.experts, "lora", None)  # the experts' adapters go with their experts
        owners = [(moe.experts, name) for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
                  if getattr(moe.experts, name) is not None]
        owners += [(lora[k], f) for k in lora for f in ("A", "B")] if lora is not None else []
        for owner, name in owners:
            full = getattr(owner, name)
            shard = nn.Parameter(full.detach()[first:first + n_local].clone(), requires_grad=full.requires_grad)
            mark_expert_param(shard, ep_size)
            setattr(owner, name, shard)
        moe.experts.num_experts = n_local  # experts stacked in this module now
        moe.token_dispatcher = AllToAllDispatcher(moe, groups.ep, ep_size, ep_rank)


# ---- checkpoint resharding ---------------------------------------------------------------------------------------
def is_expert_tensor_name(name: str) -> bool:
    """True for state-dict names of stacked routed-expert weights (any prefix, e.g. `module.` from a wrapper)."""
    return any(name == s or name.endswith("." + s) for s in EXPERT_TENSOR_SUFFIXES)


def ep_shard(name: str, full_tensor: torch.Tensor, ep_size: int, ep_rank: int) -> torch.Tensor:
    """This ep rank's shard of a full (unsharded) state-dict tensor.

    Expert tensors (`...mlp.experts.gate_up_proj` / `down_proj`, (E, ...)) -> a contiguous copy of experts
    [ep_rank*E/ep, (ep_rank+1)*E/ep); every other tensor is replicated and comes back as is (identity).
    """
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_shard({name!r}): need ep_size >= 1 and 0 <= ep_rank < ep_size, got {ep_size}, {ep_rank}")
    if not is_expert_tensor_name(name):
        return full_tensor
    num_experts = full_tensor.shape[0]
    if num_experts % ep_size:
        raise ValueError(f"{name}: {num_experts} experts (dim 0 of {tuple(full_tensor.shape)}) cannot be split "
                         f"evenly over ep ({ep_size}); model.num_experts must be divisible by ep")
    n = num_experts // ep_size
    return full_tensor[ep_rank * n:(ep_rank + 1) * n].clone()


def ep_unshard(name: str, shards: Iterable[torch.Tensor]) -> torch.Tensor:
    """The full tensor from the shards of all ep ranks (in ep-rank order); inverse of `ep_shard`.

    Expert tensors are concatenated along dim 0 ((ep x E/ep, ...) -> (E, ...)); other tensors are replicas and
    the first one comes back as is (identity).
    """
    shards = list(shards)
    if not shards:
        raise ValueError(f"ep_unshard({name!r}): no shards given")
    if not is_expert_tensor_name(name):
        return shards[0]
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"{name}: shards from different ep ranks disagree in shape: {sorted(shapes)}")
    return torch.cat(shards, dim=0)  # ep x (E/ep, ...) -> (E, ...)


# ---- reference gradient reduction --------------------------------------------------------------------------------
def _all_reduce_mean(grads: list[torch.Tensor], group, divisor: int) -> None:
    """grads[i] <- sum over `group` / divisor, flattened per dtype into one collective."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])  # one buffer, one all-reduce
        if group is not None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(divisor)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, groups, dp_size: int | None = None) -> None:
    """Average gradients the way DeepSpeed does for expert-parallel models, with plain torch.distributed.

    Expert parameters (`is_expert_param`): all-reduce SUM over the expert-data-parallel group, divide by the
    data-parallel size. Everything else: all-reduce SUM over the data-parallel group, divide by the data-parallel
    size. Each rank's gradient must come from its own unscaled micro-batch loss. A trainable parameter without a
    gradient counts as zero, so every rank joins the same collectives. `dp_size` defaults to `groups.dp_size`.
    """
    dp = groups.dp_size if dp_size is None else dp_size
    if dp < 1:
        raise ValueError(f"reduce_expert_grads: dp_size must be >= 1, got {dp}")
    expert, dense = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (expert if is_expert_param(p) else dense).append(p.grad)
    _all_reduce_mean(expert, groups.edp, dp)
    _all_reduce_mean(dense, groups.dp, dp)
