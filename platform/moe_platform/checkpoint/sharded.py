"""Sharded, layout-independent model + optimizer state.

Every tensor is saved as pieces, each tagged with the box (a [start, stop) range per dimension) it covers in the
full, single-device tensor of the same name. Any layout can then read any checkpoint: it assembles the full tensor
of each name it needs from the pieces and cuts out its own shard. Each rank writes only the pieces it owns (one
writer per distinct shard), so the whole model never funnels through one process.

Files inside a checkpoint: `shards/rank{R}.safetensors` (tensors keyed `{kind}/{name}/{i}`, kind in model,
exp_avg, exp_avg_sq) and `shards/rank{R}.json` (the index: full shapes, boxes, optimizer step counts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from moe_platform.checkpoint.store import CheckpointError, CheckpointWriter, prepare_tensors

SHARDS_DIR = "shards"
STATE_KINDS = ("model", "exp_avg", "exp_avg_sq")
Box = list[tuple[int, int]]


@dataclass
class ShardSpec:
    """Where a local tensor sits in the full one: local = cat([full[box] for box in boxes], dim=concat_dim)."""

    full_shape: tuple[int, ...]
    boxes: list[Box]
    concat_dim: int = 0

    @staticmethod
    def whole(shape: Iterable[int]) -> ShardSpec:
        shape = tuple(shape)
        return ShardSpec(shape, [[(0, n) for n in shape]])

    def extract(self, full: torch.Tensor) -> torch.Tensor:
        parts = [full[tuple(slice(a, b) for a, b in box)] for box in self.boxes]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.concat_dim)).contiguous()

    def split(self, local: torch.Tensor) -> list[torch.Tensor]:
        sizes = [box[self.concat_dim][1] - box[self.concat_dim][0] for box in self.boxes]
        return list(torch.split(local, sizes, dim=self.concat_dim)) if len(sizes) > 1 else [local]


@dataclass
class LocalState:
    """One rank's view of the training state, by full parameter name."""

    model: dict[str, torch.Tensor]  # fp32 master values of params and persistent buffers (this rank's shard)
    specs: dict[str, ShardSpec]
    exp_avg: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    step: dict[str, int] = field(default_factory=dict)
    owned: set[str] | None = None  # names this rank writes (None = all)


def write_local_state(writer: CheckpointWriter, rank: int, state: LocalState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, value in state.model.items():
        if state.owned is not None and name not in state.owned:
            continue
        spec = state.specs[name]
        entry = {"full_shape": list(spec.full_shape), "boxes": [[list(r) for r in box] for box in spec.boxes],
                 "dtype": str(value.dtype).removeprefix("torch."), "kinds": ["model"]}
        for kind, source in (("model", state.model), ("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq)):
            if name not in source:
                continue
            if kind != "model":
                entry["kinds"].append(kind)
            for i, piece in enumerate(spec.split(source[name])):
                tensors[f"{kind}/{name}/{i}"] = piece
        if name in state.step:
            entry["step"] = state.step[name]
        index[name] = entry
    if not index:
        return
    writer.save_tensors(f"{SHARDS_DIR}/rank{rank}.safetensors", tensors)
    writer.save_json(f"{SHARDS_DIR}/rank{rank}.json", {"rank": rank, "params": index})


class ShardedReader:
    """Assembles full tensors by name from every rank's pieces in a committed checkpoint."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        files = sorted((self.dir / SHARDS_DIR).glob("rank*.json"))
        if not files:
            raise CheckpointError(self.dir, f"no {SHARDS_DIR}/rank*.json index: not a sharded checkpoint")
        self.pieces: dict[str, list[tuple[Path, int, Box]]] = {}
        self.meta: dict[str, dict] = {}
        for f in files:
            index = json.loads(f.read_text())
            weights = f.with_suffix(".safetensors")
            for name, entry in index["params"].items():
                self.meta.setdefault(name, entry)
                for i, box in enumerate(entry["boxes"]):
                    self.pieces.setdefault(name, []).append((weights, i, [tuple(r) for r in box]))
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self.pieces)

    def has(self, name: str, kind: str = "model") -> bool:
        return name in self.meta and kind in self.meta[name]["kinds"]

    def step(self, name: str) -> int | None:
        return self.meta.get(name, {}).get("step")

    def _open(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def full(self, name: str, kind: str = "model") -> torch.Tensor:
        if name not in self.meta:
            raise CheckpointError(self.dir, f"has no tensor named {name!r} (different model config?)")
        entry = self.meta[name]
        shape = tuple(entry["full_shape"])
        out = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        covered = 0
        seen: set[tuple] = set()
        for path, i, box in self.pieces[name]:
            key = tuple(box)
            if key in seen:  # the same shard written twice (e.g. replicated buffers) is read once
                continue
            seen.add(key)
            piece = self._open(path).get_tensor(f"{kind}/{name}/{i}")
            out[tuple(slice(a, b) for a, b in box)] = piece
            covered += piece.numel()
        if covered != math.prod(shape):
            raise CheckpointError(self.dir, f"pieces of {name!r} cover {covered} of {math.prod(shape)} elements: "
                                            f"some rank's shard is missing")
        return out

    def read(self, name: str, spec: ShardSpec, kind: str = "model") -> torch.Tensor:
        """The local tensor of `name` under `spec` (a rank's share)."""
        return spec.extract(self.full(name, kind))

    def full_state_dict(self, kind: str = "model") -> dict[str, torch.Tensor]:
        return {name: self.full(name, kind) for name in self.names() if self.has(name, kind)}


class ShardFiles:
    """Writes a rank's files into a checkpoint's temp directory, maybe shared with other ranks (same calls as
    CheckpointWriter); `written` lists them for the rank's own manifest entries."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.written: list[str] = []

    def _target(self, name: str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.written.append(name)
        return path

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file

        path = self._target(name)
        save_file(prepare_tensors(tensors, name), str(path))
        return path

    def save_json(self, name: str, obj) -> Path:
        path = self._target(name)
        path.write_text(json.dumps(obj, indent=1))
        return path

    def copy_file(self, src, name: str) -> Path:
        import shutil

        path = self._target(name)
        shutil.copyfile(src, path)
        return path
