"""Training state (optimizer, RNG, LR schedule) as safetensors tensors + a JSON tree, and back, without pickle.

`flatten_state` is the general mechanism: it walks nested Python state and splits it into a flat
{key: Tensor} dict (for safetensors) and a JSON tree in which every tensor is replaced by a reference to its key.
Types JSON can't represent exactly are tagged so they come back as the same type and value::

    {"__tensor__": "state.0.exp_avg"}                  torch.Tensor (stored in the tensor dict)
    {"__ndarray__": key, "dtype": "<u4", "shape": []}  numpy array (raw bytes stored as a uint8 tensor)
    {"__tuple__": [...]}                               tuple (torch optimizers insist on betas being a tuple)
    {"__dict__": [[k, v], ...]}                        dict with non-str keys (optimizer state is keyed by int)
    {"__float__": "nan" | "inf" | "-inf"}              non-finite float (strict JSON has none)
    {"__numpy__": "<f4", "value": ...}                 numpy scalar
    {"__dtype__": "float32"}                           torch.dtype

Every tag is a key of the form __name__, and a user dict with such a key is itself written as {"__dict__": ...}, so
decoding is never ambiguous. Python floats go through JSON's repr, which round-trips them exactly.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .store import CheckpointWriter, load_json, load_tensors

_TAGS = frozenset({"__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "__numpy__", "__dtype__"})
OPTIMIZER_FORMAT = "torch-optimizer-state"
RNG_FORMAT = "moe-platform-rng"
STATE_VERSION = 1


def _is_dunder(key: Any) -> bool:
    return isinstance(key, str) and len(key) > 4 and key.startswith("__") and key.endswith("__")


def _encode_float(x: float) -> Any:
    if math.isfinite(x):
        return x
    return {"__float__": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


class _Flattener:
    def __init__(self, allow_tensors: bool):
        self.allow_tensors = allow_tensors
        self.tensors: dict[str, torch.Tensor] = {}

    def _tensor_key(self, path: str) -> str:
        key = path or "tensor"
        # "a.b" as one dict key and a -> b as nesting give the same path; disambiguate instead of overwriting.
        n, unique = 1, key
        while unique in self.tensors:
            unique, n = f"{key}~{n}", n + 1
        return unique

    def _no_tensors(self, path: str, what: str) -> TypeError:
        return TypeError(f"{what} at {path or '<root>'} can't go into plain JSON; use flatten_state to split it out")

    def encode(self, obj: Any, path: str) -> Any:
        if isinstance(obj, np.generic):  # before float: np.float64 subclasses float and would lose its type
            if obj.dtype.kind not in "biuf":
                raise TypeError(f"numpy scalar of dtype {obj.dtype} at {path or '<root>'} is not supported")
            return {"__numpy__": obj.dtype.str, "value": self.encode(obj.item(), path)}
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return _encode_float(obj)
        if isinstance(obj, torch.Tensor):
            if not self.allow_tensors:
                raise self._no_tensors(path, "a torch.Tensor")
            key = self._tensor_key(path)
            self.tensors[key] = obj.detach()
            return {"__tensor__": key}
        if isinstance(obj, np.ndarray):
            if not self.allow_tensors:
                raise self._no_tensors(path, "a numpy array")
            if obj.dtype.hasobject:
                raise TypeError(f"numpy array at {path or '<root>'} has dtype object, which has no byte layout")
            key = self._tensor_key(path)
            raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)  # any dtype -> its exact bytes
            self.tensors[key] = torch.from_numpy(raw.copy())
            return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, torch.dtype):
            return {"__dtype__": str(obj).removeprefix("torch.")}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
        if isinstance(obj, Mapping):

            def child(k: Any) -> str:
                return f"{path}.{k}" if path else str(k)

            if all(isinstance(k, str) and not _is_dunder(k) for k in obj):
                return {k: self.encode(v, child(k)) for k, v in obj.items()}
            return {"__dict__": [[self.encode(k, child(k) + ".key"), self.encode(v, child(k))] for k, v in obj.items()]}
        raise TypeError(
            f"cannot store {type(obj).__name__} at {path or '<root>'} without pickle; supported: None/bool/int/float/"
            "str, list/tuple/dict of those, torch.Tensor, numpy arrays and scalars, torch.dtype"
        )


def _decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    tags = _TAGS.intersection(tree)
    if not tags:
        return {k: _decode(v, tensors) for k, v in tree.items()}
    if len(tags) > 1:
        raise ValueError(f"state tree node has several type tags {sorted(tags)}: {tree!r}")
    (tag,) = tags
    value = tree[tag]
    if tag == "__tensor__":
        if value not in tensors:
            raise ValueError(f"state tree references tensor {value!r}, which is missing from the tensor file")
        return tensors[value]
    if tag == "__ndarray__":
        if value not in tensors:
            raise ValueError(f"state tree references array {value!r}, which is missing from the tensor file")
        raw = tensors[value].detach().to("cpu").contiguous().numpy()
        return raw.view(np.dtype(tree["dtype"])).reshape(tree["shape"]).copy()
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in value)
    if tag == "__dict__":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if tag == "__float__":
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"unknown special float {value!r} in state tree")
        return float(value)
    if tag == "__numpy__":
        return np.dtype(value).type(_decode(tree["value"], tensors))
    dtype = getattr(torch, value, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {value!r} in state tree")
    return dtype


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state into {dotted.path: Tensor} and a JSON-able tree referencing those keys.

    Tensors are returned as they are (detached, not copied): save them before the state changes again.
    """
    flattener = _Flattener(allow_tensors=True)
    tree = flattener.encode(obj, prefix)
    return flattener.tensors, tree


def unflatten_state(tensors: Mapping[str, torch.Tensor], tree: Any) -> Any:
    """Inverse of flatten_state."""
    return _decode(tree, tensors)


def to_jsonable(obj: Any) -> Any:
    """Encode tensor-free Python state (tuples, int-keyed dicts, inf/nan, numpy scalars) as strict JSON values."""
    return _Flattener(allow_tensors=False).encode(obj, "")


def from_jsonable(tree: Any) -> Any:
    """Inverse of to_jsonable."""
    return _decode(tree, {})


# -- optimizer -----------------------------------------------------------------------------------------------------


def flatten_optimizer_state(optim_state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> ({"state.{idx}.{key}": Tensor, ...}, JSON meta).

    The meta holds param_groups, non-tensor state entries (e.g. an int step) and the list of tensor keys, so a
    missing or extra tensor is detected on load instead of silently resetting a moment estimate.
    """
    if not isinstance(optim_state_dict, Mapping) or "state" not in optim_state_dict:
        raise ValueError("expected a torch optimizer state_dict with 'state' and 'param_groups' keys")
    if "param_groups" not in optim_state_dict:
        raise ValueError("optimizer state_dict has no 'param_groups'; pass optimizer.state_dict(), not .state")
    tensors, tree = flatten_state(dict(optim_state_dict))
    meta = {"format": OPTIMIZER_FORMAT, "version": STATE_VERSION, "tensor_keys": sorted(tensors), "tree": tree}
    return tensors, meta


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of flatten_optimizer_state; the result goes straight into optimizer.load_state_dict."""
    _check_format(meta, OPTIMIZER_FORMAT, "optimizer state")
    expected, present = set(meta["tensor_keys"]), set(tensors)
    if expected != present:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise ValueError(f"optimizer tensors do not match their meta: missing {missing[:5]}, unexpected {extra[:5]}")
    state_dict = unflatten_state(tensors, meta["tree"])
    if not isinstance(state_dict.get("state"), dict) or not isinstance(state_dict.get("param_groups"), list):
        raise ValueError("optimizer meta does not decode to {'state': dict, 'param_groups': list}")
    return state_dict


def _check_format(meta: Any, fmt: str, what: str) -> None:
    if not isinstance(meta, Mapping) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, Mapping) else type(meta).__name__
        raise ValueError(f"{what} meta has format {got!r}, expected {fmt!r}")
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{what} meta version {meta.get('version')!r} is not supported (expected {STATE_VERSION})")


# -- RNG -----------------------------------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, numpy (global), torch CPU and every CUDA device's RNG state as tensors + JSON meta."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    tensors = {"torch.cpu": torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, state in enumerate(cuda_states):
        tensors[f"torch.cuda.{i}"] = state.cpu()
    meta = {
        "format": RNG_FORMAT,
        "version": STATE_VERSION,
        "python": {"version": py_version, "state": list(py_internal), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": np.asarray(np_keys).tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "cuda_devices": len(cuda_states),
    }
    return tensors, meta


def restore_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices both sides have (with a warning
    when the device count changed, e.g. after an elastic resize)."""
    _check_format(meta, RNG_FORMAT, "RNG state")
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npm = meta["numpy"]
    keys = np.asarray(npm["keys"], dtype=np.uint32)
    np.random.set_state((npm["name"], keys, npm["pos"], npm["has_gauss"], npm["cached_gaussian"]))
    if "torch.cpu" not in tensors:
        raise ValueError("RNG tensors have no 'torch.cpu' entry")
    torch.set_rng_state(tensors["torch.cpu"].detach().to("cpu", torch.uint8).contiguous())
    saved = int(meta.get("cuda_devices", 0))
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved != have and saved:
        warnings.warn(
            f"RNG state was captured on {saved} CUDA device(s) but {have} are visible; restoring {min(saved, have)}",
            stacklevel=2,
        )
    for i in range(min(saved, have)):
        torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"].detach().to("cpu", torch.uint8), i)


# -- LR scheduler --------------------------------------------------------------------------------------------------


def scheduler_state(scheduler: Any) -> Any:
    """LR scheduler state_dict as strict JSON (tuples, inf such as ReduceLROnPlateau's best, int keys kept)."""
    return to_jsonable(scheduler.state_dict())


def restore_scheduler_state(scheduler: Any, state: Any) -> None:
    """Inverse of scheduler_state."""
    scheduler.load_state_dict(from_jsonable(state))


# -- writing a (tensors, meta) pair as two checkpoint files --------------------------------------------------------


def write_state(writer: CheckpointWriter, stem: str, tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
    """Save `stem`.safetensors + `stem`.json, e.g. write_state(w, "rank0/optim", *flatten_optimizer_state(sd))."""
    writer.save_tensors(f"{stem}.safetensors", tensors)
    writer.save_json(f"{stem}.json", meta)


def read_state(ckpt_dir: Any, stem: str, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of write_state: (tensors, meta) ready for unflatten_optimizer_state / restore_rng_state."""
    return load_tensors(ckpt_dir, f"{stem}.safetensors", device=device), load_json(ckpt_dir, f"{stem}.json")
