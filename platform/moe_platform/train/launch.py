"""Run a training job as several ranks on this machine (torch multiprocessing; gloo on CPU, NCCL on GPU).

The Ray Train launcher runs the very same per-rank function inside Ray workers; this one needs nothing but torch.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from moe_platform.config import Config, config_from_dict, config_to_dict
from moe_platform.parallel import resolve_layout
from moe_platform.train.backends import check_precision
from moe_platform.train.trainer import DistContext, Trainer, TrainerHooks, TrainResult, model_args_for


def world_size_for(cfg: Config) -> int:
    """Ranks a run needs: the product of fixed degrees, or elastic.max_workers when some degree is automatic."""
    p = cfg.parallel
    if 0 in (p.dp, p.tp, p.pp):
        return cfg.elastic.max_workers
    return p.dp * p.tp * p.pp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world_size: int, local_rank: int, master: str, port: int) -> None:
    """Join (or create) the job's process group; the env vars are the ones DeepSpeed and torchrun read."""
    os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(world_size))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)


def run_rank(cfg: Config, dist: DistContext, progress: bool, stop_after: int | None = None,
             on_export: Callable[[Path, int], None] | None = None) -> TrainResult:
    trainer = Trainer(cfg, progress=progress, dist=dist, hooks=TrainerHooks(on_export=on_export))
    trainer.setup()
    return trainer.fit(stop_after=stop_after)


def _worker(rank: int, world_size: int, port: int, cfg_dict: dict, progress: bool, stop_after, out: str,
            on_export) -> None:
    # Each rank gets its share of the cores, so ranks do not fight over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    init_process_group(rank, world_size, rank, "127.0.0.1", port)
    try:
        result = run_rank(config_from_dict(cfg_dict), DistContext(rank, world_size, rank), progress, stop_after,
                          on_export)
        if rank == 0:
            Path(out).write_text(json.dumps({
                "run_dir": str(result.run_dir), "final_step": result.final_step, "final_loss": result.final_loss,
                "export_dir": str(result.export_dir) if result.export_dir else None,
                "resumed_from": result.resumed_from, "layout": result.layout}))
    finally:
        torch.distributed.destroy_process_group()


def launch_local(cfg: Config, world_size: int | None = None, progress: bool = True,
                 stop_after: int | None = None, on_export: Callable[[Path, int], None] | None = None) -> TrainResult:
    """Train with `world_size` ranks on this machine (default: what the config's layout needs); rank 0 calls
    `on_export(export_dir, step)` after the final export (`moe_platform.cluster.registry.export_publisher`)."""
    world_size = world_size or world_size_for(cfg)
    # Refuse an impossible layout here, before any process or process group exists.
    resolve_layout(cfg, world_size, model_args_for(cfg))
    check_precision(cfg, world_size)
    if world_size == 1:
        return run_rank(cfg, DistContext(), progress, stop_after, on_export)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = (world_size, free_port(), config_to_dict(cfg), progress, stop_after, str(out), on_export)
        mp.spawn(_worker, args=args, nprocs=world_size, join=True)
        r = json.loads(out.read_text())
    return TrainResult(Path(r["run_dir"]), r["final_step"], r["final_loss"],
                       Path(r["export_dir"]) if r["export_dir"] else None, r["resumed_from"], r["layout"])
