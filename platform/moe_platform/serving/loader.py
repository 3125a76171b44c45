"""Where a serving engine's weights come from: an export (Hugging Face model directory) on disk, or a version in the
object-store model registry (`registry://NAME[@VERSION]`, zero-copy on the node; see `moe_platform.cluster.registry`).
"""

from __future__ import annotations

from pathlib import Path

from moe_platform.cluster import registry
from moe_platform.model.args import ModelArgs
from moe_platform.serving.engine import Engine, EngineConfig


def load_engine(model: str | Path | registry.ModelVersion, **options) -> Engine:
    """An engine (not started) on an export directory or a registry version; options: `EngineConfig`. With
    `backend: vllm` it is a `VllmEngine` (vLLM's async engine, already running); else our engine, in a process of its
    own (`ProcessEngine`: `core: process`, and `auto` for an export directory) or in this one (`Engine`: `core:
    thread`, and `auto` for a registry version, whose weights it serves from the object store without a copy)."""
    from_registry = isinstance(model, registry.ModelVersion) or registry.is_registry_uri(str(model))
    core = options.get("core", EngineConfig.core)
    if options.get("backend") == "vllm":
        from moe_platform.serving.vllm_engine import VllmEngine as engine_cls
    elif core == "process" or (core == "auto" and not from_registry):
        from moe_platform.serving.engine_process import ProcessEngine as engine_cls
    else:
        engine_cls = Engine
    if from_registry:
        mv = model if isinstance(model, registry.ModelVersion) else registry.resolve(str(model))
        if mv.kind != "model":
            raise ValueError(f"{mv.uri} is a LoRA adapter, not a model: serve its base model with engine.max_loras "
                             f"and load it as an adapter (adapters: {{NAME: {mv.uri}}})")
        return engine_cls.from_state_dict(ModelArgs.from_dict(mv.model_args), registry.load_weights(mv), mv.files,
                                          mv.uri, keepalive=mv.weights, **options)
    return engine_cls.from_pretrained(model, **options)


__all__ = ["load_engine"]
