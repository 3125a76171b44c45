"""Mixture-of-Experts layer: top-k softmax router, grouped SwiGLU experts, optional shared experts.

Tokens are sorted by expert once and every expert runs as one contiguous matmul over its tokens (grouped GEMM), then
results are scattered back weighted by the router. Balancing: the Switch/Mixtral auxiliary loss, DeepSeek-V3's
aux-loss-free routing bias, and an optional router z-loss. Dropless by default; a capacity factor drops overflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.args import ModelArgs


class _GroupedMatmul(torch.autograd.Function):
    """y[g] = x[g] @ w[g].T for contiguous row groups g of x; backward is the same loop transposed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # x: (N, K), w: (E, M, K) -> (N, M)
        out = x.new_empty(x.shape[0], w.shape[1])
        start = 0
        for g, n in enumerate(counts):
            if n:
                torch.mm(x[start:start + n], w[g].t(), out=out[start:start + n])
            start += n
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        start = 0
        for g, n in enumerate(ctx.counts):
            if n:
                dy = grad_out[start:start + n]
                if grad_x is not None:
                    torch.mm(dy, w[g], out=grad_x[start:start + n])
                if grad_w is not None:
                    torch.mm(dy.t(), x[start:start + n], out=grad_w[g])
            start += n
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: rows of x (N, K) are grouped by `counts` (E,); group g is multiplied by w[g].T (w: (E, M, K))."""
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    return _GroupedMatmul.apply(x, w, counts.tolist())


class _AttachAuxLoss(torch.autograd.Function):
    """Pass `out` through unchanged; in backward, also send gradient `scale` into the auxiliary loss.

    This lets each MoE layer add its balancing loss to the objective without threading it through the model's
    outputs, which keeps pipeline stages (that pass only activations) correct.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, grad_out.new_full(ctx.aux_shape, ctx.scale, dtype=torch.float32), None


class Router(nn.Module):
    """Linear gate over experts; top-k by softmax probability (+ the balancing bias when enabled)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k
        self.num_experts = args.num_experts
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.dim))
        self.use_bias = args.balancing == "bias"
        if self.use_bias:
            # Only steers which experts are chosen, never the mixing weights (DeepSeek-V3); updated outside autograd.
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
            self.register_buffer("load_since_update", torch.zeros(args.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (N, D) -> logits, probs: (N, E); weights, indices: (N, k)
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        scores = probs + self.expert_bias if self.use_bias else probs
        indices = torch.topk(scores, self.top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, indices


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights (Mixtral's layout): gate_up_proj (E, 2I, D), down_proj (E, D, I)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # x_sorted: (M, D) rows grouped by local expert, counts: (E_local,) -> (M, D)
        gate, up = grouped_mm(x_sorted, self.gate_up_proj, counts).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj, counts)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.top_k
        self.capacity_factor = args.capacity_factor
        self.aux_loss_coef = args.aux_loss_coef if args.balancing == "aux_loss" else 0.0
        self.z_loss_coef = args.z_loss_coef
        self.gate = Router(args)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.intermediate_size)
        self.shared_experts = (
            SwiGLU(args.dim, args.resolved_shared_intermediate_size * args.n_shared_experts)
            if args.n_shared_experts else None
        )
        # Set by the trainer to 1/grad_accum so the balancing loss is averaged like the main loss.
        self.aux_loss_scale = 1.0
        # A replacement for _dispatch_local (expert parallelism installs an all-to-all one); see parallel/.
        self.token_dispatcher = None
        self.last_aux_loss = torch.zeros(())
        self.last_tokens_per_expert = torch.zeros(args.num_experts, dtype=torch.long)

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (B, T, D) -> (N, D)
        logits, probs, weights, indices = self.gate(flat)
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)  # tokens routed to each expert
        dispatch = self.token_dispatcher or self._dispatch_local
        out = dispatch(flat, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.last_tokens_per_expert = counts.detach()
        if self.training:
            if self.gate.use_bias:
                self.gate.load_since_update += counts.to(self.gate.load_since_update.dtype)
            aux = self._balancing_loss(logits, probs, counts)
            if aux is not None:
                self.last_aux_loss = aux.detach()
                out = _AttachAuxLoss.apply(out, aux, self.aux_loss_scale)
        return out.reshape(shape)

    def _balancing_loss(self, logits, probs, counts) -> torch.Tensor | None:
        terms = []
        if self.aux_loss_coef > 0:
            # Switch/Mixtral form: E * sum_i (fraction of tokens picking i) * (mean router prob of i).
            frac = counts.float() / probs.shape[0]
            terms.append(self.aux_loss_coef * self.num_experts * torch.sum(frac * probs.mean(0)))
        if self.z_loss_coef > 0:
            terms.append(self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
        return sum(terms) if terms else None

    def _dispatch_local(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n_tokens = flat.shape[0]
        flat_expert = indices.reshape(-1)  # (N, k) -> (N*k,)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        if self.capacity_factor > 0:
            order, counts = self._drop_overflow(order, flat_expert, counts, self.capacity(n_tokens))
        token_of = order // self.top_k  # (M,) source token of each sorted assignment
        expert_out = self.experts(flat[token_of], counts)  # (M, D)
        w = weights.reshape(-1)[order].to(expert_out.dtype)
        out = torch.zeros_like(flat)
        # Sorted by expert, so each token sums its experts in expert order (the same order as Mixtral's loop).
        out.index_add_(0, token_of, expert_out * w[:, None])
        return out

    @staticmethod
    def _drop_overflow(order, flat_expert, counts, capacity: int):
        """Keep the first `capacity` assignments of each expert (in token order), drop the rest."""
        starts = torch.cumsum(counts, 0) - counts
        sorted_expert = flat_expert[order]
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_expert]
        keep = rank_in_expert < capacity
        return order[keep], counts.clamp(max=capacity)


@torch.no_grad()
def update_routing_biases(moe_layers: list[MoE], rate: float, loads: list[torch.Tensor] | None = None) -> None:
    """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

    `loads` lets a data-parallel trainer pass loads already summed over ranks so every rank applies the same update.
    """
    for i, moe in enumerate(moe_layers):
        if not moe.gate.use_bias:
            continue
        load = loads[i] if loads is not None else moe.gate.load_since_update
        moe.gate.expert_bias += rate * torch.sign(load.float().mean() - load.float())
        moe.gate.load_since_update.zero_()
