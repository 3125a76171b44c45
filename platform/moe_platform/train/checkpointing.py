"""Training-state checkpoints: take a host-memory snapshot on the training thread, write and commit it afterwards.

A checkpoint holds every rank's shard of the model and optimizer state (by full parameter name, so any layout can
load it), each rank's RNG state, the trainer state (step, sampler position, config, model args, layout) and the
tokenizer, under a manifest of sha256 sums; only a committed one is ever loaded.

One process: the write runs in a background thread, so a step waits only for the snapshot. Several processes: every
rank writes its own shard files into rank 0's temporary directory, then rank 0 commits once all have arrived.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_platform.checkpoint import (
    CheckpointWriter,
    capture_rng_state,
    cleanup_checkpoints,
    load_json,
    read_state,
    restore_rng_state,
)
from moe_platform.checkpoint.sharded import LocalState, ShardFiles, write_local_state
from moe_platform.parallel.comm import collective_device
from moe_platform.train.tokenizer import TOKENIZER_FILES

TRAINER_FILE = "trainer.json"


@dataclass
class Snapshot:
    """Everything one rank contributes to a checkpoint, already copied off the live training state."""

    step: int
    rank: int
    state: LocalState
    rng: tuple[dict[str, torch.Tensor], dict]
    trainer: dict[str, Any] | None = None  # rank 0 only
    tokenizer_dir: Path | None = None  # rank 0 only
    meta: dict[str, Any] = field(default_factory=dict)


def take_snapshot(step: int, rank: int, state: LocalState, trainer_state: dict | None = None,
                  tokenizer_dir: Path | None = None, meta: dict | None = None) -> Snapshot:
    return Snapshot(step, rank, state, capture_rng_state(), trainer_state, tokenizer_dir, dict(meta or {}))


def write_rank_files(files, snap: Snapshot) -> None:
    """This rank's share of a checkpoint: its shards and RNG state (and, on rank 0, the trainer state, tokenizer)."""
    write_local_state(files, snap.rank, snap.state)
    files.save_tensors(f"rng/rank{snap.rank}.safetensors", snap.rng[0])
    files.save_json(f"rng/rank{snap.rank}.json", snap.rng[1])
    if snap.trainer is not None:
        files.save_json(TRAINER_FILE, snap.trainer)
    if snap.tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = snap.tokenizer_dir / name
            if src.exists():
                files.copy_file(src, f"tokenizer/{name}")


def write_snapshot(run_dir: Path, snap: Snapshot, keep: int) -> Path:
    """Single-process checkpoint: write everything and commit."""
    with CheckpointWriter(run_dir, snap.step, meta=snap.meta) as writer:
        write_rank_files(writer, snap)
        final = writer.commit()
    cleanup_checkpoints(run_dir, keep)
    return final


def write_distributed(run_dir: Path, snap: Snapshot, keep: int, world_size: int) -> Path | None:
    """Every rank calls this together; returns the committed directory on rank 0."""
    import torch.distributed as dist

    writer = CheckpointWriter(run_dir, snap.step, meta=snap.meta) if snap.rank == 0 else None
    where = [str(writer.tmp_dir) if writer else None]
    dist.broadcast_object_list(where, src=0)
    error: Exception | None = None
    try:
        write_rank_files(writer if writer else ShardFiles(Path(where[0])), snap)
    except Exception as e:  # every rank must still reach the collectives below, or the others hang
        error = e
    ok = torch.tensor([0 if error else 1], device=collective_device())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank learns whether all shards were written
    final = None
    if writer is not None:
        if int(ok) == 1:
            final = writer.commit()
            cleanup_checkpoints(run_dir, keep)
        else:
            writer.abort()
    dist.barrier()
    if error is not None:
        raise error
    if int(ok) != 1:
        raise RuntimeError(f"checkpoint of step {snap.step} failed on another rank; nothing was committed")
    return final


class AsyncCheckpointer:
    """At most one checkpoint write in flight; a failure in the background surfaces at the next call."""

    def __init__(self, run_dir: Path, keep: int, enabled: bool = True):
        self.run_dir = run_dir
        self.keep = keep
        self.enabled = enabled
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None
        self.last_blocking_s = 0.0
        self.last_write_s = 0.0

    def save(self, snap_fn, blocking: bool = False) -> None:
        """`snap_fn()` takes the snapshot (the only part the training step waits for unless blocking)."""
        self.wait()
        t0 = time.perf_counter()
        snap = snap_fn()
        if not self.enabled or blocking:
            self._write(snap)
            self.last_blocking_s = time.perf_counter() - t0
            self.wait()
            return
        self.last_blocking_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(snap,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _write(self, snap: Snapshot) -> None:
        t0 = time.perf_counter()
        try:
            self.last_committed = write_snapshot(self.run_dir, snap, self.keep)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._error = e
        self.last_write_s = time.perf_counter() - t0

    def wait(self) -> Path | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint write failed: {err}") from err
        return self.last_committed


def restore_rank_rng(ckpt_dir: Path, rank: int) -> None:
    """This rank's RNG state if the checkpoint has one (same world size), else rank 0's."""
    stem = f"rng/rank{rank}" if (ckpt_dir / f"rng/rank{rank}.json").exists() else "rng/rank0"
    restore_rng_state(*read_state(ckpt_dir, stem))


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return load_json(ckpt_dir, TRAINER_FILE)
