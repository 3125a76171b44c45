"""Where each rank's piece of a parameter sits in the full, single-device tensor (for resharding checkpoints)."""

from __future__ import annotations

import re

import torch

from moe_platform.checkpoint.sharded import ShardSpec
from moe_platform.model.args import ModelArgs
from moe_platform.model.transformer import MoETransformer
from moe_platform.parallel.layout import ProcessGroups
from moe_platform.parallel.tensor_parallel import tp_shard_spec

_EXPERT_TENSOR = re.compile(r"\.mlp\.experts\.(lora\.)?(gate_up_proj|down_proj)(_bias)?(\.[AB])?$")


def is_expert_tensor(name: str) -> bool:
    """Routed-expert weights: sharded over expert parallelism and reduced over the expert-data-parallel group."""
    return _EXPERT_TENSOR.search(name) is not None


def full_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and persistent buffer of the single-device model, without allocating it."""
    with torch.device("meta"):
        model = MoETransformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def local_shard_spec(name: str, full_shape: tuple[int, ...], groups: ProcessGroups | None) -> ShardSpec:
    """The boxes of the full tensor that this rank holds under its layout (experts over ep on dim 0, then tp)."""
    spec = ShardSpec.whole(full_shape)
    if groups is None:
        return spec
    box = list(spec.boxes[0])
    if groups.layout.ep_enabled and is_expert_tensor(name):
        n = full_shape[0] // groups.ep_size
        box[0] = (groups.ep_rank * n, (groups.ep_rank + 1) * n)
    tp = tp_shard_spec(name, full_shape, groups.tp_size) if groups.layout.tp_enabled else None
    if tp is None:
        return ShardSpec(full_shape, [box])
    dim, kind = tp
    r, size = groups.tp_rank, groups.tp_size
    if kind == "gate_up":
        half = full_shape[dim] // 2
        n = half // size
        gate, up = list(box), list(box)
        gate[dim] = (r * n, (r + 1) * n)
        up[dim] = (half + r * n, half + (r + 1) * n)
        return ShardSpec(full_shape, [gate, up], concat_dim=dim)
    n = full_shape[dim] // size
    box[dim] = (r * n, (r + 1) * n)
    return ShardSpec(full_shape, [box])
