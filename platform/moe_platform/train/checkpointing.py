"""Training-state checkpoints: take a host-memory snapshot on the training thread, write and commit it afterwards.

A checkpoint holds every rank's shard of the model and optimizer state (by full parameter name, so any layout can
load it), each rank's RNG state, the trainer state (step, sampler position, config, model args, layout) and the
tokenizer, under a manifest of sha256 sums; only a committed one is ever loaded.

The training loop waits only for the snapshot: every rank writes (and, with a storage URI, uploads) its files in a
background thread, and rank 0 commits once every rank's part is there (see AsyncCheckpointer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_platform.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    CheckpointWriter,
    capture_rng_state,
    checkpoint_step,
    cleanup_checkpoints,
    latest_checkpoint,
    load_json,
    read_state,
    restore_rng_state,
)
from moe_platform.checkpoint.files import atomic_output
from moe_platform.checkpoint.remote import PART_TIMEOUT_S, PARTS_DIRNAME, RemoteRun, merge_parts, node_lock, poll
from moe_platform.checkpoint.sharded import LocalState, ShardFiles, write_local_state
from moe_platform.checkpoint.store import CHECKPOINTS_DIRNAME, MANIFEST_NAME, build_manifest, hash_files, tmp_dir_name
from moe_platform.parallel.comm import collective_device
from moe_platform.tokenizer import TOKENIZER_FILES

log = logging.getLogger("moe_platform.train")

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


def _all_ok(ok: bool, world_size: int) -> bool:
    """True on every rank when every rank says ok (a collective when world_size > 1)."""
    if world_size == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([int(ok)], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _broadcast(obj, world_size: int):
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _put_local_part(tmp_dir: Path, rank: int, part: dict) -> None:
    """This rank's part marker in a shared temp dir (written whole, then renamed: never seen half-written)."""
    parts = tmp_dir / PARTS_DIRNAME
    parts.mkdir(parents=True, exist_ok=True)
    with atomic_output(parts / f"rank{rank}.json", "w") as f:
        f.write(json.dumps({"rank": rank, **part}))


def _local_parts(tmp_dir: Path, world_size: int) -> dict[int, dict] | None:
    paths = [tmp_dir / PARTS_DIRNAME / f"rank{r}.json" for r in range(world_size)]
    if not all(p.exists() for p in paths):
        return None
    return {r: json.loads(p.read_text()) for r, p in enumerate(paths)}


class AsyncCheckpointer:
    """Checkpoints written after a host-memory snapshot, at most one in flight per rank (snapshot buffers are reused);
    with a storage URI (`remote`) each is also uploaded, manifest then COMMITTED last, and old ones pruned there too.

    Ranks that share the run directory (one process, or a local or shared `run.storage_path`) write their files into
    one temp dir, each then leaves a part marker with its files' sha256 and sizes, and rank 0 commits the dir once
    every marker is there. Ranks with a storage URI keep only what they wrote, in a temp dir of their own: each
    uploads its files and then its part marker, and rank 0 commits in the storage (no node holds every rank's files).

    Rank 0's background commit waits on marker files, never on a collective that could cross the training's
    collectives. `wait()` (at the next save, and at the end) joins this rank's write and, with several ranks, agrees
    in one all-reduce that every part landed: every rank learns of the commit, or of a failure anywhere, at the same
    point. A rank that dies mid-write leaves no marker, so nothing of that step is committed anywhere.
    Collective when world_size > 1: every rank constructs it, and calls save, wait and resume_point, together.
    """

    def __init__(self, run_dir: Path, keep: int, enabled: bool = True, rank: int = 0, world_size: int = 1,
                 remote: RemoteRun | None = None):
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.enabled = enabled
        self.rank, self.world_size, self.remote = rank, world_size, remote
        self.shared = remote is None or world_size == 1  # all ranks' files meet in one local temp dir
        # The ranks' temp dirs and part markers carry this attempt's token, so a crashed attempt's never count.
        mine = (uuid.uuid4().hex[:12], list(remote.step_dirs()) if remote and rank == 0 else [])
        token, stale = _broadcast(mine, world_size)
        self.token = token
        self.remote_stale = set(stale)  # step dirs in the storage: written again only after invalidate()
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: int | None = None  # step of the write in flight, until wait() confirms it
        self._uploads: dict[int, BaseException | None] = {}  # rank 0: step -> its upload's outcome
        self._uploaded = threading.Condition()
        self.last_committed: Path | None = None
        self.last_blocking_s = 0.0
        self.last_write_s = 0.0

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIRNAME

    # -- resume --------------------------------------------------------------------------------------------------

    def resume_point(self) -> Path | None:
        """The checkpoint to resume from, as a local dir: the mirror's newest verified one, or with a storage URI the
        newest committed one there that is newer (downloaded; its metrics come along). Several ranks with a storage
        resume from the storage alone (a rank's mirror never holds a whole checkpoint of theirs) and agree on it."""
        local = latest_checkpoint(self.run_dir) if self.shared else None
        if self.remote is None:
            return local
        floor = checkpoint_step(local) if local is not None else -1
        committed = _broadcast(self.remote.committed_steps() if self.rank == 0 else None, self.world_size)
        for step in reversed(committed):
            if step <= floor:
                break
            path = None
            try:
                with node_lock(self.run_dir):  # the ranks of a node take turns: the first downloads, the rest reuse
                    path = self.remote.download_checkpoint(step, self.run_dir)
                    cleanup_checkpoints(self.run_dir, self.keep)
            except (CheckpointError, OSError) as e:
                message = f"checkpoint {self.remote.uri} step {step} is not usable ({e}); trying an older one"
                log.warning(message)
                warnings.warn(message, CheckpointWarning, stacklevel=2)
            if _all_ok(path is not None, self.world_size):
                if self.rank == 0:  # the run's history up to (at least) that step
                    for name in ("metrics.jsonl", "events.jsonl"):
                        self.remote.get_file(name, self.run_dir / name)
                return path
        if local is not None and floor > max(committed, default=-1):
            log.warning("%s is newer than the storage's checkpoints (its upload did not finish): uploading it", local)
            self._thread = threading.Thread(target=self._upload_existing, args=(local,), daemon=True,
                                            name="checkpoint-upload")
            self._thread.start()
        return local

    def _upload_existing(self, ckpt: Path) -> None:
        try:
            self.remote.upload_checkpoint(ckpt)
            self.remote.prune(self.keep)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._error = e

    def local_checkpoint(self, step: int) -> Path | None:
        """A local committed copy of the newest checkpoint, of `step` (downloaded when only the storage holds all of
        it: several ranks with a storage URI)."""
        if self.shared:
            return latest_checkpoint(self.run_dir)
        with node_lock(self.run_dir):
            return self.remote.download_checkpoint(step, self.run_dir)

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, snap_fn, blocking: bool = False) -> list[tuple[Path | None, int]]:
        """`snap_fn()` takes the snapshot (the only part the training step waits for unless blocking). Returns the
        checkpoints this call confirmed as committed, [(local dir on rank 0 or None, step)], as wait() does."""
        confirmed = self.wait()
        t0 = time.perf_counter()
        snap = snap_fn()
        if snap.step in self.remote_stale:  # a step dir written before (a retry): un-commit it before any rank writes
            if self.rank == 0:
                self.remote.invalidate(snap.step)
            self.remote_stale.discard(snap.step)
            _all_ok(True, self.world_size)
        self._seq += 1
        self._pending = snap.step
        token = f"{self.token}-{self._seq}"
        if not self.enabled or blocking:
            self._write(snap, token)
            self.last_blocking_s = time.perf_counter() - t0
            return confirmed + self.wait()
        self.last_blocking_s = time.perf_counter() - t0
        self._thread = threading.Thread(target=self._write, args=(snap, token), name="checkpoint-writer", daemon=True)
        self._thread.start()
        return confirmed

    def _write(self, snap: Snapshot, token: str) -> None:
        t0 = time.perf_counter()
        step, rank, writer = snap.step, snap.rank, None
        tmp = self.checkpoints_dir / tmp_dir_name(step, token if self.shared else f"{token}-rank{rank}")
        try:
            if rank == 0 and self.shared:
                writer = CheckpointWriter(self.run_dir, step, meta=snap.meta, tmp_name=tmp.name)
            tmp.mkdir(parents=True, exist_ok=True)
            files = ShardFiles(tmp)
            write_rank_files(files, snap)
            entries = hash_files(tmp, files.written, fsync=True)
            if self.remote is not None:
                self.remote.upload_files(tmp, step, entries)
            if self.shared:  # after the upload: rank 0 moves the dir when it commits
                _put_local_part(tmp, rank, {"files": entries})
            else:
                self.remote.put_part(step, token, rank, {"files": entries})
            if rank == 0:
                self._commit(step, snap.meta, tmp, writer, token)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._error = e
            with contextlib.suppress(Exception):  # so that rank 0 stops waiting for this rank's part
                if self.shared:
                    _put_local_part(tmp, rank, {"error": repr(e)})
                else:
                    self.remote.put_part(step, token, rank, {"error": repr(e)})
            if writer is not None:
                writer.abort()
        finally:
            if not self.shared:
                shutil.rmtree(tmp, ignore_errors=True)
            if rank == 0 and self.remote is not None:
                with self._uploaded:
                    self._uploads[step] = self._error
                    self._uploaded.notify_all()
            self.last_write_s = time.perf_counter() - t0

    def _commit(self, step: int, meta: dict, tmp: Path, writer: CheckpointWriter | None, token: str) -> None:
        """Rank 0, once every rank's part is there: manifest and COMMITTED, locally and/or in the storage."""
        if writer is not None:
            parts = poll(lambda: _local_parts(tmp, self.world_size), PART_TIMEOUT_S, f"the ranks' parts of {tmp}")
            files = merge_parts(parts, str(tmp))
            shutil.rmtree(tmp / PARTS_DIRNAME)
            self.last_committed = writer.commit(files)
            cleanup_checkpoints(self.run_dir, self.keep)
            manifest = (self.last_committed / MANIFEST_NAME).read_bytes()
        else:
            files = self.remote.wait_parts(step, token, self.world_size)
            manifest = (json.dumps(build_manifest(step, meta, files), indent=2) + "\n").encode()
        if self.remote is not None:
            self.remote.commit(step, manifest)
            self.remote.prune(self.keep)
            self.remote.put_run_files(self.run_dir, ("metrics.jsonl", "events.jsonl"))

    def wait(self) -> list[tuple[Path | None, int]]:
        """Join this rank's write; with several ranks, agree that every rank's part of it made it. Returns the
        checkpoint confirmed committed now, [(local dir on rank 0, else None, step)], or []."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        step, self._pending = self._pending, None
        err, self._error = self._error, None
        if step is not None and not _all_ok(err is None, self.world_size) and err is None:
            err = RuntimeError(f"another rank failed to write its part of the checkpoint of step {step}")
        if err is not None:
            raise RuntimeError(f"checkpoint write failed: {err}") from err
        if step is None:
            return []
        return [(self.last_committed if self.rank == 0 and self.shared else None, step)]

    def wait_remote(self, step: int, timeout_s: float | None = None) -> None:
        """Rank 0: block until the checkpoint of `step` is COMMITTED in the storage; raise if its write failed."""
        with self._uploaded:
            if not self._uploaded.wait_for(lambda: step in self._uploads, timeout_s):
                raise TimeoutError(f"the checkpoint of step {step} was not uploaded within {timeout_s} s")
            err = self._uploads[step]
        if err is not None:
            raise RuntimeError(f"upload of the checkpoint of step {step} to {self.remote.uri} failed: {err}") from err


def restore_rank_rng(ckpt_dir: Path, rank: int) -> None:
    """This rank's RNG state if the checkpoint has one (same world size), else rank 0's."""
    stem = f"rng/rank{rank}" if (ckpt_dir / f"rng/rank{rank}.json").exists() else "rng/rank0"
    restore_rng_state(*read_state(ckpt_dir, stem))


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    return load_json(ckpt_dir, TRAINER_FILE)
