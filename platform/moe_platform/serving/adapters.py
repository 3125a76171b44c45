"""The adapters one serving engine holds: `max_loras` slots of LoRA adapters over its base model.

`AdapterBank` puts slot-stacked adapter modules (serving/multi_lora.py) on every attention projection, routed-expert
block and shared expert of the engine's model, and loads adapters into free slots. An adapter comes from a directory
(a LoRA run's `<run>/adapter`, or any PEFT LoRA adapter on the attention projections) or from the object-store
registry (`registry://NAME[@VERSION]` of an adapter that training published). Before an adapter takes a slot it is
checked against the base model: every tensor must name a module the model has, with the model's shapes, its rank
must fit `max_lora_rank`, and when its files record the base model's fingerprint (ours do) it must be this model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from moe_platform.checkpoint.adapters import Adapters, base_fingerprint, read_adapters
from moe_platform.model.attention import Attention
from moe_platform.model.lora import ATTENTION_TARGETS, MLP_TARGETS
from moe_platform.model.mla import MLAttention
from moe_platform.model.moe import GroupedExperts, SwiGLU
from moe_platform.serving.errors import InvalidRequestError
from moe_platform.serving.multi_lora import AdapterBatch, MultiExpertLoRA, MultiLoRA

_RANK = -1
_EXPERT_TENSORS = ("gate_up_proj.A", "gate_up_proj.B", "down_proj.A", "down_proj.B")
logger = logging.getLogger(__name__)


class AdapterLoadError(InvalidRequestError):
    """An adapter that cannot be loaded on this engine (bad files, another base model, no free slot). `message` is
    what API clients see; `detail`, when there is one, is what the server's log and Python callers see (`str()`),
    e.g. which file under which path is wrong."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, detail: str | None = None):
        super().__init__(message, param=param, code=code)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail or self.message


@dataclass
class LoadedAdapter:
    name: str
    source: str
    slot: int
    rank: int
    running: int = 0  # requests in flight with it
    unloading: bool = False  # no new requests; the slot frees when `running` reaches 0
    targets: list[str] = field(default_factory=list)


class AdapterBank:
    """Slot-stacked adapter modules installed on `model`, and which adapter holds which slot."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.batch = AdapterBatch(max_loras)
        self.fingerprint = base_fingerprint(model.state_dict())
        dtype = next(model.parameters()).dtype
        self.dense: dict[str, MultiLoRA] = {}  # "<module>.lora.<target>" -> its slots
        self.experts: dict[str, MultiExpertLoRA] = {}  # "<experts module>.lora" -> its slots
        self.shapes: dict[str, tuple[int, ...]] = {}  # every tensor an adapter may have; _RANK marks the rank

        def dense(prefix: str, linear: nn.Linear) -> MultiLoRA:
            self.shapes[f"{prefix}.A"] = (_RANK, linear.in_features)
            self.shapes[f"{prefix}.B"] = (linear.out_features, _RANK)
            self.dense[prefix] = MultiLoRA(self.batch, max_loras, linear.in_features, linear.out_features, max_rank,
                                           dtype)
            return self.dense[prefix]

        for name, m in model.named_modules():
            if isinstance(m, (Attention, MLAttention, SwiGLU)):
                targets = MLP_TARGETS if isinstance(m, SwiGLU) else [
                    t for t in ATTENTION_TARGETS if isinstance(getattr(m, t, None), nn.Linear)]
                m.lora = nn.ModuleDict({t: dense(f"{name}.lora.{t}", getattr(m, t)) for t in targets})
            elif isinstance(m, GroupedExperts):
                e, two_i, d = m.gate_up_proj.shape
                m.lora = self.experts[f"{name}.lora"] = MultiExpertLoRA(self.batch, max_loras, e, d, two_i // 2,
                                                                        max_rank, dtype)
                for t, (fan_in, fan_out) in {"gate_up_proj": (d, two_i), "down_proj": (two_i // 2, d)}.items():
                    self.shapes[f"{name}.lora.{t}.A"] = (e, _RANK, fan_in)
                    self.shapes[f"{name}.lora.{t}.B"] = (e, fan_out, _RANK)
        self.slots: list[str | None] = [None] * max_loras

    def free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s is None), None)

    def check(self, adapter: Adapters, name: str, source: str) -> list[str]:
        """Raise AdapterLoadError unless `adapter` fits this base model; return the adapted module names."""
        where = f"adapter {name!r}"  # never its source: a path on the server is no business of the API's
        if adapter.base_fingerprint is not None and adapter.base_fingerprint != self.fingerprint:
            trained_on = f" ({adapter.base_model})" if adapter.base_model else ""
            raise AdapterLoadError(
                f"{where} was trained on a different base model{trained_on}: its base fingerprint is "
                f"{adapter.base_fingerprint}, this server's base model has {self.fingerprint}; load it on a server of "
                f"its own base model", param="lora_path", code="adapter_base_mismatch")
        if adapter.rank > self.max_rank:
            raise AdapterLoadError(f"{where} has rank {adapter.rank}, above this server's max_lora_rank "
                                   f"{self.max_rank}; raise the engine option max_lora_rank", param="lora_path")
        for tensor_name, t in adapter.tensors.items():
            want = self.shapes.get(tensor_name)
            if want is None:
                raise AdapterLoadError(f"{where}: {tensor_name} adapts a module this base model does not have; it is "
                                       f"an adapter for a different base model", param="lora_path",
                                       code="adapter_base_mismatch")
            expected = tuple(adapter.rank if n == _RANK else n for n in want)
            if tuple(t.shape) != expected:
                raise AdapterLoadError(f"{where}: {tensor_name} has shape {tuple(t.shape)}, this base model needs "
                                       f"{expected}; it is an adapter for a different base model", param="lora_path",
                                       code="adapter_base_mismatch")
        modules = sorted({n.rsplit(".", 1)[0] for n in adapter.tensors})
        for module in modules:
            if module in self.dense:
                parts = [f"{module}.A", f"{module}.B"]
            else:
                base = module.rsplit(".lora.", 1)[0] + ".lora"
                parts = [f"{base}.{p}" for p in _EXPERT_TENSORS]
            missing = [p for p in parts if p not in adapter.tensors]
            if missing:
                raise AdapterLoadError(f"{where}: {missing[0]} is missing (an adapter pair needs A and B)",
                                       param="lora_path")
        return modules

    def write(self, slot: int, adapter: Adapters | None) -> None:
        """Put `adapter` in `slot` (None clears the slot): every module without a tensor in it gets none there."""
        tensors = adapter.tensors if adapter is not None else {}
        scale = adapter.scale if adapter is not None else 0.0
        for prefix, module in self.dense.items():
            a = tensors.get(f"{prefix}.A")
            module.write(slot, a, tensors.get(f"{prefix}.B") if a is not None else None, scale)
        for prefix, module in self.experts.items():
            own = {p: tensors[f"{prefix}.{p}"] for p in _EXPERT_TENSORS if f"{prefix}.{p}" in tensors}
            module.write(slot, own if len(own) == len(_EXPERT_TENSORS) else None, scale)


def read_adapter_source(source: str, base_dir: Path | None = None, name: str = "") -> tuple[Adapters, str]:
    """An adapter directory or registry://NAME[@VERSION] -> (the adapter, a canonical name of its source). A directory
    that does not load is refused with one message whatever the reason (missing, unreadable, not an adapter), which
    names neither the resolved path nor whether it exists; the error's `detail` and the server's log say why."""
    from moe_platform.cluster import registry

    if registry.is_registry_uri(source):
        try:
            mv = registry.resolve(source)
        except registry.RegistryError as e:
            raise AdapterLoadError(str(e), param="lora_path") from None
        if mv.kind != "adapter":
            raise AdapterLoadError(f"{mv.uri} is a model, not an adapter: serve it as a model (model: {mv.uri})",
                                   param="lora_path")
        try:
            return read_adapters(mv.uri, mv.files, registry.load_weights(mv)), mv.uri
        except ValueError as e:
            raise AdapterLoadError(str(e), param="lora_path") from None
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    path = path.resolve()
    try:
        return read_adapters(path), str(path)
    except (ValueError, OSError) as e:
        logger.warning("adapter %r: loading %s (lora_path %r) failed: %s", name, path, source, e)
        raise AdapterLoadError(f"adapter {name!r} could not be loaded: lora_path is not a valid adapter directory on "
                               f"this server (the server log says why)", param="lora_path", code="invalid_adapter",
                               detail=str(e)) from None
