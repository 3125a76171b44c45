"""Tensor parallelism (Megatron-style) applied in place to a single-device model.

Each rank of a tensor-parallel group keeps a slice of the big matrices and the group combines partial results with
one all-reduce per block in forward and one in backward:

* Attention: q/k/v projections are column-parallel (rank r keeps query heads [r*H/tp, (r+1)*H/tp) and key/value heads
  [r*KV/tp, (r+1)*KV/tp), so every local query head still finds its grouped-query key/value head locally); o_proj is
  row-parallel (the matching input columns). The block's input enters through `copy_to_group` and its output leaves
  through `reduce_from_group`. `Attention` derives head counts from projection sizes, so its forward runs unchanged.
* Routed experts: the intermediate dim I is split. gate_up_proj (E, 2I, D) keeps rows [r*I/tp, (r+1)*I/tp) of both its
  gate half and its up half, giving (E, 2I/tp, D) laid out [gate_local; up_local]; down_proj (E, D, I) keeps the
  same columns, giving (E, D, I/tp). Only dims 1 and 2 are touched, so this composes with expert parallelism (which
  slices dim 0) in either order.
* Shared experts (SwiGLU): gate_proj/up_proj column-parallel, down_proj row-parallel, entered and left the same way.
* q/k/v biases (Qwen2-MoE) split with their rows; per-head query/key norms (Qwen3-MoE) are replicated and their
  gradients summed over the group (each rank normalises only its heads); a norm over the whole projection (OLMoE)
  cannot be split, so such models run with tp = 1.
* Multi-head latent attention (DeepSeek) splits by heads: q_proj or q_b_proj and kv_b_proj keep the rows of this
  rank's heads, o_proj the matching columns. The down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms
  produce the latent every head reads, so they are replicated, computed on every rank, with their gradients summed
  over the group. o_proj's bias is added once: each rank adds bias / tp to its partial output before the reduction.
* Dense MLP layers (DeepSeek's and GLM's first layers) split like the shared experts.
* gpt-oss: the attention sinks split with their heads; o_proj's bias and the experts' down-projection bias are
  added once over the group (each rank adds bias / tp to its partial output, gradients summed); the experts'
  gate/up bias splits with its rows.
* Embedding, norms, router, the shared experts' sigmoid gate and lm_head stay replicated. A vocab-parallel
  embedding/head is a later optimisation; replicated is simpler and measured fine at the sizes we train.

Why the router needs care: it is replicated and runs outside the parallel region, but its mixing weights (`scores`)
scale the expert outputs inside it. Each rank's gradient w.r.t. the scores covers only its I/tp slice of the
activation, so the scores enter through `copy_to_group` as well; the summed gradient is then the single-device one on
every rank, the router's weight gradient is identical across the group (it is never reduced over tp), and the
gradient w.r.t. the layer input counts the router path once and sums the expert paths over the group. The expert
output is reduced exactly once, after the router weighting that `GroupedExperts` applies (weighting is linear, so
reducing before or after it is the same).

Implementation: parameters are replaced by their slices under the same attribute names, and the region boundaries are
forward hooks on the existing modules, so `state_dict` keys equal the single-device keys and checkpoints can be
resharded by name with `tp_shard_spec` / `shard_tensor` / `unshard_tensors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.attention import Attention
from moe_platform.model.mla import MLAttention
from moe_platform.model.moe import GroupedExperts, MoE, SwiGLU
from moe_platform.parallel.comm import copy_to_group, reduce_from_group, sum_grad_over_group
from moe_platform.parallel.layout import ProcessGroups

__all__ = ["apply_tp", "tp_shard_spec", "shard_tensor", "unshard_tensors", "SHARD_KINDS"]

# "contiguous": rank r holds the r-th of tp equal blocks of the dim.
# "gate_up": the dim is [gate; up]; rank r holds [r-th block of gate; r-th block of up].
SHARD_KINDS = ("contiguous", "gate_up")

_HEADS_HINT = "model.n_heads and model.n_kv_heads must be divisible by tp"
_EXPERT_HINT = "model.intermediate_size must be divisible by tp"
_SHARED_HINT = "the shared expert hidden size (shared_intermediate_size * n_shared_experts) must be divisible by tp"
_DENSE_HINT = "model.dense_intermediate_size must be divisible by tp"

# Parameter name relative to its module -> (split dim, kind, constraint named in errors). One table per module kind;
# `tp_shard_spec` (by full name) and `apply_tp` (by module) both read these, so the two cannot disagree.
_ATTENTION_SHARDS = {
    "q_proj.weight": (0, "contiguous", _HEADS_HINT),  # (H*hd, D): output rows are heads
    "k_proj.weight": (0, "contiguous", _HEADS_HINT),  # (KV*hd, D)
    "v_proj.weight": (0, "contiguous", _HEADS_HINT),
    "q_proj.bias": (0, "contiguous", _HEADS_HINT),  # (H*hd,): with the rows they add to (model.attention_bias)
    "k_proj.bias": (0, "contiguous", _HEADS_HINT),
    "v_proj.bias": (0, "contiguous", _HEADS_HINT),
    "o_proj.weight": (1, "contiguous", _HEADS_HINT),  # (D, H*hd): input columns are heads
    "sinks": (0, "contiguous", _HEADS_HINT),  # (H,): one learned logit per query head (gpt-oss)
    # Adapters (model/lora.py) follow their projection: B (out, r) with a column-parallel one, A (r, in) with a
    # row-parallel one. The other factor is replicated; its gradient is summed over the group (_REPLICATED_LORA).
    "lora.q_proj.B": (0, "contiguous", _HEADS_HINT),
    "lora.k_proj.B": (0, "contiguous", _HEADS_HINT),
    "lora.v_proj.B": (0, "contiguous", _HEADS_HINT),
    "lora.o_proj.A": (1, "contiguous", _HEADS_HINT),
}
# Multi-head latent attention: the up-projections are split by heads (rows of nope+v per head in kv_b_proj).
_MLA_SHARDS = {
    "q_proj.weight": (0, "contiguous", _HEADS_HINT),  # (H*qk, D)
    "q_b_proj.weight": (0, "contiguous", _HEADS_HINT),  # (H*qk, q_lora_rank)
    "kv_b_proj.weight": (0, "contiguous", _HEADS_HINT),  # (H*(nope+v), kv_lora_rank)
    "o_proj.weight": (1, "contiguous", _HEADS_HINT),  # (D, H*v)
    "lora.q_proj.B": (0, "contiguous", _HEADS_HINT),
    "lora.q_b_proj.B": (0, "contiguous", _HEADS_HINT),
    "lora.kv_b_proj.B": (0, "contiguous", _HEADS_HINT),
    "lora.o_proj.A": (1, "contiguous", _HEADS_HINT),
}
# Replicated inside MLA's parallel region: each rank's gradient covers only its heads' use of them.
_MLA_REPLICATED = ("q_a_proj.weight", "q_a_proj.bias", "q_a_layernorm.weight", "kv_a_proj_with_mqa.weight",
                   "kv_a_proj_with_mqa.bias", "kv_a_layernorm.weight", "lora.q_a_proj.A", "lora.q_a_proj.B",
                   "lora.kv_a_proj_with_mqa.A", "lora.kv_a_proj_with_mqa.B")
_EXPERT_SHARDS = {
    "gate_up_proj": (1, "gate_up", _EXPERT_HINT),  # (E, 2I, D)
    "down_proj": (2, "contiguous", _EXPERT_HINT),  # (E, D, I)
    "gate_up_proj_bias": (1, "gate_up", _EXPERT_HINT),  # (E, 2I): with its rows
    "lora.gate_up_proj.B": (1, "gate_up", _EXPERT_HINT),  # (E, 2I, r)
    "lora.down_proj.A": (2, "contiguous", _EXPERT_HINT),  # (E, r, I)
}


def _swiglu_shards(hint: str) -> dict:
    return {
        "gate_proj.weight": (0, "contiguous", hint),  # (I_s, D)
        "up_proj.weight": (0, "contiguous", hint),
        "down_proj.weight": (1, "contiguous", hint),  # (D, I_s)
        "lora.gate_proj.B": (0, "contiguous", hint),
        "lora.up_proj.B": (0, "contiguous", hint),
        "lora.down_proj.A": (1, "contiguous", hint),
    }


_SHARED_EXPERT_SHARDS = _swiglu_shards(_SHARED_HINT)
_DENSE_MLP_SHARDS = _swiglu_shards(_DENSE_HINT)
# The replicated adapter factors inside a parallel region: each rank's gradient covers only its share of the work.
_REPLICATED_LORA = ("lora.q_proj.A", "lora.k_proj.A", "lora.v_proj.A", "lora.o_proj.B", "lora.gate_up_proj.A",
                    "lora.down_proj.B", "lora.gate_proj.A", "lora.up_proj.A", "lora.q_b_proj.A", "lora.kv_b_proj.A")
# Module path (as named in the single-device model) -> its table. Attention names are looked up in the GQA table,
# then in MLA's (whose q_proj and o_proj split alike; q_b_proj and kv_b_proj exist only there).
_SCOPES = (
    ("self_attn", _ATTENTION_SHARDS),
    ("self_attn", _MLA_SHARDS),
    ("mlp.experts", _EXPERT_SHARDS),
    ("mlp.shared_experts", _SHARED_EXPERT_SHARDS),
    ("mlp", _DENSE_MLP_SHARDS),
)


# ---- name-based sharding rules (checkpoint resharding) --------------------------------------------------------
def _lookup(name: str) -> tuple[int, str, str] | None:
    for scope, table in _SCOPES:
        for rel, spec in table.items():
            suffix = f"{scope}.{rel}"
            if name == suffix or name.endswith("." + suffix):
                return spec
    return None


def _check_split(name: str, shape: Sequence[int], dim: int, kind: str, hint: str, tp_size: int) -> None:
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    if len(shape) <= dim:
        raise ValueError(f"{name}: expected a tensor with at least {dim + 1} dims to split along dim {dim}, "
                         f"got shape {tuple(shape)}")
    size = shape[dim]
    parts = 2 * tp_size if kind == "gate_up" else tp_size
    if size % parts:
        what = "each half ([gate; up]) of " if kind == "gate_up" else ""
        raise ValueError(
            f"{name}: cannot split {what}dim {dim} (size {size}) of shape {tuple(shape)} over tp={tp_size}; "
            f"{hint}"
        )


def tp_shard_spec(name: str, shape: Sequence[int], tp_size: int) -> tuple[int, str] | None:
    """How the full-model parameter `name` of `shape` is split over `tp_size` ranks: (dim, kind), or None if it is
    replicated. kind is "contiguous" (rank r holds block r of the dim) or "gate_up" (the dim is [gate; up] and rank r
    holds block r of each half). `name` is a single-device parameter name; any prefix (e.g. a wrapper's "module.") is
    ignored. Raises ValueError when the dim is not divisible as the split requires.
    """
    spec = _lookup(name)
    if spec is None:
        return None
    dim, kind, hint = spec
    _check_split(name, tuple(shape), dim, kind, hint, tp_size)
    return dim, kind


def _split(full: torch.Tensor, dim: int, kind: str, tp_size: int, tp_rank: int) -> torch.Tensor:
    if kind == "gate_up":
        gate, up = full.chunk(2, dim=dim)  # (.., 2I, ..) -> 2 x (.., I, ..)
        return torch.cat([gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def shard_tensor(name: str, full: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The part of full-model tensor `name` that tensor-parallel rank `tp_rank` of `tp_size` holds.

    Sharded tensors come back as new compact tensors (no storage shared with `full`); replicated ones are `full`.
    """
    spec = tp_shard_spec(name, full.shape, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    if spec is None:
        return full
    return _split(full, *spec, tp_size, tp_rank).clone(memory_format=torch.contiguous_format)


def unshard_tensors(name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rebuild full-model tensor `name` from the shards of every tensor-parallel rank, in tp-rank order.

    Replicated tensors come back as the first shard (every rank holds the same values).
    """
    if len(shards) == 0:
        raise ValueError(f"{name}: unshard_tensors needs at least one shard")
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"{name}: shards must all have the same shape, got {sorted(shapes)}")
    spec = _lookup(name)
    if spec is None:
        return shards[0]
    dim, kind, hint = spec
    shard_shape = list(shards[0].shape)
    if len(shard_shape) <= dim:
        raise ValueError(f"{name}: shard of shape {tuple(shard_shape)} has no dim {dim} to join along")
    if kind == "gate_up" and shard_shape[dim] % 2:
        raise ValueError(f"{name}: a gate_up shard needs an even dim {dim} ([gate; up]), got {tuple(shard_shape)}")
    if kind == "gate_up":
        halves = [s.chunk(2, dim=dim) for s in shards]  # tp x ((.., I/tp, ..) gate, (.., I/tp, ..) up)
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)  # -> (.., 2I, ..)
    return torch.cat(list(shards), dim=dim)


# ---- applying tensor parallelism to a live model --------------------------------------------------------------
def _shard_module_params(module: nn.Module, table: dict, tp_size: int, tp_rank: int, where: str) -> None:
    """Replace each parameter of `table` in `module` by this rank's slice, under the same name."""
    for rel, (dim, kind, hint) in table.items():
        owner_path, _, attr = rel.rpartition(".")
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:  # an adapter this model does not have
            continue
        param = getattr(owner, attr, None)
        if param is None:  # an optional parameter this model does not have (a bias, sinks)
            continue
        _check_split(f"{where}.{rel}", tuple(param.shape), dim, kind, hint, tp_size)
        with torch.no_grad():
            local = _split(param.detach(), dim, kind, tp_size, tp_rank).clone(memory_format=torch.contiguous_format)
        new = nn.Parameter(local, requires_grad=param.requires_grad)
        new.tensor_model_parallel = True
        new.partition_dim = dim
        setattr(owner, attr, new)
        if isinstance(owner, nn.Linear) and attr == "weight":  # keep repr/introspection truthful
            owner.out_features, owner.in_features = new.shape


def _enter_region_hook(group, arguments: tuple[tuple[int, str], ...]):
    """Forward pre-hook: route the named inputs (by position or keyword) through copy_to_group."""

    def hook(module, args, kwargs):
        args = list(args)
        for pos, key in arguments:
            if key in kwargs:
                if kwargs[key] is not None:
                    kwargs[key] = copy_to_group(kwargs[key], group)
            elif pos < len(args) and args[pos] is not None:
                args[pos] = copy_to_group(args[pos], group)
        return tuple(args), kwargs

    return hook


def _leave_region_hook(group):
    """Forward hook: sum the partial outputs of the group's ranks."""

    def hook(module, args, output):
        return reduce_from_group(output, group)

    return hook


def _make_parallel_region(module: nn.Module, group, arguments: tuple[tuple[int, str], ...]) -> None:
    module.register_forward_pre_hook(_enter_region_hook(group, arguments), with_kwargs=True)
    module.register_forward_hook(_leave_region_hook(group))


def _require_unsharded(module: nn.Module, where: str) -> None:
    if getattr(module, "_tp_size", 1) != 1:
        raise ValueError(f"apply_tp was already applied to {where} (tp={module._tp_size}); apply it once")


def _validate(model: nn.Module, tp: int) -> None:
    """Every divisibility constraint, checked before anything is changed so a failure leaves the model intact."""
    for where, m in model.named_modules():
        if isinstance(m, MLAttention):
            _require_unsharded(m, where)
            if m.n_heads % tp:
                raise ValueError(f"{where}: model.n_heads must be divisible by tp; got n_heads={m.n_heads}, tp={tp}")
        elif isinstance(m, SwiGLU) and where.endswith(".mlp") and m.gate_proj.out_features % tp:
            raise ValueError(f"{where}: {_DENSE_HINT}; got {m.gate_proj.out_features}, tp={tp}")
        elif isinstance(m, Attention):
            _require_unsharded(m, where)
            if m.n_heads % tp or m.n_kv_heads % tp:
                raise ValueError(
                    f"{where}: {_HEADS_HINT}; got n_heads={m.n_heads}, n_kv_heads={m.n_kv_heads}, tp={tp}"
                )
            if m.qk_norm == "full":
                raise ValueError(f"{where}: model.qk_norm = 'full' normalises over every head; it cannot be split "
                                 f"over tp={tp}")
        elif isinstance(m, MoE):
            _require_unsharded(m.experts, f"{where}.experts")
            inter = m.experts.down_proj.shape[-1]
            if m.experts.gate_up_proj.shape[1] != 2 * inter:
                raise ValueError(
                    f"{where}.experts: gate_up_proj {tuple(m.experts.gate_up_proj.shape)} and down_proj "
                    f"{tuple(m.experts.down_proj.shape)} disagree on the intermediate size"
                )
            if inter % tp:
                raise ValueError(f"{where}.experts: {_EXPERT_HINT}; got intermediate_size={inter}, tp={tp}")
            if m.shared_experts is not None and m.shared_experts.gate_proj.out_features % tp:
                raise ValueError(
                    f"{where}.shared_experts: {_SHARED_HINT}; got {m.shared_experts.gate_proj.out_features}, tp={tp}"
                )


class _BiasSharedLinear(nn.Linear):
    """A row-parallel nn.Linear whose bias is added once over its tensor-parallel group: each rank adds bias / tp to
    its partial output before the group's outputs are summed (the bias keeps its name, shape and values)."""

    tp_size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias / self.tp_size)


def _apply_tp_mla(m: MLAttention, group, tp: int, rank: int, where: str) -> None:
    m._tp_size = tp
    _shard_module_params(m, _MLA_SHARDS, tp, rank, where)
    m.n_heads //= tp
    m.n_kv_heads //= tp
    for rel in _MLA_REPLICATED:
        owner_path, _, attr = rel.rpartition(".")
        try:
            p = getattr(m.get_submodule(owner_path), attr)
        except AttributeError:  # a low-rank query, a bias or an adapter this model does not have
            continue
        if p is not None:
            sum_grad_over_group(p, group)
    _share_output_bias(m.o_proj, tp, group)
    _make_parallel_region(m, group, ((0, "x"),))


def _share_output_bias(linear: nn.Linear, tp: int, group) -> None:
    """A row-parallel projection's bias, added once over the group (`_BiasSharedLinear`)."""
    if linear.bias is not None:
        linear.__class__ = _BiasSharedLinear
        linear.tp_size = tp
        sum_grad_over_group(linear.bias, group)


class _BiasSharedExperts(GroupedExperts):
    """Routed experts whose intermediate dim is split over the group: each rank adds down_proj_bias / tp to its
    partial output (the bias keeps its name, shape and values)."""

    tp_size = 1

    def output_bias(self) -> torch.Tensor | None:
        return None if self.down_proj_bias is None else self.down_proj_bias / self.tp_size


def apply_tp(model: nn.Module, groups: ProcessGroups) -> None:
    """Shard attention and expert weights over the tensor-parallel group of `groups`, in place.

    Call it on the single-device model (an `MoETransformer` or any module holding its layers) before the optimizer
    is built, as it replaces parameters. Every parameter afterwards carries `tensor_model_parallel` (True for
    shards, with `partition_dim` the dim they are split along; False for replicated ones), which DeepSpeed's
    gradient-norm code uses to count replicated parameters once. With tp == 1 only the markers are set.
    Attention modules' `n_heads`/`n_kv_heads` become the local head counts (size a KV cache with them).
    """
    tp, rank, group = groups.tp_size, groups.tp_rank, groups.tp
    if groups.layout.tp_enabled and group is None:
        raise ValueError(f"layout {groups.layout} has tp={tp} but ProcessGroups.tp is None; build the groups with "
                         "build_process_groups")
    if groups.layout.tp_enabled:
        _validate(model, tp)
        for where, m in list(model.named_modules()):
            if isinstance(m, MLAttention):
                _apply_tp_mla(m, group, tp, rank, where)
            elif isinstance(m, SwiGLU) and where.endswith(".mlp"):  # a dense layer's MLP
                _shard_module_params(m, _DENSE_MLP_SHARDS, tp, rank, where)
                _make_parallel_region(m, group, ((0, "x"),))
            elif isinstance(m, Attention):
                m._tp_size = tp
                _shard_module_params(m, _ATTENTION_SHARDS, tp, rank, where)
                m.n_heads //= tp
                m.n_kv_heads //= tp
                if m.qk_norm == "head":  # replicated, but each rank normalises only its own heads
                    for norm in (m.q_norm, m.k_norm):
                        sum_grad_over_group(norm.weight, group)
                _share_output_bias(m.o_proj, tp, group)
                _make_parallel_region(m, group, ((0, "x"),))
            elif isinstance(m, MoE):
                m.experts._tp_size = tp
                _shard_module_params(m.experts, _EXPERT_SHARDS, tp, rank, f"{where}.experts")
                if m.experts.down_proj_bias is not None:  # added once over the group
                    m.experts.__class__ = _BiasSharedExperts
                    m.experts.tp_size = tp
                    sum_grad_over_group(m.experts.down_proj_bias, group)
                # x and the router scores are both replicated inputs whose gradient is partial on each rank.
                _make_parallel_region(m.experts, group, ((0, "x"), (3, "scores")))
                if m.shared_experts is not None:
                    _shard_module_params(m.shared_experts, _SHARED_EXPERT_SHARDS, tp, rank, f"{where}.shared_experts")
                    _make_parallel_region(m.shared_experts, group, ((0, "x"),))
        for name, p in model.named_parameters():
            if any(name.endswith("." + rel) for rel in _REPLICATED_LORA):
                sum_grad_over_group(p, group)
    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.tensor_model_parallel = False
