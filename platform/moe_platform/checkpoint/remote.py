"""Run storage behind a pyarrow filesystem URI (s3://, gs://, file://): checkpoints and run files between a node-local
mirror of the run directory, where the trainer reads and writes, and the storage, which outlives any node.

The storage holds the run as the mirror does::

    <uri>/<name>/checkpoints/step_00000020/   payload files, then manifest.json, then COMMITTED
    <uri>/<name>/tokenizer/, metrics.jsonl, events.jsonl, summary.json, loss.png, export/

Object stores have no atomic rename, so the marker written last is what makes a checkpoint count: a step dir without
COMMITTED is never loaded, and every file downloaded is checked against the manifest (`verify_checkpoint`) before the
mirror's copy is published. Ranks without a shared disk each upload the files they wrote and then a part marker
`.parts/<token>/rank{R}.json` listing them with their sha256 and size; rank 0 merges the parts into manifest.json once
every rank's marker is there, so a rank killed mid-upload leaves a step that never commits. A step dir about to be
written again first loses its COMMITTED marker (`invalidate`), so old and new files never pass for one checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from moe_platform.checkpoint.files import atomic_output, check_writable, fsync_dir, write_durable
from moe_platform.checkpoint.store import (
    CHECKPOINTS_DIRNAME,
    COMMITTED_NAME,
    MANIFEST_NAME,
    OLD_PREFIX,
    CheckpointError,
    step_dir_name,
    tmp_dir_name,
    verify_checkpoint,
)

log = logging.getLogger(__name__)

PARTS_DIRNAME = ".parts"
RUN_FILES = ("metrics.jsonl", "events.jsonl", "summary.json", "loss.png")  # run files kept next to checkpoints/
PART_TIMEOUT_S = 1800.0  # how long rank 0 waits for the other ranks' parts of a checkpoint before giving up
_CHUNK = 8 * 1024 * 1024


def is_uri(storage_path: str) -> bool:
    return "://" in storage_path


def mirror_dir(storage_path: str, name: str, local_dir: str = "", rank: int = 0) -> Path:
    """This process's local mirror of the run: <local_dir>/<name>, `{rank}` in local_dir replaced by the rank; an
    empty local_dir is ~/.cache/moe-platform/runs/<hash of the storage URI>, so two storages never share a mirror."""
    if local_dir:
        base = Path(local_dir.replace("{rank}", str(rank)))
    else:
        base = Path("~/.cache/moe-platform/runs") / hashlib.sha256(storage_path.encode()).hexdigest()[:12]
    return base.expanduser() / name


def poll(ready: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """ready()'s first non-None answer, polled with a growing pause; TimeoutError after timeout_s."""
    deadline, pause = time.monotonic() + timeout_s, 0.01
    while (got := ready()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
    return got


def merge_parts(parts: dict[int, dict], where: str) -> dict[str, dict]:
    """Manifest entries of every rank's part; a part that reports an error fails the whole checkpoint."""
    files: dict[str, dict] = {}
    for rank in sorted(parts):
        if "error" in parts[rank]:
            raise RuntimeError(f"rank {rank} failed to write its part of {where}: {parts[rank]['error']}")
        clash = files.keys() & parts[rank]["files"].keys()
        assert not clash, f"ranks wrote the same checkpoint files {sorted(clash)}"
        files.update(parts[rank]["files"])
    return files


@contextlib.contextmanager
def node_lock(run_dir: Path) -> Iterator[None]:
    """Serialises the ranks of one node that share a mirror (one downloads, the others then find its copy)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".mirror.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RemoteRun:
    """The run's directory in the storage: `<uri>/<name>` on the pyarrow filesystem the URI names."""

    def __init__(self, uri: str, name: str):
        import pyarrow
        import pyarrow.fs

        try:
            self.fs, base = pyarrow.fs.FileSystem.from_uri(uri)
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise ValueError(f"run.storage_path {uri!r} is not a storage pyarrow can open ({e}); give a local "
                             f"directory or an s3://, gs:// or file:///absolute/path URI") from e
        self.uri = uri
        self.root = f"{base.rstrip('/')}/{name}" if base.rstrip("/") else name
        self._made: set[str] = set()

    @classmethod
    def local(cls, run_dir: str | os.PathLike) -> RemoteRun:
        """A run directory on this machine's filesystem, behind the same interface."""
        run_dir = Path(run_dir).expanduser().resolve()
        return cls(run_dir.parent.as_uri(), run_dir.name)

    @property
    def is_local(self) -> bool:
        """True when the storage is this machine's filesystem (file://), so `root` is a local path."""
        return self.fs.type_name == "local"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def step_path(self, step: int, rel: str = "") -> str:
        return self.path(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}" + (f"/{rel}" if rel else ""))

    def check_writable(self) -> None:
        """Create the run dir and write, read back and delete a probe: a clear error before any training."""
        check_writable(self.root, f"run.storage_path {self.uri!r}", self.fs)

    # -- files ---------------------------------------------------------------------------------------------------

    def _parent(self, full: str) -> None:
        parent = full.rsplit("/", 1)[0]
        if parent not in self._made:
            self.fs.create_dir(parent, recursive=True)
            self._made.add(parent)

    def exists(self, rel: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path(rel)).type != pyarrow.fs.FileType.NotFound

    def put_file(self, local: Path, rel: str) -> None:
        full = self.path(rel)
        self._parent(full)
        with open(local, "rb") as src, self.fs.open_output_stream(full) as out:
            shutil.copyfileobj(src, out, _CHUNK)

    def put_bytes(self, rel: str, data: bytes) -> None:
        full = self.path(rel)
        self._parent(full)
        with self.fs.open_output_stream(full) as out:
            out.write(data)

    def get_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def get_file(self, rel: str, local: Path) -> bool:
        """Download to `local` through a temp file and a rename; False when the storage has no such file."""
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.fs.open_input_stream(self.path(rel)) as src, atomic_output(local) as out:
                shutil.copyfileobj(src, out, _CHUNK)
            return True
        except FileNotFoundError:
            return False

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def put_dir(self, local: Path, rel: str, last: str | None = None) -> None:
        """Upload a directory's files; `last` goes last, so its presence means the rest is there."""
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        for name in sorted(files, key=lambda n: n == last):
            self.put_file(local / name, f"{rel}/{name}")

    def get_dir(self, rel: str, local: Path, required: str) -> bool:
        """Download a directory that holds `required` into `local` (if it has no `required` yet): atomically, so
        ranks sharing a mirror may race. False when the storage has none."""
        import pyarrow.fs

        if (local / required).exists() or not self.exists(f"{rel}/{required}"):
            return (local / required).exists()
        tmp = local.with_name(f".{local.name}-{uuid.uuid4().hex}")
        base = self.path(rel)
        try:
            for info in self.fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True)):
                if info.type == pyarrow.fs.FileType.File:
                    name = info.path[len(base) + 1:]
                    self.get_file(f"{rel}/{name}", tmp / name)
            with contextlib.suppress(OSError):  # another rank of this node was first: keep its copy
                os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def put_run_files(self, run_dir: Path, names: Iterable[str] = RUN_FILES) -> None:
        for name in names:
            if (run_dir / name).is_file():
                self.put_file(run_dir / name, name)

    def put_results(self, run_dir: Path) -> None:
        """The end of a run: its files (metrics, events, summary, loss curve) and the export (config.json last)."""
        self.put_run_files(run_dir)
        if (run_dir / "export").is_dir():
            self.put_dir(run_dir / "export", "export", last="config.json")

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def step_dirs(self) -> dict[int, bool]:
        """{step: committed} of every step dir in the storage."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.path(CHECKPOINTS_DIRNAME), allow_not_found=True)
        found: dict[int, bool] = {}
        for info in self.fs.get_file_info(selector):
            name = info.base_name
            if info.type == pyarrow.fs.FileType.Directory and name.startswith("step_") and name[5:].isdigit():
                found[int(name[5:])] = False
        for step in found:
            found[step] = self.exists(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{COMMITTED_NAME}")
        return dict(sorted(found.items()))

    def committed_steps(self) -> list[int]:
        return [step for step, committed in self.step_dirs().items() if committed]

    def upload_files(self, local_dir: Path, step: int, names: Iterable[str]) -> None:
        for name in names:
            self.put_file(local_dir / name, f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{name}")

    def _part(self, step: int, token: str, rank: int) -> str:
        return f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{PARTS_DIRNAME}/{token}/rank{rank}.json"

    def put_part(self, step: int, token: str, rank: int, part: dict) -> None:
        """This rank's part marker: {"files": {relpath: {sha256, bytes}}} once they are uploaded, or {"error"}."""
        self.put_bytes(self._part(step, token, rank), json.dumps({"rank": rank, **part}).encode())

    def wait_parts(self, step: int, token: str, world_size: int, timeout_s: float = PART_TIMEOUT_S) -> dict:
        """Every rank's manifest entries, merged, once all part markers are there."""
        parts: dict[int, dict] = {}

        def ready():
            for rank in range(world_size):
                if rank not in parts and (data := self.get_bytes(self._part(step, token, rank))) is not None:
                    with contextlib.suppress(json.JSONDecodeError):  # a local file may be seen mid-write
                        parts[rank] = json.loads(data)
            return parts if len(parts) == world_size else None

        poll(ready, timeout_s, f"the parts of checkpoint {self.step_path(step)} from {world_size} ranks")
        return merge_parts(parts, self.step_path(step))

    def commit(self, step: int, manifest: bytes) -> None:
        """manifest.json, then COMMITTED: from here on the step counts (its payload must be uploaded already)."""
        self.put_bytes(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{MANIFEST_NAME}", manifest)
        self.put_bytes(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{COMMITTED_NAME}", b"")
        log.info("committed checkpoint %s", self.step_path(step))

    def invalidate(self, step: int) -> None:
        """Un-commit a step dir before it is written again: the marker goes first."""
        for name in (COMMITTED_NAME, MANIFEST_NAME):
            self.delete(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{name}")

    def upload_checkpoint(self, ckpt: Path) -> None:
        """Upload a committed local checkpoint: its files, then its manifest, then the marker."""
        manifest = verify_checkpoint(ckpt, check_hashes=False)
        step = manifest["step"]
        self.invalidate(step)
        self.upload_files(ckpt, step, manifest["files"])
        self.commit(step, (ckpt / MANIFEST_NAME).read_bytes())

    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest `keep` committed checkpoints, and uncommitted step dirs older than the newest
        committed one (left by crashes); newer uncommitted ones may be uploads in flight and stay."""
        dirs = self.step_dirs()
        committed = [s for s, ok in dirs.items() if ok]
        doomed = committed[:-keep] + [s for s, ok in dirs.items() if not ok and committed and s < committed[-1]]
        for step in sorted(doomed):
            self.invalidate(step)
            self.fs.delete_dir(self.step_path(step))
        return sorted(doomed)

    def download_checkpoint(self, step: int, run_dir: Path) -> Path:
        """The committed checkpoint of `step` as a verified local checkpoint dir in the mirror `run_dir` (reusing an
        intact local copy with the same manifest). Raises CheckpointError when it is uncommitted or damaged."""
        where = self.step_path(step)
        manifest = self.get_bytes(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{MANIFEST_NAME}")
        if manifest is None or not self.exists(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{COMMITTED_NAME}"):
            raise CheckpointError(where, f"not committed in the storage (no {MANIFEST_NAME} or {COMMITTED_NAME})")
        try:
            files = json.loads(manifest)["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(where, f"unparseable {MANIFEST_NAME} ({e})", MANIFEST_NAME) from e
        root = run_dir / CHECKPOINTS_DIRNAME
        final = root / step_dir_name(step)
        if final.is_dir():
            with contextlib.suppress(CheckpointError):
                if verify_checkpoint(final)["files"] == files:
                    return final
        tmp = root / tmp_dir_name(step, f"download-{uuid.uuid4().hex}")
        try:
            for rel in files:
                if not self.get_file(f"{CHECKPOINTS_DIRNAME}/{step_dir_name(step)}/{rel}", tmp / rel):
                    raise CheckpointError(where, f"missing file {rel} listed in the manifest", rel)
            write_durable(tmp / MANIFEST_NAME, manifest)
            write_durable(tmp / COMMITTED_NAME, b"")
            verify_checkpoint(tmp)  # sizes and sha256 of everything downloaded
            if final.exists():
                old = root / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
        except CheckpointError as e:
            raise CheckpointError(where, e.reason, e.file) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("downloaded checkpoint %s to %s", where, final)
        return final


__all__ = ["RemoteRun", "is_uri", "merge_parts", "mirror_dir", "node_lock", "poll"]
