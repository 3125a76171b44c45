"""The layer side of low-rank adapters: how a projection or the routed experts add the adapters attached to them.

Adapters are attached from outside, as parallelism is: training's by `apply_lora` (model/lora.py), a serving
replica's by its adapter bank (serving/multi_lora.py). A layer only looks for a `lora` submodule and calls these
helpers, so this module is a leaf (it imports nothing from model/) and the layers need not know who attaches what.
"""

from __future__ import annotations

import torch
from torch import nn


def adapted(weight: torch.Tensor, lora: nn.Module | None) -> torch.Tensor:
    """The expert weight with its adapters folded in (the weight itself when there are none); `lora` is a stacked
    adapter (model/lora.py's StackedLoRA) whose `delta()` is the (E, out, in) update."""
    return weight if lora is None else weight + lora.delta().to(weight.dtype)


def with_adapter(out: torch.Tensor, lora: nn.ModuleDict | None, name: str, x: torch.Tensor) -> torch.Tensor:
    """`out` (a projection of x) plus the adapter term of adapter `name` in `lora`, when there is one (a serving
    module returns None for a batch without adapter rows)."""
    if lora is None or name not in lora:
        return out
    delta = lora[name](x)
    return out if delta is None else out + delta
