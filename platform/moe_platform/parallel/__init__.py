"""Parallel layouts: planning and validation (layout), tensor/expert parallelism applied to the single-device model,
pipeline stages, and how each rank's shard maps onto the full tensors (sharding)."""

from __future__ import annotations

from moe_platform.parallel.layout import Layout, ProcessGroups, build_process_groups, plan_layout, validate_layout


def parallelize_model(model, groups: ProcessGroups) -> None:
    """Apply the layout's model parallelism in place, in a fixed order: tensor parallel, then expert parallel."""
    from moe_platform.parallel.expert_parallel import apply_ep
    from moe_platform.parallel.tensor_parallel import apply_tp

    if groups.tp_size > 1:
        apply_tp(model, groups)
    if groups.ep_size > 1:
        apply_ep(model, groups)


__all__ = ["Layout", "ProcessGroups", "build_process_groups", "parallelize_model", "plan_layout", "validate_layout"]
