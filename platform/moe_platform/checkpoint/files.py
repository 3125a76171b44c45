"""Filesystem helpers every storage path shares: durable writes, directory fsync, and the write probe that makes an
unwritable storage a clear error before any training (local directories and pyarrow URIs alike)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


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


__all__ = ["check_writable", "fsync_dir", "write_durable"]
