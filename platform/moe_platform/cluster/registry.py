"""Model registry in the Ray object store: training publishes exports, Serve replicas load them without disk.

One named, detached actor (`moe-platform-registry` in namespace `moe-platform`, no CPUs, on the head node) holds per
model name a list of versions: metadata (model args, the export's small files such as tokenizer.json and
config.json, source path, step, time) and an `ObjectRef` to the weights, a dict name -> numpy array in our own
layout (`MoETransformer.state_dict()` names, experts already stacked, so loading is no conversion).

- Ownership: an object lives as long as its owner, the process that put it. `ray.put(..., _owner=...)` is gone since
  Ray 2.56, so the publisher hands the arrays to the registry as a call argument and the registry `ray.put`s them
  itself (one copy, on the registry's node): the weights outlive the publisher (a training worker that finishes, or
  whose spot node is reclaimed). They live as long as the registry actor; it is in-memory state, so after a head
  restart publish again (disk exports are the durable copy).
- Zero copy: `ray.get` on the same node returns read-only numpy views into the shared-memory object store;
  `load_weights` wraps them with `torch.from_numpy` and the serving engine makes them the parameters
  (`assign=True`), so every replica on a node serves from the same physical pages. Copies happen only where needed:
  once per node when a replica's node first pulls the object, and for a dtype the engine converts to (`dtype:
  bfloat16` serving float32 weights). bfloat16 weights travel as their raw 16-bit patterns and stay zero-copy.
- Retention: a model keeps its last `keep` versions; older ones are dropped from the registry and freed once no
  replica still holds them (Ray's reference counting: a replica serving a pruned version keeps it alive).

Client functions (training and serving call these, not the actor):
`publish_export(export_dir or adapter_dir, name) -> version`, `resolve("registry://NAME[@VERSION]") -> ModelVersion`,
`list_models()`, `load_weights(model_version)`, and `export_publisher(cfg)` (the `on_export` hook that training
launchers run after the final export). This module is the storage core and imports nothing from serving: the
engine is built from a version by `moe_platform.serving.loader.load_engine`.
Serve takes `model: registry://NAME` (latest) or `registry://NAME@VERSION` in `args.model` / `user_config.model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from moe_platform.checkpoint import adapters
from moe_platform.checkpoint.hf import load_hf
from moe_platform.model.args import ModelArgs

log = logging.getLogger(__name__)

REGISTRY_NAME = "moe-platform-registry"
REGISTRY_NAMESPACE = "moe-platform"
URI_PREFIX = "registry://"
DEFAULT_KEEP = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_META_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # tokenizer and config files; weights travel separately
_RAW_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RegistryError(ValueError):
    """Unknown model name or version, or a malformed registry:// reference."""


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One published version: metadata plus the object-store reference to its weights."""

    name: str
    version: int
    step: int | None
    created: float  # unix time of publishing
    source: str  # the export directory it was read from
    model_args: dict
    files: dict[str, bytes]  # the export's small files by name: tokenizer.json, config.json, ...
    dtypes: dict[str, str]  # torch dtype of each weight ("bfloat16" weights travel as int16 bit patterns)
    nbytes: int
    weights: ray.ObjectRef  # -> dict[str, np.ndarray]
    kind: str = "model"  # or "adapter": a LoRA adapter (files: adapter_config.json, adapter_meta.json)

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.name}@{self.version}"

    def summary(self) -> dict[str, Any]:
        return {"uri": self.uri, "version": self.version, "step": self.step, "created": self.created,
                "source": self.source, "nbytes": self.nbytes, "kind": self.kind}


# -- references ------------------------------------------------------------------------------------------------------


def is_registry_uri(model: str) -> bool:
    return isinstance(model, str) and model.startswith(URI_PREFIX)


def parse_uri(uri: str) -> tuple[str, int | None]:
    """`registry://NAME` -> (NAME, None) (latest); `registry://NAME@VERSION` -> (NAME, VERSION)."""
    if not is_registry_uri(uri):
        raise RegistryError(f"{uri!r} is not a registry reference: expected registry://NAME or registry://NAME@VERSION")
    name, sep, version = uri[len(URI_PREFIX):].partition("@")
    check_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise RegistryError(f"{uri!r}: the version after '@' must be an integer >= 1, got {version!r}")
    return name, int(version)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (no '@' or '/'), "
                            f"starting with a letter or digit")
    return name


# -- the actor -------------------------------------------------------------------------------------------------------


class ModelRegistry:
    """The actor's state: name -> {version: ModelVersion}. Methods run one at a time (a plain actor)."""

    def __init__(self):
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._next: dict[str, int] = {}  # versions are never reused, even after pruning
        self._keep: dict[str, int] = {}

    def add(self, name: str, meta: dict, weights: dict[str, np.ndarray], keep: int) -> tuple[int, list[int]]:
        """Store a new version; returns (version, versions pruned by it)."""
        # `weights` arrived as an argument owned by the publisher; this put makes an object the registry owns.
        ref = ray.put(weights)
        version = self._next.get(name, 1)
        self._next[name] = version + 1
        self._keep[name] = keep
        versions = self._models.setdefault(name, {})
        versions[version] = ModelVersion(name=name, version=version, weights=ref, **meta)
        pruned = sorted(versions)[:-keep]
        for v in pruned:
            del versions[v]  # freed once no replica borrows it any more
        return version, pruned

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        versions = self._models.get(name)
        if not versions:
            known = sorted(n for n, v in self._models.items() if v)
            raise RegistryError(f"no model named {name!r} in the registry; published models: {known or 'none'} "
                                f"(publish with `moe-platform publish EXPORT_DIR --name {name}`)")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            why = f" any more (the registry keeps the last {self._keep[name]})" if version < min(versions) else ""
            raise RegistryError(f"model {name!r} has no version {version}{why}; available: {sorted(versions)}")
        return versions[version]

    def list(self) -> dict[str, list[dict]]:
        return {name: [versions[v].summary() for v in sorted(versions)]
                for name, versions in sorted(self._models.items()) if versions}


_RegistryActor = ray.remote(ModelRegistry)


def connect(address: str | None = None) -> None:
    """Join a Ray cluster unless this process already has: `address`, else RAY_ADDRESS, else the local one."""
    if not ray.is_initialized():
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
        except ConnectionError as e:
            raise RegistryError(f"the model registry lives in a Ray cluster and none is reachable ({e}); start one "
                                f"(`ray start --head`) or pass its address") from None


def get_registry(address: str | None = None) -> ray.actor.ActorHandle:
    """The registry actor, created on first use."""
    connect(address)
    return _RegistryActor.options(
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0,
        resources={"node:__internal_head__": 0.001},  # the on-demand head, not a spot worker that may vanish
        scheduling_strategy="DEFAULT",  # not inside the caller's placement group (a Ray Train worker's)
        max_restarts=-1,  # the name stays reachable; a restarted registry is empty
    ).remote()


def _call(ref: ray.ObjectRef):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, RegistryError):
            raise RegistryError(str(e.cause)) from None
        raise


# -- client API ------------------------------------------------------------------------------------------------------


def read_export(export_dir: str | Path) -> tuple[ModelArgs | None, dict[str, np.ndarray], dict[str, str],
                                                  dict[str, bytes]]:
    """An export directory -> (model args, weights as numpy arrays in our layout, their torch dtypes, small files).
    A LoRA adapter directory (adapter_config.json) gives no model args, its tensors and its config and base
    fingerprint (checkpoint/adapters.py)."""
    d = Path(export_dir)
    if (d / adapters.PEFT_CONFIG_FILE).is_file():
        adapter = adapters.read_adapters(d)
        meta = {"base_fingerprint": adapter.base_fingerprint, "base_model": adapter.base_model}
        files = {adapters.PEFT_CONFIG_FILE: (d / adapters.PEFT_CONFIG_FILE).read_bytes(),
                 adapters.META_FILE: json.dumps(meta).encode()}
        return None, *_arrays(adapter.tensors), files
    args, state = load_hf(d)  # Mixtral's per-expert tensors are stacked here, once, instead of on every load
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; Engine.from_state_dict re-ties it
    weights, dtypes = _arrays(state)
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.suffix in _META_SUFFIXES}
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"{d} has no tokenizer.json: a served model needs its tokenizer in the export")
    return args, weights, dtypes, files


def pack_weights(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors -> (numpy arrays, their torch dtypes), the form weights take in the object store: `ray.get` of them on
    a node gives read-only views into its shared memory, which `unpack_weights` turns back into tensors unchanged."""
    return _arrays(state)


def unpack_weights(arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, torch.Tensor]:
    """`pack_weights`' arrays (e.g. as `ray.get` returns them) -> CPU tensors viewing the same memory (no copy)."""
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # torch has no read-only tensors; nothing writes to weights at inference (see Engine.from_state_dict).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, array in arrays.items():
            t = torch.from_numpy(array)
            want = getattr(torch, dtypes[name])
            out[name] = t if t.dtype == want else t.view(want)
    return out


def _arrays(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    weights: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        try:
            weights[name] = t.numpy()
        except TypeError:  # bfloat16 / float8 have no numpy dtype: ship the bit patterns, view them back on load
            weights[name] = t.view(_RAW_BITS[t.element_size()]).numpy()
    return weights, dtypes


def publish_export(export_dir: str | Path, name: str, *, step: int | None = None, keep: int = DEFAULT_KEEP,
                   address: str | None = None) -> int:
    """Publish an export directory, or a LoRA adapter directory, as the next version of `name`; returns the version
    (1, 2, ...). From now on the registry keeps the last `keep` versions of `name`."""
    check_name(name)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise RegistryError(f"keep must be an integer >= 1 (versions to retain), got {keep!r}")
    args, weights, dtypes, files = read_export(export_dir)
    meta = {"step": step, "created": time.time(), "source": str(Path(export_dir).resolve()),
            "model_args": args.to_dict() if args is not None else {}, "files": files, "dtypes": dtypes,
            "nbytes": sum(a.nbytes for a in weights.values()), "kind": "model" if args is not None else "adapter"}
    version, pruned = _call(get_registry(address).add.remote(name, meta, weights, keep))
    log.info("published %s as %s%s@%d%s", export_dir, URI_PREFIX, name, version,
             f" (pruned versions {pruned})" if pruned else "")
    return version


def resolve(model: str, version: int | None = None, address: str | None = None) -> ModelVersion:
    """`registry://NAME[@VERSION]` or a bare NAME (+ `version`) -> that version (latest when none is given)."""
    name, v = parse_uri(model) if is_registry_uri(model) else (check_name(model), None)
    return _call(get_registry(address).get.remote(name, version if version is not None else v))


def list_models(address: str | None = None) -> dict[str, list[dict]]:
    """name -> summaries of its retained versions (uri, version, step, created, source, nbytes), oldest first."""
    return _call(get_registry(address).list.remote())


def load_weights(model: ModelVersion) -> dict[str, torch.Tensor]:
    """The version's weights as CPU tensors that are read-only views into the object store (no copy on this node)."""
    return unpack_weights(ray.get(model.weights), model.dtypes)


def publish_training_export(export_dir: str | Path, name: str, *, keep: int = DEFAULT_KEEP,
                            step: int | None = None) -> int | None:
    """Publish a training run's final export as the next version of `name`.

    A failed publish is logged, not raised: the export on disk is the run's durable result, and
    `moe-platform publish` can publish it later.
    """
    try:
        version = publish_export(export_dir, name, step=step, keep=keep)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.error("publishing %s to the model registry as %r failed: %s", export_dir, name, e)
        return None
    log.info("published the final export as %s%s@%d", URI_PREFIX, name, version)
    return version


@dataclasses.dataclass(frozen=True)
class ExportPublisher:
    """A training launcher's `on_export` hook (picklable: it travels to Ray Train workers and spawned ranks)."""

    name: str
    keep: int = DEFAULT_KEEP

    def __call__(self, export_dir: Path, step: int) -> int | None:
        return publish_training_export(export_dir, self.name, keep=self.keep, step=step)


def export_publisher(cfg) -> ExportPublisher | None:
    """The hook that publishes a run's final export as `cfg.checkpoint.publish_to`; None when that is empty."""
    name = cfg.checkpoint.publish_to
    return ExportPublisher(name, cfg.checkpoint.publish_keep) if name else None
