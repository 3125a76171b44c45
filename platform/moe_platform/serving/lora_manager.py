"""The engine's LoRA adapters: which adapter holds which slot of the model's adapter bank, and how many running
requests use each (vLLM's LoRA manager). Thread-safe: loads and unloads come from request handlers while the engine
thread runs steps; the slot's weights are written between steps, under the engine's step lock."""

from __future__ import annotations

import re
import threading
from pathlib import Path

from torch import nn

from moe_platform.checkpoint.adapters import Adapters
from moe_platform.serving.adapters import AdapterBank, AdapterLoadError, LoadedAdapter, read_adapter_source
from moe_platform.serving.errors import NotFoundError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, step_lock: threading.Lock):
        self.max_loras = max_loras
        self.bank = AdapterBank(model, max_loras, max_lora_rank) if max_loras else None
        self._step_lock = step_lock  # held while a slot's weights are written: never in the middle of a step
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedAdapter] = {}

    def load(self, name: str, source: str, base_dir: Path | None = None) -> LoadedAdapter:
        """Load the LoRA adapter at `source` (a directory, or registry://NAME[@VERSION]) as `name` into a free slot
        (running requests go on). Loading the same source under the same name again is a no-op."""
        self._check(name)
        adapter, where = read_adapter_source(source, base_dir, name)
        return self.load_read(name, adapter, where)

    def load_read(self, name: str, adapter: Adapters, where: str) -> LoadedAdapter:
        """`load` of an adapter already read (`read_adapter_source`: the adapter and its canonical source)."""
        self._check(name)
        with self._lock:
            known = self._loaded.get(name)
        if known is not None and known.source == where and not known.unloading:
            return known
        return self._place(name, adapter, where, replace=False)

    def put(self, name: str, adapter: Adapters, source: str) -> LoadedAdapter:
        """Load an adapter held in memory as `name`; when an adapter of that name is loaded, write over its slot (a
        live swap between engine steps: its requests in flight go on with the new weights). `source` names it."""
        self._check(name)
        return self._place(name, adapter, source, replace=True)

    def _check(self, name: str) -> None:
        if self.bank is None:
            raise AdapterLoadError("this engine holds no adapters: set the engine option max_loras >= 1",
                                   param="lora_name")
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise AdapterLoadError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-'",
                                   param="lora_name")

    def _place(self, name: str, adapter: Adapters, where: str, replace: bool) -> LoadedAdapter:
        modules = self.bank.check(adapter, name, where)
        with self._lock:
            known = self._loaded.get(name)
            live = known is not None and not known.unloading and replace
        if live:  # the step lock is never taken under self._lock: a finishing step takes self._lock under it
            with self._step_lock:
                self.bank.write(known.slot, adapter)
            with self._lock:
                known.source, known.rank, known.targets = where, adapter.rank, modules
            return known
        with self._lock:
            known = self._loaded.get(name)
            if known is not None:
                if known.source == where and not known.unloading:
                    return known
                raise AdapterLoadError(f"an adapter named {name!r} is already loaded from another source; unload "
                                       f"it first", param="lora_name", code="adapter_exists")
            slot = self.bank.free_slot()
            if slot is None:
                raise AdapterLoadError(f"all {self.max_loras} adapter slots are in use "
                                       f"({', '.join(sorted(self._loaded))}); unload one first or raise max_loras",
                                       param="lora_name", code="adapter_slots_full")
            self.bank.slots[slot] = name  # reserved; requests see the adapter only once it is written
        try:
            with self._step_lock:
                self.bank.write(slot, adapter)
        except BaseException:
            with self._lock:
                self.bank.slots[slot] = None
            raise
        loaded = LoadedAdapter(name, where, slot, adapter.rank, targets=modules)
        with self._lock:
            self._loaded[name] = loaded
        return loaded

    def unload(self, name: str) -> None:
        """Stop accepting requests for adapter `name`; its slot frees once its running requests finish."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None or loaded.unloading:
                raise NotFoundError(f"no adapter named {name!r} is loaded; loaded: {sorted(self._loaded)}",
                                    param="lora_name", code="model_not_found")
            loaded.unloading = True
            if loaded.running == 0:
                self._free(loaded)

    def acquire(self, name: str) -> int:
        """A new request runs with adapter `name`: its slot (the adapter cannot go while the request runs)."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None or loaded.unloading:
                raise NotFoundError(f"no adapter named {name!r} is loaded; loaded: "
                                    f"{sorted(n for n, a in self._loaded.items() if not a.unloading)}",
                                    param="model", code="model_not_found")
            loaded.running += 1
            return loaded.slot

    def release(self, name: str) -> None:
        """A request that ran with adapter `name` finished (an unloading adapter's slot frees with its last one)."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is not None:
                loaded.running -= 1
                if loaded.unloading and loaded.running == 0:
                    self._free(loaded)

    def _free(self, loaded: LoadedAdapter) -> None:  # holds self._lock
        del self._loaded[loaded.name]
        self.bank.slots[loaded.slot] = None  # the next load overwrites every module's pair in it

    def loaded(self) -> list[dict]:
        """The adapters requests can use now: name, source, rank and requests in flight."""
        with self._lock:
            return [{"name": a.name, "source": a.source, "rank": a.rank, "running": a.running}
                    for a in sorted(self._loaded.values(), key=lambda a: a.name) if not a.unloading]
