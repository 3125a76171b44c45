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

from moe_platform.config import Config, config_from_dict, config_to_dict, rank_cpu_sets
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


def place_rank(cfg: Config, local_rank: int, default_threads: int) -> None:
    """Pin this rank to its cores from `elastic.rank_cpus` (every thread of the process, and the threads it starts
    later) and give torch one thread per core; without pinning, torch gets `default_threads`."""
    sets = rank_cpu_sets(cfg.elastic.rank_cpus)
    if not sets:
        torch.set_num_threads(max(1, default_threads))
        return
    if local_rank >= len(sets):
        raise ValueError(f"elastic.rank_cpus {cfg.elastic.rank_cpus!r} names cores for {len(sets)} local rank(s); "
                         f"local rank {local_rank} has none")
    cores, allowed = sets[local_rank], sorted(os.sched_getaffinity(0))
    try:
        pin_process(cores)
    except OSError as e:
        raise ValueError(f"elastic.rank_cpus: cannot pin local rank {local_rank} to cores {cores} (the process "
                         f"runs on {allowed} now): {e}") from e
    torch.set_num_threads(len(cores))


def pin_process(cores: list[int]) -> None:
    """Move every thread of this process to `cores`; processes and threads it starts later inherit them."""
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError("pinning to cores needs os.sched_setaffinity (Linux)")
    for tid in os.listdir("/proc/self/task"):  # the threads already running (torch, gloo, Ray's core worker)
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


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
             on_export: Callable[[Path, int], None] | None = None,
             trainer_cls: type[Trainer] = Trainer) -> TrainResult:
    trainer = trainer_cls(cfg, progress=progress, dist=dist, hooks=TrainerHooks(on_export=on_export))
    trainer.setup()
    return trainer.fit(stop_after=stop_after)


def _worker(rank: int, world_size: int, port: int, cfg_dict: dict, progress: bool, stop_after, out: str,
            on_export, trainer_cls: type[Trainer]) -> None:
    # Each rank gets its share of the cores (or the cores elastic.rank_cpus pins it to), so ranks do not fight.
    cfg = config_from_dict(cfg_dict)
    place_rank(cfg, rank, (os.cpu_count() or 1) // world_size)
    init_process_group(rank, world_size, rank, "127.0.0.1", port)
    try:
        result = run_rank(cfg, DistContext(rank, world_size, rank), progress, stop_after, on_export, trainer_cls)
        if rank == 0:
            Path(out).write_text(json.dumps({
                "run_dir": str(result.run_dir), "final_step": result.final_step, "final_loss": result.final_loss,
                "export_dir": str(result.export_dir) if result.export_dir else None,
                "resumed_from": result.resumed_from, "layout": result.layout}))
    finally:
        torch.distributed.destroy_process_group()


def launch_local(cfg: Config, world_size: int | None = None, progress: bool = True,
                 stop_after: int | None = None, on_export: Callable[[Path, int], None] | None = None,
                 trainer_cls: type[Trainer] = Trainer) -> TrainResult:
    """Train with `world_size` ranks on this machine (default: what the config's layout needs); rank 0 calls
    `on_export(export_dir, step)` after the final export (`moe_platform.cluster.registry.export_publisher`).
    `trainer_cls` runs the config's objective: `moe_platform.post_train.trainer_class(cfg.train.objective)` (the
    default, Trainer, runs lm)."""
    world_size = world_size or world_size_for(cfg)
    # Refuse an impossible layout (or objective set-up) here, before any process or process group exists.
    trainer_cls.check_config(cfg)
    resolve_layout(cfg, world_size, model_args_for(cfg))
    check_precision(cfg, world_size)
    if world_size == 1:  # in this process, pinned to local rank 0's cores if elastic.rank_cpus says so
        place_rank(cfg, 0, torch.get_num_threads())
        return run_rank(cfg, DistContext(), progress, stop_after, on_export, trainer_cls)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = (world_size, free_port(), config_to_dict(cfg), progress, stop_after, str(out), on_export, trainer_cls)
        mp.spawn(_worker, args=args, nprocs=world_size, join=True)
        r = json.loads(out.read_text())
    return TrainResult(Path(r["run_dir"]), r["final_step"], r["final_loss"],
                       Path(r["export_dir"]) if r["export_dir"] else None, r["resumed_from"], r["layout"])
