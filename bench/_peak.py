"""What the memory benchmarks share (not a benchmark itself): peak memory of a measured stretch, on CUDA the
allocator's and on CPU the process's resident set, and running each case in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device) -> int:
    """Start a measured stretch: reset the peak to what is in use now, and return that."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _status_bytes("VmRSS")


def peak_bytes(device) -> int:
    """The most in use since `reset_peak`."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def run_case(script: str, argv: list[str], what: str, for_memory: bool = True) -> dict:
    """Run `script argv` in a fresh process and return the JSON of its last output line. `for_memory`: with glibc
    mapping every large block on its own (see below), which makes the resident set exact but every step slower (page
    faults on each fresh block; measured up to 10x on a small model): time steps in a run without it."""
    # A fixed mmap threshold makes glibc map every large block and unmap it when freed, so the resident set follows
    # the live tensors instead of keeping freed heap memory (which would hide a step's peak).
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if for_memory else {})}
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
