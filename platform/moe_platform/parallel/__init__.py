"""Parallel layouts: planning and validation (layout), tensor/expert parallelism applied to the single-device model,
pipeline stages, and how each rank's shard maps onto the full tensors (sharding)."""

from __future__ import annotations

from moe_platform.parallel.layout import Layout, ProcessGroups, build_process_groups, plan_layout, validate_layout


def resolve_layout(cfg, world_size: int, model_args) -> Layout:
    """The layout a run uses on `world_size` ranks. A fully fixed layout that fits the world size is the user's
    explicit choice: it is validated strictly (an impossible one is an error naming the constraint and listing the
    valid layouts). Otherwise (automatic degrees, or an elastic world size the fixed degrees no longer fit) the
    planner chooses the closest valid layout."""
    p = cfg.parallel
    train = cfg.train
    if 0 not in (p.dp, p.tp, p.pp, p.ep):
        fixed = Layout(dp=p.dp, tp=p.tp, pp=p.pp, ep=p.ep)
        if fixed.world_size == world_size:
            validate_layout(fixed, world_size, model_args, train.global_batch_size, train.micro_batch_size)
            return fixed
    return plan_layout(world_size, model_args, p, train.global_batch_size, train.micro_batch_size)


def parallelize_model(model, groups: ProcessGroups) -> None:
    """Apply the layout's model parallelism in place, in a fixed order: tensor parallel, then expert parallel."""
    from moe_platform.parallel.expert_parallel import apply_ep
    from moe_platform.parallel.tensor_parallel import apply_tp

    if groups.layout.tp_enabled:
        apply_tp(model, groups)
    if groups.layout.ep_enabled:
        apply_ep(model, groups)


__all__ = ["Layout", "ProcessGroups", "build_process_groups", "parallelize_model", "plan_layout", "resolve_layout",
           "validate_layout"]
