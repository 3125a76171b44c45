"""Per-step metrics: metrics.jsonl (one JSON object a line), the matmul ceiling used for MFU, the loss-curve plot."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from moe_platform.checkpoint.files import atomic_output

# Dense bf16 tensor-core peaks of common accelerators, for MFU on GPU (FLOP/s).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop lines of steps after `step` (work lost by a crash is redone, so each step appears once); returns how
        many logged steps were dropped, i.e. will be computed again."""
        if not self.path.exists():
            return 0
        recs = [(line, _parse(line)) for line in self.path.read_text().splitlines()]
        kept = [line for line, rec in recs if rec is not None and rec.get("step", 0) <= step]
        dropped = {rec["step"] for _, rec in recs if rec is not None and rec.get("step", 0) > step}
        with atomic_output(self.path, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        return len(dropped)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [rec for line in self.path.read_text().splitlines() if (rec := _parse(line)) is not None]


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics line, or None for a blank one or one cut short by a killed process."""
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


@functools.cache
def matmul_peak_flops(device: torch.device) -> float:
    """The FLOP/s denominator of MFU: a known GPU peak, or on CPU the measured rate of a large fp32 matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
    n = 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def write_loss_curve(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    records = MetricsLog(metrics_path).read()
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"loss curve {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
