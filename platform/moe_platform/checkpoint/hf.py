"""Hugging Face export and import: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, DeepSeek-V3/V2 and GLM-4.5 MoE model
directories (the architectures themselves are table rows in checkpoint/hf_arch.py).

Our parameter names equal transformers' in-memory names, so import and export are renames (and stacking or
splitting of the per-expert weights), never a numerical conversion: a round trip gives the same tensors bit for bit.
What each architecture computes beyond Mixtral is a model option (query/key norms, q/k/v biases, a gated shared
expert, top-k renormalisation, latent attention, sigmoid and group-limited routing, dense layers, scaled RoPE), and
an imported model remembers its architecture (`hf_architecture`) so that its export is the same architecture again.
Options no architecture can express (capacity dropping, say) export in our own format: config.json with model_type
"moe-platform" and the same safetensors names, which our serving engine loads. DeepSeek-V3's multi-token-prediction
layer is not part of the causal LM: its tensors are skipped on import (and said so in the log). Weights are
safetensors only; nothing is ever unpickled or imported through trust_remote_code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_platform.checkpoint import fused_experts
from moe_platform.checkpoint.hf_arch import (
    ARCHITECTURES,
    Architecture,
    args_from_hf_config,
    export_architecture,
    hf_config,
    supported_architectures,
)
from moe_platform.model.args import ModelArgs

__all__ = ["ARCHITECTURES", "Architecture", "HFWeights", "args_from_hf_config", "export_architecture", "export_hf",
           "hf_config", "load_hf", "read_model_args", "supported_architectures", "to_hf_state_dict"]

log = logging.getLogger(__name__)

MODEL_ARGS_FILE = "moe_platform_args.json"
WEIGHTS_FILE = "model.safetensors"
_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Per-expert on-disk names: Mixtral's w1 (gate) / w3 (up) / w2 (down), the Qwen/OLMoE family's gate/up/down_proj.
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, arch: Architecture) -> dict[str, torch.Tensor]:
    """Our names -> the architecture's on-disk names: stacked experts split per expert, modules renamed."""
    out: dict[str, torch.Tensor] = {}
    inter = args.intermediate_size
    gate_name, up_name, down_name = arch.expert_names
    for name, t in state.items():
        fused = fused_experts.FUSED_EXPERT.match(name)
        if arch.fused_experts and fused and not fused.group(3) == "_blocks":  # gpt-oss's stacked experts
            out[name] = fused_experts.to_disk(fused.group(2) + (fused.group(3) or ""), t)
            continue
        m = _EXPERTS.match(name)
        if m:
            prefix, kind = m.groups()
            for e in range(t.shape[0]):
                base = f"{prefix}.{arch.moe_module}.experts.{e}"
                if kind == "gate_up_proj":  # (E, 2I, D): the first half is the gate, the second the up projection
                    out[f"{base}.{gate_name}.weight"] = t[e, :inter].contiguous()
                    out[f"{base}.{up_name}.weight"] = t[e, inter:].contiguous()
                else:  # (E, D, I)
                    out[f"{base}.{down_name}.weight"] = t[e].contiguous()
            continue
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if name.endswith(".mlp.gate.expert_bias"):
            name = name.removesuffix("expert_bias") + arch.bias_name
        elif ".mlp.gate." in name:
            name = name.replace(".mlp.gate.", f".{arch.moe_module}.{arch.router_module}.")
        elif ".mlp.shared_experts." in name and arch.shared_module:
            name = name.replace(".mlp.shared_experts.", f".mlp.{arch.shared_module}.")
        out[name] = t.contiguous()
    return out


def export_hf(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None, eos_id: int | list[int] = 0,
              dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face model directory: config.json, model.safetensors, tokenizer files, our model args.
    `eos_id`: the end-of-text id, or several (generation stops at any; the first also pads)."""
    if isinstance(eos_id, list) and len(eos_id) == 1:
        eos_id = eos_id[0]
    first = eos_id[0] if isinstance(eos_id, list) else eos_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in state.items()}
    arch = export_architecture(args)
    if arch is not None:
        tensors = to_hf_state_dict(state, args, arch)
        config = hf_config(args, arch, eos_id)
    else:
        tensors = {k: v.contiguous() for k, v in state.items() if not (k == "lm_head.weight" and
                                                                        args.tie_word_embeddings)}
        config = {"architectures": ["MoEPlatformForCausalLM"], "model_type": "moe-platform", **args.to_dict()}
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": first, "eos_token_id": eos_id, "pad_token_id": first}, indent=2) + "\n")
    (out / MODEL_ARGS_FILE).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        from moe_platform.tokenizer import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists() and name != "generation_config.json":  # written above, with the run's stop ids
                shutil.copyfile(src, out / name)
    return out


def read_model_args(model_dir: str | Path) -> ModelArgs:
    """The model args of a model directory: ours (moe_platform_args.json), else from its config.json."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a model directory: config.json is missing")
    args_file = d / MODEL_ARGS_FILE
    return (ModelArgs.from_dict(json.loads(args_file.read_text())) if args_file.is_file()
            else args_from_hf_config(json.loads((d / "config.json").read_text())))


class HFWeights:
    """A model directory's weights under our names, read lazily: asking for boxes of one of our tensors (a rank's
    tensor/expert/pipeline share, `ShardSpec`) reads only those bytes from the safetensors files (per-expert tensors
    of other ranks' experts and the rows or columns of other tensor-parallel ranks are never read). `bytes_read`
    counts what was read. Works for our exports and every supported Hugging Face architecture, sharded
    (model.safetensors.index.json) or not. Never unpickles."""

    def __init__(self, model_dir: str | Path, args: ModelArgs | None = None):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.args = args or read_model_args(self.dir)
        # gpt-oss's experts are stacked on disk in its own layout (checkpoint/fused_experts.py)
        self.fused = json.loads((self.dir / "config.json").read_text()).get("model_type") == "gpt_oss"
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{self.dir}: model.safetensors.index.json names missing shards {missing[:3]}")
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise FileNotFoundError(f"{self.dir} has no *.safetensors weights (pickled .bin weights are not "
                                        f"loaded)")
            weight_map = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), shard.name))
        self._file_of = weight_map
        self._open = lambda name: safe_open(str(self.dir / name), framework="pt")
        self._handles: dict[str, object] = {}
        self.bytes_read = 0
        self.recipes = self._recipes(list(weight_map))
        self.total_bytes = sum(self._nbytes(n) for n in weight_map)

    def _nbytes(self, hf_name: str) -> int:
        s = self._slice(hf_name)
        return math.prod(s.get_shape()) * _DTYPE_BYTES.get(s.get_dtype(), 4)

    def _recipes(self, hf_names: list[str]) -> dict[str, tuple]:
        """Our name -> ("plain", hf name) | ("gate_up", gate names, up names) | ("down", down names), per expert."""
        recipes: dict[str, tuple] = {}
        experts: dict[tuple[str, str], dict[int, str]] = {}
        extra_layers = set()
        fused: dict[tuple[str, str], dict[str, str]] = {}
        for name in hf_names:
            layer = _LAYER.match(name)
            if layer and int(layer.group(1)) >= self.args.n_layers:  # DeepSeek-V3's multi-token-prediction layer
                extra_layers.add(int(layer.group(1)))
                continue
            m = _HF_EXPERT.match(name)
            if m:
                prefix, e, w = m.groups()
                experts.setdefault((prefix, _ROLE[w]), {})[int(e)] = name
                continue
            f = fused_experts.FUSED_EXPERT.match(name) if self.fused else None
            if f:
                prefix, kind, suffix = f.groups()
                suffix = suffix or ""
                key = kind + ("_bias" if suffix == "_bias" else "")
                fused.setdefault((prefix, key), {})["" if suffix == "_bias" else suffix] = name
                continue
            ours = name.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.shared_expert.", ".mlp.shared_experts.")
            ours = ours.replace(".mlp.router.", ".mlp.gate.")
            ours = ours.replace(".mlp.gate.e_score_correction_bias", ".mlp.gate.expert_bias")
            recipes[ours] = ("plain", name)
        if extra_layers:
            log.info("%s: skipped layers %s beyond num_hidden_layers = %d (a multi-token-prediction module, which the "
                     "causal LM does not use)", self.dir, sorted(extra_layers), self.args.n_layers)
        for prefix in sorted({p for p, _ in experts}):
            by_role = {}
            for role in ("gate", "up", "down"):
                by_index = experts.get((prefix, role), {})
                missing = sorted(set(range(self.args.num_experts)) - set(by_index))
                if missing:
                    raise ValueError(f"{prefix}: experts {missing[:8]} have no {role} projection in the checkpoint")
                by_role[role] = [by_index[e] for e in range(self.args.num_experts)]
            recipes[f"{prefix}.mlp.experts.gate_up_proj"] = ("gate_up", by_role["gate"], by_role["up"])  # (E, 2I, D)
            recipes[f"{prefix}.mlp.experts.down_proj"] = ("down", by_role["down"])  # (E, D, I)
        for (prefix, kind), parts in fused.items():
            if "_blocks" in parts and "_scales" not in parts or "_scales" in parts and "_blocks" not in parts:
                raise ValueError(f"{self.dir}: {prefix}.mlp.experts.{kind} has MXFP4 blocks or scales without the "
                                 f"other half")
            recipes[f"{prefix}.mlp.experts.{kind}"] = fused_experts.recipe(parts, kind)
        if self.args.tie_word_embeddings and "lm_head.weight" not in recipes and "model.embed_tokens.weight" in recipes:
            recipes["lm_head.weight"] = recipes["model.embed_tokens.weight"]
        return recipes

    def _slice(self, hf_name: str):
        file = self._file_of[hf_name]
        if file not in self._handles:
            self._handles[file] = self._open(file).__enter__()
        return self._handles[file].get_slice(hf_name)

    def _read(self, hf_name: str, box: Sequence[tuple[int, int]]) -> torch.Tensor:
        t = self._slice(hf_name)[tuple(slice(a, b) for a, b in box)]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def names(self) -> list[str]:
        return list(self.recipes)

    def has(self, name: str, kind: str = "model") -> bool:
        return kind == "model" and name in self.recipes

    def step(self, name: str) -> None:
        return None

    def box(self, name: str, box: Sequence[tuple[int, int]]) -> torch.Tensor:
        """full[box] of our tensor `name`, reading only what it covers."""
        if name not in self.recipes:
            raise ValueError(f"{self.dir}: no weights for {name!r} (different architecture or config?)")
        kind, *parts = self.recipes[name]
        if kind == "plain":
            return self._read(parts[0], box)
        if kind.startswith(("fused_", "mxfp4_")):
            return fused_experts.read_boxes(kind, parts, [box], self.args.intermediate_size, self._read)
        (e0, e1), rest = box[0], list(box[1:])
        if kind == "down":
            return torch.stack([self._read(parts[0][e], rest) for e in range(e0, e1)])
        inter = self.args.intermediate_size  # gate_up rows: [0, I) the gate, [I, 2I) the up projection
        (r0, r1), cols = rest[0], rest[1:]
        rows = []
        for e in range(e0, e1):
            pieces = []
            if r0 < inter:
                pieces.append(self._read(parts[0][e], [(r0, min(r1, inter)), *cols]))
            if r1 > inter:
                pieces.append(self._read(parts[1][e], [(max(r0, inter) - inter, r1 - inter), *cols]))
            rows.append(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        return torch.stack(rows)

    def shape(self, name: str) -> tuple[int, ...]:
        kind, *parts = self.recipes[name]
        if kind == "plain":
            return tuple(self._slice(parts[0]).get_shape())
        if kind.startswith(("fused_", "mxfp4_")):
            return fused_experts.our_shape(kind, parts, lambda n: tuple(self._slice(n).get_shape()))
        first = tuple(self._slice(parts[0][0]).get_shape())
        return (len(parts[0]), 2 * first[0], first[1]) if kind == "gate_up" else (len(parts[0]), *first)

    def read(self, name: str, spec) -> torch.Tensor:
        """This rank's local tensor of `name` under `spec` (a ShardSpec): its boxes, concatenated."""
        kind, *parts = self.recipes.get(name, ("",))
        if kind.startswith(("fused_", "mxfp4_")) and len(spec.boxes) > 1 and spec.concat_dim == 1:
            return fused_experts.read_boxes(kind, parts, spec.boxes, self.args.intermediate_size,
                                            self._read).contiguous()
        pieces = [self.box(name, b) for b in spec.boxes]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=spec.concat_dim)).contiguous()

    def full(self, name: str, kind: str = "model") -> torch.Tensor:
        return self.box(name, [(0, n) for n in self.shape(name)])

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def load_hf(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a model directory (our export or a supported Hugging Face model) as (model args, our whole state dict).
    Never unpickles. Training reads only each rank's share instead (`HFWeights`)."""
    weights = HFWeights(model_dir)
    try:
        return weights.args, {name: weights.full(name).to(device) for name in weights.names()}
    finally:
        weights.close()
