"""Hugging Face export and import: Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE model directories.

Our parameter names equal transformers' in-memory names, so import and export are renames (and stacking or
splitting of the per-expert weights), never a numerical conversion: a round trip gives the same tensors bit for bit.
What each architecture computes beyond Mixtral is a model option (query/key norms, q/k/v biases, a gated shared
expert, top-k renormalisation), and an imported model remembers its architecture (`hf_architecture`) so that its
export is the same architecture again. Options no architecture can express (routing bias, capacity dropping) export
in our own format: config.json with model_type "moe-platform" and the same safetensors names, which our serving
engine loads. Weights are safetensors only; nothing is ever unpickled or imported through trust_remote_code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from moe_platform.model.args import ModelArgs

log = logging.getLogger(__name__)

MODEL_ARGS_FILE = "moe_platform_args.json"
WEIGHTS_FILE = "model.safetensors"
_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Per-expert on-disk names: Mixtral's w1 (gate) / w3 (up) / w2 (down), the Qwen/OLMoE family's gate/up/down_proj.
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                        r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A Hugging Face MoE architecture: its config.json <-> our ModelArgs, and its on-disk tensor names."""

    name: str  # config.json "architectures"
    model_type: str
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) weight names
    moe_module: str  # "block_sparse_moe" (Mixtral) or "mlp"
    requires: tuple[tuple[str, object], ...]  # the option values its own code computes with
    shared_module: str = ""  # the shared expert's module name on disk ("shared_expert" for Qwen2-MoE)
    default_head_dim: bool = False  # its config has no head size of its own: heads are dim / n_heads

    def expresses(self, args: ModelArgs) -> str | None:
        """Why `args` cannot be written as this architecture, or None when it can."""
        for key, value in self.requires:
            if getattr(args, key) != value:
                return f"model.{key} = {getattr(args, key)!r} ({self.name} needs {value!r})"
        if args.balancing == "bias":
            return "model.balancing = 'bias' (a routing bias no Hugging Face architecture here has)"
        if args.capacity_factor:
            return "model.capacity_factor > 0 (token dropping)"
        if self.default_head_dim and args.head_dim not in (0, args.dim // args.n_heads):
            return (f"model.head_dim = {args.head_dim} ({self.name}'s heads are dim / n_heads = "
                    f"{args.dim // args.n_heads})")
        return None


_QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")
ARCHITECTURES = {a.name: a for a in (
    Architecture("MixtralForCausalLM", "mixtral", ("w1", "w3", "w2"), "block_sparse_moe",
                 (("qk_norm", "none"), ("attention_bias", False), ("norm_topk_prob", True),
                  ("shared_expert_gate", False), ("n_shared_experts", 0)), default_head_dim=True),
    Architecture("Qwen3MoeForCausalLM", "qwen3_moe", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "head"), ("attention_bias", False), ("shared_expert_gate", False),
                  ("n_shared_experts", 0))),
    Architecture("Qwen2MoeForCausalLM", "qwen2_moe", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "none"), ("attention_bias", True), ("shared_expert_gate", True),
                  ("n_shared_experts", 1)), shared_module="shared_expert"),
    Architecture("OlmoeForCausalLM", "olmoe", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "full"), ("attention_bias", False), ("shared_expert_gate", False),
                  ("n_shared_experts", 0)), default_head_dim=True),
)}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, arch: Architecture) -> dict[str, torch.Tensor]:
    """Our names -> the architecture's on-disk names: stacked experts split per expert, modules renamed."""
    out: dict[str, torch.Tensor] = {}
    inter = args.intermediate_size
    gate_name, up_name, down_name = arch.expert_names
    for name, t in state.items():
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
        if ".mlp.gate." in name:
            name = name.replace(".mlp.gate.", f".{arch.moe_module}.gate.")
        elif ".mlp.shared_experts." in name and arch.shared_module:
            name = name.replace(".mlp.shared_experts.", f".mlp.{arch.shared_module}.")
        out[name] = t.contiguous()
    return out


def hf_config(args: ModelArgs, arch: Architecture, eos_id: int | list[int] = 0) -> dict:
    """config.json of `args` written as `arch`; `eos_id` may list several end-of-text ids (the first also pads)."""
    first = eos_id[0] if isinstance(eos_id, list) else eos_id
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    common = {
        "architectures": [arch.name], "model_type": arch.model_type, "vocab_size": args.vocab_size,
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len, "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_parameters": rope,
        "num_experts_per_tok": args.top_k, "router_aux_loss_coef": args.aux_loss_coef,
        "output_router_logits": False, "attention_dropout": 0.0, "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": first, "eos_token_id": eos_id, "pad_token_id": first, "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch.model_type == "mixtral":
        return {**common, "intermediate_size": args.intermediate_size, "num_local_experts": args.num_experts,
                "router_jitter_noise": 0.0, "sliding_window": None}
    family = {"num_experts": args.num_experts, "norm_topk_prob": args.norm_topk_prob}
    if arch.model_type == "olmoe":
        return {**common, **family, "intermediate_size": args.intermediate_size, "attention_bias": False,
                "clip_qkv": None}
    qwen = {**family, "intermediate_size": args.intermediate_size, "moe_intermediate_size": args.intermediate_size,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None}
    if arch.model_type == "qwen3_moe":
        return {**common, **qwen, "attention_bias": False}
    return {**common, **qwen, "qkv_bias": True,
            "shared_expert_intermediate_size": args.resolved_shared_intermediate_size}


def export_architecture(args: ModelArgs) -> Architecture | None:
    """The architecture an export of `args` is written as: the one it was imported from (`hf_architecture`), else
    Mixtral when the options allow; None means our own format (config.json model_type "moe-platform")."""
    if args.hf_architecture:
        arch = ARCHITECTURES[args.hf_architecture]
        why = arch.expresses(args)
        if why is None:
            return arch
        log.warning("exporting in moe-platform's own format, not %s (imported from it): %s", arch.name, why)
        return None
    mixtral = ARCHITECTURES["MixtralForCausalLM"]
    return mixtral if mixtral.expresses(args) is None else None


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


def _reject(config: dict, arch: Architecture, **unsupported) -> None:
    """A clear error for config values our model does not compute (so an import never silently differs)."""
    for key, ok in unsupported.items():
        value = config.get(key)
        if not ok(value):
            raise ValueError(f"{arch.name} with {key} = {value!r} is not supported (moe-platform imports the "
                             f"default form of this setting)")


def args_from_hf_config(config: dict) -> ModelArgs:
    """config.json of a supported architecture (or of our own format) -> ModelArgs."""
    if config.get("model_type") == "moe-platform":
        return ModelArgs.from_dict({k: v for k, v in config.items() if k not in ("architectures", "model_type",
                                                                                   "torch_dtype")})
    names = config.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None) or _BY_MODEL_TYPE.get(
        config.get("model_type"))
    if arch is None:
        raise ValueError(f"cannot import architecture {names or config.get('model_type')!r}: supported are "
                         f"{supported_architectures()} (and moe-platform's own exports); nothing is imported "
                         f"through trust_remote_code")
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok",
                "intermediate_size" if arch.model_type in ("mixtral", "olmoe") else "moe_intermediate_size"]
    missing = [k for k in required if k not in config]
    if arch.model_type != "mixtral" and "num_experts" not in config and "num_local_experts" not in config:
        missing.append("num_experts")
    if arch.model_type == "mixtral" and "num_local_experts" not in config:
        missing.append("num_local_experts")
    if arch.model_type == "qwen2_moe" and "shared_expert_intermediate_size" not in config:
        missing.append("shared_expert_intermediate_size")
    if missing:
        raise ValueError(f"{arch.name} config.json lacks {missing}: not a complete model config")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    _reject(config, arch, rope_scaling=lambda v: not v or v.get("rope_type", v.get("type")) == "default")
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{arch.name} with rope type {rope.get('rope_type')!r} is not supported (default RoPE only)")
    heads = config["num_attention_heads"]
    kw = dict(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=heads, n_kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim") or 0,
        top_k=config["num_experts_per_tok"], max_seq_len=config.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 1e6))),
        norm_eps=config.get("rms_norm_eps", 1e-5), aux_loss_coef=config.get("router_aux_loss_coef", 0.02),
        tie_word_embeddings=config.get("tie_word_embeddings", False), init_std=config.get("initializer_range", 0.02),
        hf_architecture=arch.name,
    )
    if arch.model_type == "mixtral":
        _reject(config, arch, sliding_window=lambda v: v is None)
        return ModelArgs(**kw, intermediate_size=config["intermediate_size"], num_experts=config["num_local_experts"])
    experts = config.get("num_experts", config.get("num_local_experts"))  # transformers writes either name
    kw.update(num_experts=experts, norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    if arch.model_type == "olmoe":
        _reject(config, arch, clip_qkv=lambda v: v is None, attention_bias=lambda v: not v)
        return ModelArgs(**kw, intermediate_size=config["intermediate_size"], qk_norm="full")
    _reject(config, arch, use_sliding_window=lambda v: not v, decoder_sparse_step=lambda v: v in (None, 1),
            mlp_only_layers=lambda v: not v)
    if arch.model_type == "qwen3_moe":
        _reject(config, arch, attention_bias=lambda v: not v)
        return ModelArgs(**kw, intermediate_size=config["moe_intermediate_size"], qk_norm="head")
    return ModelArgs(**kw, intermediate_size=config["moe_intermediate_size"],  # qwen2_moe
                     attention_bias=bool(config.get("qkv_bias", True)), n_shared_experts=1,
                     shared_intermediate_size=config["shared_expert_intermediate_size"], shared_expert_gate=True)


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
        for name in hf_names:
            m = _HF_EXPERT.match(name)
            if m:
                prefix, e, w = m.groups()
                experts.setdefault((prefix, _ROLE[w]), {})[int(e)] = name
                continue
            ours = name.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.shared_expert.", ".mlp.shared_experts.")
            recipes[ours] = ("plain", name)
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
        first = tuple(self._slice(parts[0][0]).get_shape())
        return (len(parts[0]), 2 * first[0], first[1]) if kind == "gate_up" else (len(parts[0]), *first)

    def read(self, name: str, spec) -> torch.Tensor:
        """This rank's local tensor of `name` under `spec` (a ShardSpec): its boxes, concatenated."""
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
