"""The learner's weights as the rollout engines take them: whole tensors under our names, on rank 0.

On one process, or a layout that only splits data (ZeRO 1/2 keeps every parameter whole on every data-parallel
rank), rank 0 holds every tensor already: nothing moves between ranks. Under tensor, expert or pipeline parallelism
each rank holds parts: every distinct part (dense tensors from data-parallel rank 0, expert tensors from
expert-data-parallel rank 0, as checkpoints write them) goes to rank 0 in one gather, which puts the whole tensors
together by their shard boxes. With LoRA the adapters are what changes: `which = "adapters"` gathers only them
(a few MB), `which = "base"` the frozen rest once, when the rollout engines start.
"""

from __future__ import annotations

import torch

from moe_platform.model.lora import is_lora_name
from moe_platform.parallel.layout import ProcessGroups
from moe_platform.parallel.placement import is_expert_tensor

WHICH = ("all", "base", "adapters")


def _wanted(name: str, which: str) -> bool:
    return which == "all" or (is_lora_name(name) == (which == "adapters"))


def _local_tensors(backend) -> list[tuple[str, torch.Tensor]]:
    """This rank's tensors by full name: the model's (one process), or the rank's shards and stages (DeepSpeed)."""
    local = getattr(backend, "local_tensors", None)
    return list(local) if local is not None else list(backend.model.state_dict().items())


def gather_policy(backend, groups: ProcessGroups | None, which: str = "all") -> dict[str, torch.Tensor] | None:
    """The policy's tensors (`which`: all, base or adapters) as whole tensors on rank 0 (live tensors where rank 0
    holds them whole: copy before the learner steps again); None on the other ranks. Collective: every rank calls."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    local = [(n, t.detach()) for n, t in _local_tensors(backend) if _wanted(n, which) and not t.is_meta]
    if groups is None:
        return dict(local)
    layout = groups.layout
    if not (layout.tp_enabled or layout.pp_enabled or layout.ep_enabled):
        return dict(local) if groups.rank == 0 else None
    specs = backend.specs
    parts = []
    for name, t in local:
        owner = groups.edp_rank == 0 if (layout.ep_enabled and is_expert_tensor(name)) else groups.dp_rank == 0
        if owner:
            spec = specs[name]
            parts.append((name, spec.full_shape, spec.boxes, spec.concat_dim, t.cpu()))
    gathered = [None] * layout.world_size if groups.rank == 0 else None
    torch.distributed.gather_object(parts, gathered, dst=0)
    if groups.rank != 0:
        return None
    whole: dict[str, torch.Tensor] = {}
    for name, full_shape, boxes, dim, t in (p for rank_parts in gathered for p in rank_parts):
        out = whole.setdefault(name, torch.empty(full_shape, dtype=t.dtype))
        sizes = [box[dim][1] - box[dim][0] for box in boxes]
        for box, piece in zip(boxes, torch.split(t, sizes, dim=dim), strict=True):
            out[tuple(slice(a, b) for a, b in box)] = piece
    return whole
