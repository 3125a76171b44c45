"""Run training as Ray Train (V2) workers: elastic, spot-tolerant, observable.

`launch_ray(cfg)` connects to a Ray cluster (`address`, else RAY_ADDRESS, else an embedded local one), refuses up
front what can never run (an unreachable cluster, more workers than the cluster can ever host, an impossible layout,
unwritable storage), then runs a `TorchTrainer` whose workers each run the same `Trainer` as the local launcher.
Ray sets up torch.distributed (gloo on CPU, NCCL on GPU) and LOCAL_RANK; every worker plans the layout for the world
size it got and resumes from the run's latest committed checkpoint, whatever layout wrote it.

The pieces: moe_platform.train.ray_preflight (checks before any worker starts), moe_platform.train.ray_worker
(what runs in each worker: checkpoints, reports, preemption, metrics), and this module, the driver.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_platform import ray_compat
from moe_platform.config import Config, config_to_dict
from moe_platform.train import resize
from moe_platform.train.ray_preflight import (
    check_cluster_fits,
    check_layouts,
    check_storage,
    connect,
    num_workers_for,
    with_absolute_paths,
    worker_range,
)
from moe_platform.train.ray_worker import train_loop_per_worker
from moe_platform.train.trainer import Trainer

log = logging.getLogger("moe_platform.train.ray")


# -- the driver ----------------------------------------------------------------------------------------------------


def _worker_runtime_env() -> dict | None:
    """Ship the library to the workers when it is imported from a source checkout rather than installed."""
    try:
        importlib.metadata.version("moe-platform")
        return None
    except importlib.metadata.PackageNotFoundError:
        import moe_platform

        return {"py_modules": [str(Path(moe_platform.__file__).parent)]}


def launch_ray(cfg: Config, address: str | None = None, progress: bool = True,
               on_export: Callable[[Path, int], None] | None = None,
               trainer_cls: type[Trainer] = Trainer) -> dict[str, Any]:
    """Train on Ray Train workers; returns rank 0's result (run_dir, final_step, final_loss, export_dir,
    resumed_from, layout, world_size) plus Ray's view of it (ray_checkpoint, ray_run_path). Rank 0's worker calls
    `on_export(export_dir, step)` after the final export (`moe_platform.cluster.registry.export_publisher`).
    `trainer_cls` runs the config's objective: `moe_platform.post_train.trainer_class(cfg.train.objective)` (the
    default, Trainer, runs lm)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer_cls.check_config(cfg)
    cfg = with_absolute_paths(cfg)
    num_workers = num_workers_for(cfg)
    lo, hi = worker_range(num_workers)
    check_layouts(cfg, lo, hi)
    run_dir, store = check_storage(cfg)
    e, f = cfg.elastic, cfg.failure
    per_worker = {"CPU": e.cpus_per_worker, **({"GPU": 1.0} if e.use_gpu else {})}
    started = connect(address, num_cpus=max(os.cpu_count() or 1, math.ceil(hi * e.cpus_per_worker)))
    try:
        check_cluster_fits(per_worker, lo, hi, address)
        ray_compat.prune_ray_index(store)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config_to_dict(cfg), "progress": progress, "on_export": on_export,
                               "trainer_cls": trainer_cls},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=e.use_gpu,
                                         resources_per_worker={"CPU": e.cpus_per_worker},
                                         elastic_resize_monitor_interval_s=e.resize_interval_s),
            run_config=RunConfig(
                name=cfg.run.name, storage_path=cfg.run.storage_path,
                failure_config=FailureConfig(max_failures=f.max_failures,
                                             max_preemption_failures=f.max_preemption_failures,
                                             preemption_grace_s=f.preemption_grace_s),
                worker_runtime_env=_worker_runtime_env(),
                callbacks=[resize.build_resize_callback(e.resize_checkpoint_timeout_s)] if lo < hi else None),
        )
        try:
            result = trainer.fit()
        finally:
            ray_compat.prune_ray_index(store)  # so that Ray's Result.from_path(run_dir) works afterwards
    finally:
        if started:
            ray.shutdown()
    out = dict(result.return_value or {})
    out["ray_checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    out["ray_run_path"] = result.path
    return out


__all__ = ["launch_ray", "num_workers_for", "train_loop_per_worker"]
