"""Hugging Face export and import.

Our parameter names equal transformers' in-memory Mixtral names, so export is a rename to Mixtral's on-disk layout
(per-expert w1/w3/w2 under block_sparse_moe, which every Mixtral loader reads), not a numerical conversion.
Options that Mixtral cannot express (shared experts, routing bias, capacity dropping) export in our own format:
config.json with model_type "moe-platform" and the same safetensors names, which our serving engine loads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_platform.model.args import ModelArgs

MODEL_ARGS_FILE = "moe_platform_args.json"
WEIGHTS_FILE = "model.safetensors"
_EXPERTS = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")


def to_mixtral_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our names -> Mixtral's on-disk names: split stacked experts, `.mlp.` -> `.block_sparse_moe.`."""
    out: dict[str, torch.Tensor] = {}
    inter = args.intermediate_size
    for name, t in state.items():
        m = _EXPERTS.match(name)
        if m:
            prefix, kind = m.groups()
            for e in range(t.shape[0]):
                base = f"{prefix}.block_sparse_moe.experts.{e}"
                if kind == "gate_up_proj":  # (E, 2I, D): first half is the gate (w1), second the up projection (w3)
                    out[f"{base}.w1.weight"] = t[e, :inter].contiguous()
                    out[f"{base}.w3.weight"] = t[e, inter:].contiguous()
                else:  # (E, D, I)
                    out[f"{base}.w2.weight"] = t[e].contiguous()
        elif ".mlp.gate.weight" in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t.contiguous()
        elif name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        else:
            out[name] = t.contiguous()
    return out


def from_mixtral_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Mixtral's on-disk names (or transformers-5 fused names) -> ours."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        m = _HF_EXPERT.match(name)
        if m:
            prefix, e, w = m.groups()
            experts.setdefault((prefix, w), {})[int(e)] = t
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for (prefix, w), by_index in list(experts.items()):
        if w == "w3":
            continue
        missing = sorted(set(range(args.num_experts)) - set(by_index))
        if missing:
            raise ValueError(f"{prefix}: experts {missing} have no {w} weight in the checkpoint")
        stacked = torch.stack([by_index[e] for e in range(args.num_experts)])
        if w == "w1":
            up = torch.stack([experts[(prefix, "w3")][e] for e in range(args.num_experts)])
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stacked, up], dim=1)  # (E, 2I, D)
        else:
            out[f"{prefix}.mlp.experts.down_proj"] = stacked
    if args.tie_word_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def mixtral_config(args: ModelArgs, eos_id: int = 0) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "num_experts_per_tok": args.top_k,
        "num_local_experts": args.num_experts,
        "router_aux_loss_coef": args.aux_loss_coef,
        "output_router_logits": False,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def export_hf(state: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None, eos_id: int = 0, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face model directory: config.json, model.safetensors, tokenizer files, our model args."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in state.items()}
    if args.is_mixtral_compatible:
        tensors = to_mixtral_state_dict(state, args)
        config = mixtral_config(args, eos_id)
    else:
        tensors = {k: v.contiguous() for k, v in state.items() if not (k == "lm_head.weight" and
                                                                        args.tie_word_embeddings)}
        config = {"architectures": ["MoEPlatformForCausalLM"], "model_type": "moe-platform", **args.to_dict()}
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}, indent=2) + "\n")
    (out / MODEL_ARGS_FILE).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    if tokenizer_dir is not None:
        from moe_platform.tokenizer import TOKENIZER_FILES

        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copyfile(src, out / name)
    return out


def args_from_hf_config(config: dict) -> ModelArgs:
    if config.get("model_type") == "moe-platform":
        return ModelArgs.from_dict({k: v for k, v in config.items() if k not in ("architectures", "model_type",
                                                                                   "torch_dtype")})
    if config.get("model_type") != "mixtral":
        raise ValueError(f"cannot import model_type {config.get('model_type')!r}: only 'mixtral' and "
                         f"'moe-platform' directories are supported")
    rope = config.get("rope_parameters") or {}
    return ModelArgs(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"], n_kv_heads=config.get("num_key_value_heads") or
        config["num_attention_heads"], head_dim=config.get("head_dim") or 0,
        intermediate_size=config["intermediate_size"], num_experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"], max_seq_len=config.get("max_position_embeddings", 4096),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 1e6))),
        norm_eps=config.get("rms_norm_eps", 1e-5), aux_loss_coef=config.get("router_aux_loss_coef", 0.02),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        init_std=config.get("initializer_range", 0.02),
    )


def load_hf(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a model directory (our export or a Mixtral checkpoint) as (model args, our state dict). Never unpickles."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a model directory: config.json is missing")
    args_file = d / MODEL_ARGS_FILE
    args = (ModelArgs.from_dict(json.loads(args_file.read_text())) if args_file.is_file()
            else args_from_hf_config(json.loads((d / "config.json").read_text())))
    shards = sorted(d.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{d} has no *.safetensors weights (pickled .bin weights are not loaded)")
    raw: dict[str, torch.Tensor] = {}
    for shard in shards:
        raw.update(load_file(str(shard), device=str(device)))
    return args, from_mixtral_state_dict(raw, args)
