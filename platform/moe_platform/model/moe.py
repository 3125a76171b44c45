"""Mixture-of-Experts layer: top-k router (softmax or sigmoid scores, optionally group-limited), grouped SwiGLU
experts, optional shared experts.

Tokens are sorted by expert once and every expert runs as one contiguous matmul over its tokens (grouped GEMM), then
results are scattered back weighted by the router. Balancing: the Switch/Mixtral auxiliary loss, DeepSeek-V3's
aux-loss-free routing bias, and an optional router z-loss. Dropless by default; a capacity factor drops overflow.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_platform.model.adapter_hooks import adapted, with_adapter
from moe_platform.model.args import ModelArgs
from moe_platform.model.grouped_mm import GroupedSwiGLU, grouped_mm


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
    """Linear gate over experts. Scores are a softmax over the experts or a sigmoid per expert; the top-k experts are
    chosen over all experts or, group-limited, inside the best `topk_group` of `n_group` groups; the balancing bias
    (when enabled) only steers the choice. The mixing weights are the chosen experts' scores, optionally renormalised
    to sum to 1, times `routed_scaling_factor`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k
        self.num_experts = args.num_experts
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.dim))
        # a learned bias in the logits (gpt-oss), unlike the balancing bias below, which only steers the choice
        self.bias = nn.Parameter(torch.zeros(args.num_experts)) if args.router_bias else None
        self.use_bias = args.balancing == "bias"
        self.norm_topk_prob = args.norm_topk_prob
        self.scoring_func = args.scoring_func
        self.topk_method = args.topk_method
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.routed_scaling_factor = args.routed_scaling_factor
        if self.use_bias:
            # Only steers which experts are chosen, never the mixing weights (DeepSeek-V3's e_score_correction_bias);
            # updated outside autograd.
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (N, D) -> logits, probs: (N, E); weights, indices: (N, k)
        logits = F.linear(x, self.weight, self.bias)
        if self.scoring_func == "softmax":
            probs = torch.softmax(logits.float(), dim=-1)
        else:
            probs = torch.sigmoid(logits.float())
        scores = probs + self.expert_bias if self.use_bias else probs
        if self.topk_method != "greedy":
            scores = self._limit_to_groups(scores)
        indices = torch.topk(scores, self.top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
        if self.norm_topk_prob:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total + 1e-20 if self.scoring_func == "sigmoid" else total)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return logits, probs, weights, indices

    def _limit_to_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores outside each token's best `topk_group` groups masked out (N, E). A group's rank is its best score
        (group_limited_greedy, masked to 0 as DeepSeek-V2 does) or the sum of its two best (noaux_tc, masked to
        -inf)."""
        grouped = scores.view(-1, self.n_group, self.num_experts // self.n_group)  # (N, E) -> (N, G, E/G)
        if self.topk_method == "group_limited_greedy":
            group_scores, fill = grouped.max(dim=-1).values, 0.0
        else:
            group_scores, fill = grouped.topk(2, dim=-1).values.sum(dim=-1), float("-inf")
        best = torch.topk(group_scores, self.topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # (N, G)
        return grouped.masked_fill(~keep[..., None], fill).view_as(scores)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = getattr(self, "lora", None)
        if lora is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = F.silu(with_adapter(self.gate_proj(x), lora, "gate_proj", x)) * with_adapter(self.up_proj(x), lora,
                                                                                       "up_proj", x)
        return with_adapter(self.down_proj(h), lora, "down_proj", h)


def expert_activation(h: torch.Tensor, kind: str = "swiglu", alpha: float = 1.702,
                      limit: float = 7.0) -> torch.Tensor:
    """The experts' activation of pre-activations h (n, 2I) laid out [gate; up] -> (n, I): silu(gate) * up, or
    gpt-oss's clamped SwiGLU (gate clamped above and up on both sides at `limit`, then (up + 1) * gate *
    sigmoid(alpha * gate))."""
    gate, up = h.chunk(2, dim=-1)
    if kind == "swiglu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    return (up.clamp(min=-limit, max=limit) + 1) * (gate * torch.sigmoid(gate * alpha))


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights (Mixtral's layout): gate_up_proj (E, 2I, D), down_proj (E, D, I); with
    `bias`, gate_up_proj_bias (E, 2I) and down_proj_bias (E, D) too (gpt-oss)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, bias: bool = False, activation: str = "swiglu",
                 alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * hidden)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.activation, self.alpha, self.limit = activation, alpha, limit

    @property
    def plain(self) -> bool:
        """SwiGLU without biases: what the fused CPU kernel (GroupedSwiGLU) computes."""
        return self.gate_up_proj_bias is None and self.activation == "swiglu"

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The activation of pre-activations h (n, 2I) [gate; up] -> (n, I)."""
        return expert_activation(h, self.activation, self.alpha, self.limit)

    def add_bias(self, out: torch.Tensor, name: str, counts: torch.Tensor) -> torch.Tensor:
        """out (M, .) of rows grouped by expert (`counts`) plus each row's expert's bias `name` (none without)."""
        bias = self.gate_up_proj_bias if name == "gate_up_proj" else self.output_bias()
        if bias is None:
            return out
        experts = torch.repeat_interleave(torch.arange(len(counts), device=out.device), counts.to(out.device))
        return out + bias[experts].to(out.dtype)

    def output_bias(self) -> torch.Tensor | None:
        """The down projection's bias as this module adds it (tensor parallelism adds a share on each rank)."""
        return self.down_proj_bias

    def forward(self, x: torch.Tensor, counts: torch.Tensor, token_index: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> torch.Tensor:
        """Run every expert on its rows. counts: (E_local,) rows per expert, in expert order.

        Without token_index, x: (M, D) rows already grouped by expert -> (M, D), one output per row.
        With token_index (M,), row i is token x[token_index[i]] of x: (N, D) -> (N, D), each token the sum of its
        rows' outputs. scores (M,), when given, weight each row's output.
        """
        lora = getattr(self, "lora", None)
        if hasattr(lora, "experts_forward"):  # a serving batch's per-row adapters (serving/multi_lora.py)
            out = lora.experts_forward(self, x, counts, token_index, scores)
            if out is not None:
                return out
            lora = None
        # a training run's adapters fold into the weights (model/lora.py)
        gate_up_w = adapted(self.gate_up_proj, lora["gate_up_proj"] if lora is not None else None)
        down_w = adapted(self.down_proj, lora["down_proj"] if lora is not None else None)
        if x.device.type == "cpu" and self.plain:
            if not torch.is_autocast_enabled("cpu"):
                return GroupedSwiGLU.apply(x, gate_up_w, down_w, counts.tolist(), token_index, scores,
                                            torch.is_grad_enabled())
            # Under autocast the fused function runs in the autocast dtype as a whole (its output buffers take the
            # inputs' dtype); the casts of the weights carry their gradients back to the fp32 weights.
            dtype = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return GroupedSwiGLU.apply(x.to(dtype), gate_up_w.to(dtype), down_w.to(dtype), counts.tolist(),
                                            token_index, scores, torch.is_grad_enabled())
        rows = x if token_index is None else x[token_index]  # (N, D) -> (M, D)
        h = self.add_bias(grouped_mm(rows, gate_up_w, counts), "gate_up_proj", counts)
        out = self.add_bias(grouped_mm(self.activate(h), down_w, counts), "down_proj", counts)
        if scores is not None:
            out = out * scores[:, None].to(out.dtype)
        if token_index is None:
            return out
        # sorted by expert, so each token sums its experts in expert order (the same order as Mixtral's loop)
        return torch.zeros_like(x).index_add_(0, token_index, out)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = args.num_experts
        self.top_k = args.top_k
        self.capacity_factor = args.capacity_factor
        self.aux_loss_coef = args.aux_loss_coef if args.balancing == "aux_loss" else 0.0
        self.z_loss_coef = args.z_loss_coef
        self.gate = Router(args)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.intermediate_size, args.expert_bias,
                                      args.expert_activation, args.swiglu_alpha, args.swiglu_limit)
        self.shared_experts = (
            SwiGLU(args.dim, args.resolved_shared_intermediate_size * args.n_shared_experts)
            if args.n_shared_experts else None
        )
        # Qwen2-MoE: a per-token sigmoid gate scales the shared experts' contribution.
        self.shared_expert_gate = nn.Linear(args.dim, 1, bias=False) if args.shared_expert_gate else None
        # Set by the trainer to 1/grad_accum so the balancing loss is averaged like the main loss.
        self.aux_loss_scale = 1.0
        # Set by the trainer to fp16's current loss scale: the balancing loss's gradient is scaled like the main
        # loss's, so unscaling the gradients divides both alike (1.0 in every other precision).
        self.aux_grad_scale = 1.0
        # A replacement for _dispatch_local (expert parallelism installs an all-to-all one); see parallel/.
        self.token_dispatcher = None
        self.checkpoint_experts = False  # recompute dispatch and experts in backward (selective checkpointing)
        self.recomputing = False  # inside an activation-checkpoint recomputation: the step's stats are not counted
        self.reset_stats()

    def reset_stats(self) -> None:
        """The routing statistics (plain tensors, not state): what the last forward routed, and the step's sums."""
        self.last_aux_loss = torch.zeros(())
        self.last_tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.long)
        self.reset_step_stats()

    def recomputation_contexts(self):
        """`context_fn` of torch.utils.checkpoint: the recomputation of a checkpointed layer must not count this
        layer's tokens and balancing loss a second time."""
        return contextlib.nullcontext(), self._recomputing()

    @contextlib.contextmanager
    def _recomputing(self):
        self.recomputing = True
        try:
            yield
        finally:
            self.recomputing = False

    def reset_step_stats(self) -> None:
        """Per-optimizer-step sums over micro-batches: tokens per expert (routing-bias updates, metrics) and the
        balancing loss divided by the accumulation steps (what the objective received)."""
        self.step_load = torch.zeros(self.num_experts, dtype=torch.long)
        self.step_aux = torch.zeros(())

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (B, T, D) -> (N, D)
        logits, probs, weights, indices = self.gate(flat)
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)  # tokens routed to each expert
        if self.checkpoint_experts and torch.is_grad_enabled():
            out = checkpoint(self._experts_out, flat, weights, indices, use_reentrant=False)
        else:
            out = self._experts_out(flat, weights, indices)
        self.last_tokens_per_expert = counts.detach()
        if self.training:
            aux = self._balancing_loss(logits, probs, counts)
            if not self.recomputing:
                self.step_load = self.step_load.to(counts.device) + counts.detach()
            if aux is not None:
                if not self.recomputing:
                    self.last_aux_loss = aux.detach()
                    self.step_aux = self.step_aux.to(aux.device) + aux.detach() * self.aux_loss_scale
                out = _AttachAuxLoss.apply(out, aux, self.aux_loss_scale * self.aux_grad_scale)
        return out.reshape(shape)

    def _experts_out(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for each token, plus the shared experts': (N, D)."""
        dispatch = self.token_dispatcher or self._dispatch_local
        out = dispatch(flat, weights, indices)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out

    def _balancing_loss(self, logits, probs, counts) -> torch.Tensor | None:
        terms = []
        if self.aux_loss_coef > 0:
            # Switch/Mixtral form: E * sum_i (fraction of tokens picking i) * (mean router prob of i).
            frac = counts.float() / probs.shape[0]
            terms.append(self.aux_loss_coef * self.num_experts * torch.sum(frac * probs.mean(0)))
        if self.z_loss_coef > 0:
            terms.append(self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
        return sum(terms) if terms else None

    def sort_assignments(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert choices (N, k) -> the kept assignments sorted by expert (stable, so in token order within an
        expert): order (M,) into the flattened (N*k,) choices, counts (E,) per expert, source token (M,) of each."""
        flat_expert = indices.reshape(-1)  # (N, k) -> (N*k,)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        if self.capacity_factor > 0:
            order, counts = self._drop_overflow(order, flat_expert, counts, self.capacity(indices.shape[0]))
        return order, counts, order // self.top_k

    def _dispatch_local(self, flat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        order, counts, token_of = self.sort_assignments(indices)
        # gather, experts, router weighting and the scatter back to tokens run fused: (N, D) -> (N, D)
        return self.experts(flat, counts, token_index=token_of, scores=weights.reshape(-1)[order])

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

    The default load is each layer's `step_load`; a data-parallel trainer passes loads already summed over ranks so
    every rank applies the same update.
    """
    for i, moe in enumerate(moe_layers):
        if not moe.gate.use_bias:
            continue
        load = (loads[i] if loads is not None else moe.step_load).float().to(moe.gate.expert_bias.device)
        moe.gate.expert_bias += rate * torch.sign(load.mean() - load)
