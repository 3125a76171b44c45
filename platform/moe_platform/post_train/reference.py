"""The reference policy of DPO (and of GRPO's KL penalty), computed by the policy's own modules on the policy's own
layout.

The reference is the policy's modules with, for the duration of a no-grad forward (`ReferencePolicy.active`):
- the training adapters switched off (LoRA: every module's `lora` is detached and put back afterwards), and
- the tensors that differ between policy and reference swapped for the reference's values.

What differs depends on the set-up (`dpo.reference`, or `grpo.reference` for train.objective = grpo):
- `base` with LoRA: only what training changes outside the adapters, which is nothing but the routing-bias buffers of
  aux-loss-free balancing. The frozen base weights are shared: no second copy of the weights.
- `base` without LoRA: every trainable weight. The copy holds this rank's shard of each tensor only (tensor, expert
  and pipeline parallelism split it exactly like the policy), read from init.from_hf.
- a model directory: every weight, read from it, sharded the same way. It must hold the same architecture.

The copies are plain tensors outside the model: they are in no state dict, optimizer or checkpoint, and a resumed
or resharded run reads them again from their directory. Swapping works on any backend (one process, DeepSpeed with
ZeRO's flattened parameters, pipeline stages) because it replaces each tensor's storage (`.data`) and puts the
original storage back, never the tensor objects the optimizer and DeepSpeed hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from moe_platform.checkpoint.hf import HFWeights, read_model_args
from moe_platform.config import Config
from moe_platform.model.args import ModelArgs
from moe_platform.model.lora import is_lora_name

log = logging.getLogger("moe_platform.post_train")
# Model settings that do not change what a model computes: two directories may differ in them.
_NOT_COMPUTED = ("init_std", "max_seq_len")


def reference_setting(cfg: Config) -> tuple[str, str]:
    """(the reference setting of the config's objective, its key): grpo.reference for GRPO's KL penalty, else
    dpo.reference."""
    return (cfg.grpo.reference, "grpo.reference") if cfg.train.objective == "grpo" else (cfg.dpo.reference,
                                                                                          "dpo.reference")


def reference_dir(cfg: Config) -> Path:
    """Where the reference's weights are read from: init.from_hf for `base`, else the reference directory."""
    value, key = reference_setting(cfg)
    if value == "base":
        return Path(cfg.init.from_hf)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"{key} = {value!r} is neither 'base' nor a model directory")
    return path


def check_same_architecture(directory: Path, args: ModelArgs, key: str = "dpo.reference") -> None:
    """A clear error when the model in `directory` is not the policy's architecture."""
    theirs, ours = read_model_args(directory).to_dict(), args.to_dict()
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if k not in _NOT_COMPUTED and theirs.get(k) != v}
    if diff:
        raise ValueError(f"{key} {directory} is not the policy's architecture (reference, policy): {diff}")


class ReferencePolicy:
    """See the module docstring. `tensors` are this rank's tensors of the model by full name and `specs` their shard
    specs (a backend's `specs`); the copies are read through HFWeights, which reads only this rank's shares."""

    def __init__(self, cfg: Config, model: nn.Module, tensors: dict[str, torch.Tensor], specs: dict, args: ModelArgs):
        self.model = model
        self.adapters_off = cfg.lora.enabled
        source = reference_dir(cfg)
        setting, key = reference_setting(cfg)
        separate = setting != "base"
        if separate:
            check_same_architecture(source, args, key)
        wanted = []  # (name, live tensor): what the reference has its own values of
        seen: set[int] = set()
        for name, t in tensors.items():
            if id(t) in seen or is_lora_name(name) or t.is_meta:
                continue
            seen.add(id(t))  # tied weights: one tensor under two names
            trainable = isinstance(t, nn.Parameter) and t.requires_grad
            buffer = not isinstance(t, nn.Parameter)  # persistent buffers training updates (routing biases)
            if separate or trainable or buffer:
                wanted.append((name, t))
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        if wanted:
            weights = HFWeights(source, read_model_args(source) if separate else args)
            try:
                with torch.no_grad():
                    for name, t in wanted:
                        value = weights.read(name, specs[name])
                        if value.shape != t.shape:
                            raise ValueError(f"{key} {source}: {name} has shape {tuple(value.shape)} here, "
                                             f"the policy's is {tuple(t.shape)}")
                        self.pairs.append((t, value.to(t.device, t.dtype)))
            finally:
                weights.close()
        self.copied_numel = sum(ref.numel() for _, ref in self.pairs)
        self.copied_bytes = sum(ref.numel() * ref.element_size() for _, ref in self.pairs)
        log.info("reference policy: %s%s, %d tensors (%.1f MiB) of its own on this rank", source,
                 " with the adapters switched off" if self.adapters_off else "", len(self.pairs),
                 self.copied_bytes / 2**20)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the model computes the reference (forwards only: no gradients, no optimizer step)."""
        detached = []
        if self.adapters_off:
            for m in self.model.modules():
                lora = m._modules.get("lora")
                if lora is not None:
                    detached.append((m, lora))
                    m.lora = None
        swapped = []
        try:
            with torch.no_grad():
                for live, ref in self.pairs:
                    swapped.append((live, live.data))
                    live.data = ref
                yield
        finally:
            for live, storage in swapped:
                live.data = storage
            for m, lora in detached:
                m.lora = lora
