"""Filesystem helpers every storage path shares: durable and atomic writes, directory fsync, and the write probe that
makes an unwritable storage a clear error before any training (local directories and pyarrow URIs alike)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the creation or rename of entries in `path` durable (a no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file (opened with `mode`: "wb", or "w" for UTF-8 text) that becomes `path` only once written whole: a temp
    file in the same directory (so the rename never crosses filesystems), fsynced, then `os.replace`d over `path`.
    Readers see the old file or the new one, never a partial one; on any error the temp file is removed and `path`
    is left as it was. The one way this package writes a file through a temp file and a rename."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_output writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def check_writable(root: str | os.PathLike, what: str, fs=None) -> None:
    """Create the directory `root`, then write, read back and delete a probe file in it. `fs` is a pyarrow
    filesystem (`root` a path on it), None for this machine's. ValueError "`what` is not writable (root): why"."""
    import pyarrow.fs

    if fs is None:
        fs, root = pyarrow.fs.LocalFileSystem(), str(Path(root).expanduser().resolve())
    root = str(root)
    probe = f"{root.rstrip('/')}/.write-test-{uuid.uuid4().hex}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        with fs.open_input_stream(probe) as f:
            read_back = f.read()
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError, ArrowException or a cloud SDK's own error
        raise ValueError(f"{what} is not writable ({root}): {e}") from e
    if read_back != b"ok":
        raise ValueError(f"{what} is not writable ({root}): a probe file read back {read_back!r}")


__all__ = ["atomic_output", "check_writable", "fsync_dir", "write_durable"]
