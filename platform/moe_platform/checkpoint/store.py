"""Verified, atomic checkpoint directories: safetensors for tensors, JSON for everything else, never pickle.

Layout of a run directory::

    run_dir/checkpoints/
        step_00000020/            committed: manifest.json + COMMITTED + the payload files
            manifest.json         {"format", "version", "step", "created", "meta", "files": {relpath: {sha256, bytes}}}
            COMMITTED             empty marker, written after the manifest
            model.safetensors
            rank0/optim.safetensors
        .tmp-step_00000040-<uuid> being written (or left behind by a crash); never loaded
        .old-step_00000020-<uuid> an earlier copy of a re-committed step, deleted once the new one is in place

A checkpoint only ever appears under its final name through one atomic rename of a fully written, fsynced temp
directory, so a crash at any point leaves either the old state or the new state, never a half-written step dir.
Damage after the fact (truncation, bit flips, deleted files) is caught by `verify_checkpoint`, and
`latest_checkpoint` falls back to the newest checkpoint that still verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from moe_platform.checkpoint.files import fsync_dir, write_durable

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
MANIFEST_NAME = "manifest.json"
COMMITTED_NAME = "COMMITTED"
MANIFEST_FORMAT = "moe-platform-checkpoint"
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"

_RESERVED_NAMES = frozenset({MANIFEST_NAME, COMMITTED_NAME})
_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_HASH_CHUNK = 8 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory is missing, partial, damaged or malformed.

    `ckpt_dir` is the checkpoint at fault, `file` the file inside it (None when the whole dir is at fault) and
    `reason` the problem without the directory prefix, so callers can build their own messages from it.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, reason: str, file: str | None = None):
        self.ckpt_dir = Path(ckpt_dir)
        self.file = file
        self.reason = reason
        super().__init__(f"checkpoint {self.ckpt_dir}: {reason}")


class CheckpointWarning(UserWarning):
    """Emitted when a checkpoint is skipped because it fails verification."""


def step_dir_name(step: int) -> str:
    """Final directory name of the checkpoint for `step`, e.g. step_00000020."""
    return f"step_{_check_step(step):08d}"


def checkpoint_step(ckpt_dir: str | os.PathLike) -> int:
    """Training step encoded in a checkpoint directory name (step_00000020 -> 20)."""
    match = _STEP_DIR_RE.match(Path(ckpt_dir).name)
    if match is None:
        raise ValueError(f"{ckpt_dir} is not a checkpoint directory name; expected step_XXXXXXXX (8+ digits)")
    return int(match.group(1))


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return step


def _check_relpath(name: str) -> str:
    """Normalise a file name inside a checkpoint; reject anything that could escape the checkpoint dir."""
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ValueError(f"checkpoint file name must be a non-empty relative path string, got {name!r}")
    if "\\" in name or "\x00" in name:
        raise ValueError(f"checkpoint file name {name!r} must use '/' separators and no NUL bytes")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise ValueError(f"checkpoint file name {name!r} must be relative and contain no '.', '..' or empty parts")
    if name in _RESERVED_NAMES:
        raise ValueError(f"checkpoint file name {name!r} is reserved for the checkpoint's own bookkeeping")
    return pure.as_posix()


def _hash_file(path: Path, fsync: bool = False) -> tuple[str, int]:
    """Stream a file through sha256; optionally fsync it on the same open handle."""
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def hash_files(directory: str | os.PathLike, names: Iterable[str], fsync: bool = False) -> dict[str, dict[str, Any]]:
    """Manifest entries {relpath: {sha256, bytes}} of files under `directory` (fsynced on the way with fsync=True)."""
    out = {}
    for rel in sorted(names):
        sha, size = _hash_file(Path(directory) / _check_relpath(rel), fsync=fsync)
        out[rel] = {"sha256": sha, "bytes": size}
    return out


def build_manifest(step: int, meta: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest.json document of a checkpoint of `step` holding `files` (relpath -> {sha256, bytes})."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": _check_step(step),
        "created": datetime.now(timezone.utc).isoformat(),
        "meta": dict(meta),
        "files": {rel: dict(files[rel]) for rel in sorted(files)},
    }


def tmp_dir_name(step: int, token: str) -> str:
    """Name of a temp dir for the checkpoint of `step` (under checkpoints/; never loaded, removed by cleanup)."""
    return f"{TMP_PREFIX}{step_dir_name(step)}-{token}"


class CheckpointWriter:
    """Write one checkpoint into a private temp dir, then publish it atomically with `commit()`.

    Used as a context manager it commits on a clean exit (unless already committed or aborted) and aborts on an
    exception, so a crash inside the block never leaves a loadable checkpoint behind::

        with CheckpointWriter(run_dir, step, meta={"layout": layout.to_dict()}) as w:
            w.save_tensors("model.safetensors", model.state_dict())
            w.save_json("trainer.json", {"tokens_seen": n})
        w.final_dir  # run_dir/checkpoints/step_XXXXXXXX

    Several ranks may write shards into `tmp_dir` (e.g. "rank3/optim.safetensors"); `commit()` hashes every file
    found there, so only one rank needs to commit once the others are done.
    """

    def __init__(self, run_dir: str | os.PathLike, step: int, meta: Mapping[str, Any] | None = None,
                 tmp_name: str | None = None):
        self.step = _check_step(step)
        self.run_dir = Path(run_dir)
        self.meta: dict[str, Any] = dict(meta or {})
        # Fail now, not after minutes of tensor writing, if meta can't go into the manifest.
        _dumps_json(self.meta, what="checkpoint meta")
        self.checkpoints_dir = self.run_dir / CHECKPOINTS_DIRNAME
        self.final_dir = self.checkpoints_dir / step_dir_name(step)
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        # Several ranks writing into one temp dir agree on `tmp_name` beforehand (see tmp_dir_name).
        self.tmp_dir = self.checkpoints_dir / (tmp_name or tmp_dir_name(step, uuid.uuid4().hex))
        self.tmp_dir.mkdir(exist_ok=tmp_name is not None)
        self._registered: set[str] = set()
        self._state = "open"  # -> "committed" | "aborted"

    # -- writing -------------------------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"checkpoint writer for {self.final_dir} is already {self._state}")

    def path(self, name: str) -> Path:
        """Absolute path for file `name` inside the temp dir (parent dirs created); register it with add_file."""
        self._require_open()
        rel = _check_relpath(name)
        target = self.tmp_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_file(self, name: str) -> Path:
        """Register a file the caller wrote at `path(name)`; commit fails if a registered file has vanished."""
        target = self.path(name)
        if not target.is_file() or target.is_symlink():
            raise ValueError(f"cannot add {name!r} to checkpoint: {target} is not a regular file")
        self._registered.add(_check_relpath(name))
        return target

    def save_tensors(
        self, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Save a flat {key: tensor} dict as safetensors (moved to CPU, made contiguous, shared storage cloned)."""
        from safetensors.torch import save_file

        target = self.path(name)
        save_file(prepare_tensors(tensors, name), str(target), metadata=dict(metadata) if metadata else None)
        self._registered.add(_check_relpath(name))
        return target

    def save_json(self, name: str, obj: Any) -> Path:
        """Save a JSON document (plain dicts/lists/str/numbers/bools/None; see state.to_jsonable for the rest)."""
        target = self.path(name)
        target.write_text(_dumps_json(obj, what=f"checkpoint file {name!r}") + "\n", encoding="utf-8")
        self._registered.add(_check_relpath(name))
        return target

    def copy_file(self, src: str | os.PathLike, name: str) -> Path:
        """Copy an existing file (e.g. a tokenizer) into the checkpoint under `name`."""
        src = Path(src)
        if not src.is_file():
            raise ValueError(f"cannot copy {src} into checkpoint as {name!r}: not a regular file")
        target = self.path(name)
        shutil.copyfile(src, target)
        self._registered.add(_check_relpath(name))
        return target

    # -- publishing ----------------------------------------------------------------------------------------------

    def _collect_files(self) -> list[str]:
        found: set[str] = set()
        for root, dirs, files in os.walk(self.tmp_dir):
            dirs.sort()
            for fname in files:
                full = Path(root) / fname
                rel = full.relative_to(self.tmp_dir).as_posix()
                if full.is_symlink():
                    # A link could point anywhere (and at something mutable): copy the real file instead.
                    raise ValueError(f"checkpoint {self.final_dir}: {rel} is a symlink; use copy_file instead")
                if rel in _RESERVED_NAMES:
                    raise ValueError(f"checkpoint {self.final_dir}: {rel!r} was written by hand; it is reserved")
                found.add(rel)
        missing = sorted(self._registered - found)
        if missing:
            raise CheckpointError(self.tmp_dir, f"registered file {missing[0]} vanished before commit", missing[0])
        return sorted(found)

    def commit(self, files: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
        """Hash + fsync every file, write manifest then COMMITTED, and atomically rename into place.

        `files` ({relpath: {sha256, bytes}}, see hash_files) are entries the ranks that wrote them hashed and fsynced
        already: they make up the manifest as given, after a check that each is there with its size.
        """
        self._require_open()
        try:
            if files is None:
                files = hash_files(self.tmp_dir, self._collect_files(), fsync=True)
            else:
                files = {_check_relpath(rel): dict(entry) for rel, entry in files.items()}
                for rel, entry in files.items():
                    path = self.tmp_dir / rel
                    if not path.is_file() or path.stat().st_size != entry["bytes"]:
                        raise CheckpointError(self.tmp_dir, f"file {rel} is missing or not the size its writer "
                                                            f"hashed ({entry['bytes']} bytes)", rel)
            manifest = build_manifest(self.step, self.meta, files)
            write_durable(self.tmp_dir / MANIFEST_NAME, (_dumps_json(manifest, "manifest") + "\n").encode())
            # The marker goes last: a dir holding it is complete as far as the writer is concerned.
            write_durable(self.tmp_dir / COMMITTED_NAME, b"")
            for root, _dirs, _files in os.walk(self.tmp_dir):
                fsync_dir(Path(root))
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        logger.info("committed checkpoint %s (%d files)", self.final_dir, len(files))
        return self.final_dir

    def _publish(self) -> None:
        old = None
        if self.final_dir.exists():
            # Same step committed before (a re-run after restart). rename() can't replace a non-empty dir, so
            # move the old one aside and only delete it once the new one is in place.
            old = self.checkpoints_dir / f"{OLD_PREFIX}{self.final_dir.name}-{uuid.uuid4().hex}"
            os.replace(self.final_dir, old)
        try:
            os.replace(self.tmp_dir, self.final_dir)
        except BaseException:
            if old is not None and not self.final_dir.exists():
                os.replace(old, self.final_dir)
            raise
        fsync_dir(self.checkpoints_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; safe to call more than once."""
        if self._state == "committed":
            return
        self._state = "aborted"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()


def prepare_tensors(tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"save_tensors({name!r}) needs a dict of str -> Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[str, int]] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"save_tensors({name!r}): tensor keys must be str, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"save_tensors({name!r}): value for {key!r} is {type(value).__name__}, not a Tensor; "
                "put non-tensor values in a JSON file (see moe_platform.checkpoint.flatten_state)"
            )
        t = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views); give each its own copy.
        storage_key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() and storage_key in seen_storage:
            t = t.clone()
        elif t.numel():
            seen_storage.add(storage_key)
        out[key] = t
    return out


def _dumps_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{what} is not JSON-serialisable ({e}); convert it with moe_platform.checkpoint.to_jsonable "
            "or store tensors with save_tensors"
        ) from e


# -- reading and verification --------------------------------------------------------------------------------------


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and schema-check manifest.json without hashing any payload file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(ckpt_dir, "directory does not exist")
    manifest_path = ckpt_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(ckpt_dir, f"missing {MANIFEST_NAME} (the manifest was deleted)", MANIFEST_NAME)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(ckpt_dir, f"unparseable {MANIFEST_NAME} ({e})", MANIFEST_NAME) from e

    def bad(why: str) -> CheckpointError:
        return CheckpointError(ckpt_dir, f"malformed {MANIFEST_NAME}: {why}", MANIFEST_NAME)

    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad(f"'format' is not {MANIFEST_FORMAT!r}")
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        raise bad(f"unsupported version {version!r} (this code reads version {MANIFEST_VERSION})")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"'step' must be a non-negative int, got {step!r}")
    name_match = _STEP_DIR_RE.match(ckpt_dir.name)
    if name_match is not None and int(name_match.group(1)) != step:
        raise bad(f"'step' is {step} but the directory is named {ckpt_dir.name}")
    if not isinstance(manifest.get("meta", {}), dict):
        raise bad("'meta' must be an object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("'files' must be an object of relpath -> {sha256, bytes}")
    for rel, entry in files.items():
        try:
            _check_relpath(rel)
        except ValueError as e:
            raise bad(f"file entry {rel!r} is not a safe relative path ({e})") from e
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or isinstance(entry.get("bytes"), bool)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise bad(f"file entry {rel!r} must be {{'sha256': 64 hex chars, 'bytes': int}}, got {entry!r}")
    return manifest


def verify_checkpoint(ckpt_dir: str | os.PathLike, check_hashes: bool = True) -> dict[str, Any]:
    """Check that a checkpoint is committed and every listed file is intact; return its manifest.

    Files present but not listed in the manifest are ignored. `check_hashes=False` only checks presence and sizes
    (catches truncation and deletion, not bit flips) for callers that can't afford reading every byte.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(ckpt_dir, "directory does not exist")
    if not (ckpt_dir / COMMITTED_NAME).is_file():
        raise CheckpointError(
            ckpt_dir, f"partial checkpoint: no {COMMITTED_NAME} marker (write did not finish)", COMMITTED_NAME
        )
    manifest = read_manifest(ckpt_dir)
    for rel, entry in manifest["files"].items():
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(ckpt_dir, f"missing file {rel} listed in the manifest", rel)
        size = path.stat().st_size
        if size != entry["bytes"]:
            kind = "truncated" if size < entry["bytes"] else "has the wrong size"
            raise CheckpointError(ckpt_dir, f"file {rel} {kind} (expected {entry['bytes']} bytes, found {size})", rel)
        if check_hashes:
            sha, _ = _hash_file(path)
            if sha != entry["sha256"]:
                raise CheckpointError(
                    ckpt_dir, f"file {rel} sha256 mismatch (expected {entry['sha256']}, found {sha}): corrupt", rel
                )
    return manifest


def _checkpoints_root(path: Path) -> Path:
    """Accept a run dir or its checkpoints/ dir and return the dir holding step_* entries."""
    if (path / CHECKPOINTS_DIRNAME).is_dir():
        return path / CHECKPOINTS_DIRNAME
    if path.name == CHECKPOINTS_DIRNAME or (path.is_dir() and any(_STEP_DIR_RE.match(p.name) for p in path.iterdir())):
        return path
    return path / CHECKPOINTS_DIRNAME


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """step_* dirs under a run dir (or a checkpoints/ dir), ascending by step; not verified, temp dirs excluded."""
    root = _checkpoints_root(Path(run_dir))
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR_RE.match(p.name)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike, verify: bool = True) -> Path | None:
    """Newest checkpoint that verifies (newer damaged ones are skipped with a CheckpointWarning), or None.

    With verify=False only the COMMITTED marker and the manifest are checked, not file contents.
    """
    candidates = list_checkpoints(run_dir)
    for i in range(len(candidates) - 1, -1, -1):
        ckpt = candidates[i]
        try:
            if verify:
                verify_checkpoint(ckpt)
            else:
                if not (ckpt / COMMITTED_NAME).is_file():
                    raise CheckpointError(ckpt, f"partial checkpoint: no {COMMITTED_NAME} marker", COMMITTED_NAME)
                read_manifest(ckpt)
            return ckpt
        except CheckpointError as e:
            fallback = str(candidates[i - 1]) if i > 0 else "no checkpoint (starting from scratch)"
            message = f"checkpoint {ckpt} is corrupt ({e.reason}); falling back to {fallback}"
            logger.warning(message)
            warnings.warn(message, CheckpointWarning, stacklevel=2)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Turn a run dir, a checkpoints/ dir or a single checkpoint dir into a verified checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if not path.is_dir():
        raise CheckpointError(path, "expected a run directory, a checkpoints/ directory or a checkpoint directory")
    looks_like_checkpoint = (
        _STEP_DIR_RE.match(path.name) is not None or (path / MANIFEST_NAME).exists() or (path / COMMITTED_NAME).exists()
    )
    if looks_like_checkpoint:
        verify_checkpoint(path)
        return path
    found = list_checkpoints(path)
    latest = latest_checkpoint(path)
    if latest is None:
        if found:
            raise CheckpointError(path, f"none of the {len(found)} checkpoints under it verifies (see warnings)")
        raise CheckpointError(
            path, f"no checkpoints found (looked for step_XXXXXXXX dirs in {_checkpoints_root(path)})"
        )
    return latest


def cleanup_checkpoints(
    run_dir: str | os.PathLike,
    keep: int,
    exclude: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    verify: bool = False,
) -> list[Path]:
    """Delete all but the newest `keep` valid checkpoints, plus stale .tmp-*/.old-* dirs; return what was removed.

    A damaged checkpoint never counts towards `keep`, so a bad newest checkpoint can't cause the last good one to
    be deleted. Validity is COMMITTED + manifest + file sizes, or full hashing with verify=True. Dirs listed in
    `exclude` (e.g. the temp dir of a writer still in progress) are left alone.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"cleanup_checkpoints keep must be an int >= 1 (keeping nothing loses the run), got {keep!r}")
    if exclude is None:
        excluded: set[Path] = set()
    elif isinstance(exclude, (str, os.PathLike)):
        excluded = {Path(exclude).resolve()}
    else:
        excluded = {Path(p).resolve() for p in exclude}
    root = _checkpoints_root(Path(run_dir))
    if not root.is_dir():
        return []
    doomed: list[Path] = []
    valid_kept = 0
    for ckpt in reversed(list_checkpoints(root)):
        if valid_kept >= keep:
            doomed.append(ckpt)
            continue
        try:
            verify_checkpoint(ckpt, check_hashes=verify)
            valid_kept += 1
        except CheckpointError as e:
            logger.warning("keeping damaged checkpoint %s for inspection; it does not count towards keep: %s", ckpt, e)
    doomed += [p for p in root.iterdir() if p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX))]
    removed = []
    for path in doomed:
        if path.resolve() in excluded:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        fsync_dir(root)
    return removed


def _checked_file(ckpt_dir: str | os.PathLike, name: str) -> Path:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / _check_relpath(name)
    if not path.is_file():
        raise CheckpointError(ckpt_dir, f"missing file {name}", name)
    return path


def load_tensors(ckpt_dir: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load one safetensors file of a checkpoint (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _checked_file(ckpt_dir, name)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise CheckpointError(ckpt_dir, f"file {name} is not a readable safetensors file ({e})", name) from e


def load_json(ckpt_dir: str | os.PathLike, name: str) -> Any:
    """Load one JSON file of a checkpoint."""
    path = _checked_file(ckpt_dir, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(ckpt_dir, f"file {name} is not valid JSON ({e})", name) from e
