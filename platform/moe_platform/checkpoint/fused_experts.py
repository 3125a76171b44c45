"""gpt-oss's routed experts on disk, and ours.

gpt-oss stores each MoE layer's experts stacked, in the layout of its `x @ W` kernels: `gate_up_proj` (E, D, 2I)
with the gate and up columns interleaved (gate = columns 0, 2, 4, ...; up = 1, 3, 5, ...), `gate_up_proj_bias`
(E, 2I) interleaved alike, `down_proj` (E, I, D) and `down_proj_bias` (E, D). Its published checkpoints keep the two
weights in MXFP4 instead (checkpoint/mxfp4.py): `*_blocks` and `*_scales` of the (E, 2I, D) and (E, D, I) matrices,
that is, not transposed, the gate/up rows interleaved.

Ours are the `x @ W.T` layout of every other architecture: gate_up_proj (E, 2I, D) with the gate rows first, then
the up rows, down_proj (E, D, I), and the biases (E, 2I) and (E, D). Converting is a permutation and a transpose:
bit for bit both ways. Reading a box of one of ours touches only the disk rows and columns it covers (a
tensor-parallel rank's gate and up rows are one contiguous run of interleaved disk rows), and only its experts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from moe_platform.checkpoint.mxfp4 import BLOCK, dequantize_mxfp4

FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
Reader = Callable[[str, Sequence[tuple[int, int]]], torch.Tensor]  # (disk name, box) -> those values


def to_disk(kind: str, t: torch.Tensor) -> torch.Tensor:
    """One of our expert tensors -> gpt-oss's: kind is gate_up_proj, gate_up_proj_bias, down_proj or down_proj_bias."""
    if kind == "down_proj":
        return t.transpose(1, 2).contiguous()  # (E, D, I) -> (E, I, D)
    if kind == "down_proj_bias":
        return t.contiguous()
    inter = t.shape[1] // 2
    out = torch.empty_like(t)
    out[:, 0::2], out[:, 1::2] = t[:, :inter], t[:, inter:]  # [gate; up] -> interleaved
    return out.transpose(1, 2).contiguous() if kind == "gate_up_proj" else out  # (E, 2I, D) -> (E, D, 2I)


def disk_rows(rows: Sequence[int], inter: int) -> tuple[int, int, list[int]]:
    """Our gate_up rows -> the interleaved disk rows (lo, hi) to read and each row's offset into them."""
    disk = [2 * j if j < inter else 2 * (j - inter) + 1 for j in rows]
    lo = min(disk)
    return lo, max(disk) + 1, [r - lo for r in disk]


def recipe(parts: dict[str, str], kind: str) -> tuple:
    """The read recipe of our `kind` tensor from the layer's disk names (`parts`: suffix -> name)."""
    if kind.endswith("_bias"):
        return ("fused_gate_up_bias" if kind == "gate_up_proj_bias" else "plain", parts[""])
    if "_blocks" in parts:
        return (f"mxfp4_{kind}", parts["_blocks"], parts["_scales"])
    return (f"fused_{kind}", parts[""])


def read_boxes(kind: str, parts: Sequence[str], boxes: Sequence[Sequence[tuple[int, int]]], inter: int,
               read: Reader) -> torch.Tensor:
    """full[boxes] of our expert tensor, concatenated along dim 1 (the boxes differ only there, as a tensor-parallel
    rank's gate and up rows do), from its disk recipe (kind, parts), reading only what they cover: one rank's gate
    and up rows [a, b) and [I + a, I + b) are the one run [2a, 2b) of interleaved disk rows."""
    (e0, e1), _, *cols = boxes[0]
    rows = [r for box in boxes for r in range(*box[1])]
    if kind == "fused_down_proj":  # disk (E, I, D), ours (E, D, I)
        return read(parts[0], [(e0, e1), *cols, (min(rows), max(rows) + 1)]).transpose(1, 2)
    if kind in ("fused_gate_up_proj", "fused_gate_up_bias"):
        lo, hi, pick = disk_rows(rows, inter)
        if kind == "fused_gate_up_bias":  # disk (E, 2I)
            return read(parts[0], [(e0, e1), (lo, hi)])[:, pick]
        return read(parts[0], [(e0, e1), *cols, (lo, hi)])[:, :, pick].transpose(1, 2)  # disk (E, D, 2I)
    # MXFP4: (E, rows, groups, 16) blocks and (E, rows, groups) scales of the untransposed matrix
    (c0, c1), = cols
    g0, g1 = c0 // BLOCK, -(-c1 // BLOCK)
    if kind == "mxfp4_gate_up_proj":
        lo, hi, pick = disk_rows(rows, inter)
    else:
        lo, hi, pick = min(rows), max(rows) + 1, [r - min(rows) for r in rows]
    blocks = read(parts[0], [(e0, e1), (lo, hi), (g0, g1), (0, BLOCK // 2)])
    scales = read(parts[1], [(e0, e1), (lo, hi), (g0, g1)])
    values = dequantize_mxfp4(blocks, scales, torch.float32, where=parts[0])[:, pick]
    return values[:, :, c0 - g0 * BLOCK: c1 - g0 * BLOCK]


def our_shape(kind: str, parts: Sequence[str], shape_of: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
    disk = shape_of(parts[0])
    if kind in ("fused_gate_up_proj", "fused_down_proj"):
        return (disk[0], disk[2], disk[1])
    if kind == "fused_gate_up_bias":
        return disk
    return (disk[0], disk[1], disk[2] * BLOCK)  # MXFP4 blocks (E, rows, groups, 16)
