"""Training-state checkpoints: snapshot to host memory on the training thread, write and commit in the background.

A checkpoint holds the model (safetensors), optimizer state, RNG states, sampler position, the LR-schedule step, the
config and model args and the tokenizer, under a manifest of sha256 sums; only a committed one is ever loaded.
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
    flatten_optimizer_state,
    load_json,
    load_tensors,
    read_state,
    restore_rng_state,
    unflatten_optimizer_state,
    write_state,
)
from moe_platform.train.tokenizer import TOKENIZER_FILES

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.json"


@dataclass
class Snapshot:
    """Everything a checkpoint holds, already copied off the live training state."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: tuple[dict[str, torch.Tensor], dict]
    rng: tuple[dict[str, torch.Tensor], dict]
    trainer: dict[str, Any]
    tokenizer_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)


def take_snapshot(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
                  tokenizer_dir: Path, meta: dict | None = None) -> Snapshot:
    """Copy the state to host memory; after this returns, training may change the live tensors freely."""
    model_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    optim_tensors = {k: v.detach().to("cpu", copy=True) for k, v in optim_tensors.items()}
    return Snapshot(step, model_state, (optim_tensors, optim_meta), capture_rng_state(), dict(trainer_state),
                    tokenizer_dir, dict(meta or {}))


def write_snapshot(run_dir: Path, snap: Snapshot, keep: int) -> Path:
    with CheckpointWriter(run_dir, snap.step, meta=snap.meta) as writer:
        writer.save_tensors(MODEL_FILE, snap.model)
        write_state(writer, "optimizer", *snap.optimizer)
        write_state(writer, "rng", *snap.rng)
        writer.save_json(TRAINER_FILE, snap.trainer)
        for name in TOKENIZER_FILES:
            src = snap.tokenizer_dir / name
            if src.exists():
                writer.copy_file(src, f"tokenizer/{name}")
        final = writer.commit()
    cleanup_checkpoints(run_dir, keep)
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


def load_training_state(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        restore_rng: bool = True) -> dict[str, Any]:
    """Load a verified checkpoint into live objects; returns the trainer state (step, sampler, ...)."""
    state = load_tensors(ckpt_dir, MODEL_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir} does not fit this model (different model config?): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        tensors, meta = read_state(ckpt_dir, "optimizer")
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    if restore_rng:
        restore_rng_state(*read_state(ckpt_dir, "rng"))
    return load_json(ckpt_dir, TRAINER_FILE)
