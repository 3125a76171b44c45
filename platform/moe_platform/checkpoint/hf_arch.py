"""The Hugging Face architectures we import and export, one table row each: how its config.json maps onto our model
options (both ways), its on-disk tensor names, and what it refuses.

Mixtral, Qwen3-MoE, Qwen2-MoE and OLMoE are grouped-query attention with softmax top-k routing; DeepSeek-V3 (also
Kimi-K2 and Moonlight) and DeepSeek-V2 use multi-head latent attention; DeepSeek-V3 and GLM-4.5 route with sigmoid
scores, a correction bias and expert groups; DeepSeek, GLM and Qwen may keep dense MLP layers; gpt-oss has attention
sinks, sliding-window layers, biases everywhere, a clamped SwiGLU and (in its published checkpoints) MXFP4 experts,
which are dequantized on import. Every setting our model
does not compute is an error naming it (and listing what is supported) before anything is read or written, so an
import never silently differs from transformers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from moe_platform.model.args import ModelArgs

log = logging.getLogger(__name__)


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
    bias_name: str = ""  # the routing correction bias on disk ("e_score_correction_bias"); "": it has none
    router_module: str = "gate"  # the router's module name on disk ("router" for gpt-oss)
    fused_experts: bool = False  # experts stored stacked, gate/up interleaved and transposed (gpt-oss)
    any_dense_layers: bool = False  # dense MLP layers anywhere (Qwen's mlp_only_layers); else only the first k
    checks: tuple[Callable[[ModelArgs], str | None], ...] = ()  # what else its code needs of the options

    def expresses(self, args: ModelArgs) -> str | None:
        """Why `args` cannot be written as this architecture, or None when it can."""
        for key, value in self.requires:
            if getattr(args, key) != value:
                return f"model.{key} = {getattr(args, key)!r} ({self.name} needs {value!r})"
        if args.balancing == "bias" and not self.bias_name:
            return f"model.balancing = 'bias' (a routing bias {self.name} does not have)"
        if self.bias_name and args.balancing != "bias":
            return f"model.balancing = {args.balancing!r} ({self.name} routes with its correction bias: 'bias')"
        if args.capacity_factor:
            return "model.capacity_factor > 0 (token dropping)"
        if self.default_head_dim and args.head_dim not in (0, args.dim // args.n_heads):
            return (f"model.head_dim = {args.head_dim} ({self.name}'s heads are dim / n_heads = "
                    f"{args.dim // args.n_heads})")
        dense = sorted(args.dense_layer_ids)
        if dense and not self.any_dense_layers and dense != list(range(len(dense))):
            return f"model.dense_layers = {args.dense_layers!r} ({self.name} has dense layers only before its MoE ones)"
        for check in self.checks:
            if why := check(args):
                return why
        return None


def _shared_expert_sized_like_experts(args: ModelArgs) -> str | None:
    if args.n_shared_experts < 1 or args.resolved_shared_intermediate_size != args.intermediate_size:
        return ("the shared experts must be n_shared_experts >= 1 experts of the routed experts' size "
                "(model.shared_intermediate_size = 0 or intermediate_size)")
    return None


def _no_dense_layers(args: ModelArgs) -> str | None:
    return f"model.dense_layers = {args.dense_layers!r} (no dense layers)" if args.dense_layer_ids else None


_GQA = (("kv_lora_rank", 0), ("rope_interleave", False), ("partial_rotary_factor", 1.0))
# what only gpt-oss has
_NO_OSS = (("attention_sinks", False), ("router_bias", False), ("expert_bias", False), ("expert_activation", "swiglu"),
           ("o_proj_bias", False), ("sliding_layers", ""))
_SOFTMAX_GREEDY = (("scoring_func", "softmax"), ("topk_method", "greedy"), ("routed_scaling_factor", 1.0))
_SIGMOID_GROUPS = (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"))
_QWEN_EXPERTS = ("gate_proj", "up_proj", "down_proj")
ARCHITECTURES = {a.name: a for a in (
    Architecture("MixtralForCausalLM", "mixtral", ("w1", "w3", "w2"), "block_sparse_moe",
                 (("qk_norm", "none"), ("attention_bias", False), ("norm_topk_prob", True),
                  ("shared_expert_gate", False), ("n_shared_experts", 0), *_GQA, *_SOFTMAX_GREEDY, *_NO_OSS),
                 default_head_dim=True, checks=(_no_dense_layers,)),
    Architecture("Qwen3MoeForCausalLM", "qwen3_moe", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "head"), ("attention_bias", False), ("shared_expert_gate", False),
                  ("n_shared_experts", 0), *_GQA, *_SOFTMAX_GREEDY, *_NO_OSS), any_dense_layers=True),
    Architecture("Qwen2MoeForCausalLM", "qwen2_moe", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "none"), ("attention_bias", True), ("shared_expert_gate", True),
                  ("n_shared_experts", 1), *_GQA, *_SOFTMAX_GREEDY, *_NO_OSS), shared_module="shared_expert",
                 any_dense_layers=True),
    Architecture("OlmoeForCausalLM", "olmoe", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "full"), ("attention_bias", False), ("shared_expert_gate", False),
                  ("n_shared_experts", 0), *_GQA, *_SOFTMAX_GREEDY, *_NO_OSS), default_head_dim=True,
                 checks=(_no_dense_layers,)),
    Architecture("DeepseekV3ForCausalLM", "deepseek_v3", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "none"), ("shared_expert_gate", False), ("partial_rotary_factor", 1.0),
                  *_SIGMOID_GROUPS, *_NO_OSS), bias_name="e_score_correction_bias",
                 checks=(lambda a: None if a.mla else "model.kv_lora_rank = 0 (DeepSeek-V3 attends through a "
                                                      "latent: multi-head latent attention)",
                         _shared_expert_sized_like_experts)),
    Architecture("DeepseekV2ForCausalLM", "deepseek_v2", _QWEN_EXPERTS, "mlp",
                 (("qk_norm", "none"), ("shared_expert_gate", False), ("partial_rotary_factor", 1.0),
                  ("rope_interleave", True), ("scoring_func", "softmax"), ("norm_topk_prob", False), *_NO_OSS),
                 checks=(lambda a: None if a.mla else "model.kv_lora_rank = 0 (DeepSeek-V2 attends through a "
                                                      "latent: multi-head latent attention)",
                         lambda a: None if a.topk_method != "noaux_tc" else "model.topk_method = 'noaux_tc' "
                                                                            "(DeepSeek-V2 has greedy and "
                                                                            "group_limited_greedy)",
                         _shared_expert_sized_like_experts)),
    Architecture("Glm4MoeForCausalLM", "glm4_moe", _QWEN_EXPERTS, "mlp",
                 (("shared_expert_gate", False), *_GQA[:2], *_SIGMOID_GROUPS, *_NO_OSS),
                 bias_name="e_score_correction_bias",
                 checks=(lambda a: None if a.qk_norm in ("none", "head") else "model.qk_norm = 'full' (GLM-4.5 "
                                                                               "normalises each head)",
                         _shared_expert_sized_like_experts)),
    Architecture("GptOssForCausalLM", "gpt_oss", ("gate_up_proj", "gate_up_proj", "down_proj"), "mlp",
                 (("qk_norm", "none"), ("shared_expert_gate", False), ("n_shared_experts", 0), *_GQA,
                  *_SOFTMAX_GREEDY, ("norm_topk_prob", True), ("attention_sinks", True), ("router_bias", True),
                  ("expert_bias", True), ("expert_activation", "clamped_swiglu")),
                 router_module="router", fused_experts=True, checks=(
                     _no_dense_layers,
                     lambda a: None if a.o_proj_bias == a.attention_bias else "model.o_proj_bias differs from "
                                                                              "model.attention_bias (gpt-oss has "
                                                                              "one attention_bias for q/k/v/o)")),
)}
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}
MLA_ARCHITECTURES = ("deepseek_v2", "deepseek_v3")
ROPE_TYPES_IMPORTED = ("default", "linear", "yarn")


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


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


# ---- ModelArgs -> config.json ------------------------------------------------------------------------------------
def _rope_parameters(args: ModelArgs) -> dict:
    rope = {"rope_type": args.rope_type, "rope_theta": args.rope_theta}
    if args.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = args.partial_rotary_factor
    if args.rope_type != "default":
        rope["factor"] = args.rope_factor
    if args.rope_type == "yarn":
        rope.update(original_max_position_embeddings=args.rope_original_max_seq_len, beta_fast=args.rope_beta_fast,
                    beta_slow=args.rope_beta_slow, truncate=args.rope_truncate)
        for key, value in (("mscale", args.rope_mscale), ("mscale_all_dim", args.rope_mscale_all_dim),
                           ("attention_factor", args.rope_attention_factor)):
            if value:
                rope[key] = value
    return rope


def hf_config(args: ModelArgs, arch: Architecture, eos_id: int | list[int] = 0) -> dict:
    """config.json of `args` written as `arch`; `eos_id` may list several end-of-text ids (the first also pads)."""
    first = eos_id[0] if isinstance(eos_id, list) else eos_id
    rope = _rope_parameters(args)
    base = {
        "architectures": [arch.name], "model_type": arch.model_type, "vocab_size": args.vocab_size,
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "hidden_act": "silu", "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std, "rms_norm_eps": args.norm_eps, "rope_parameters": rope,
        "num_experts_per_tok": args.top_k, "attention_dropout": 0.0, "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": first, "eos_token_id": eos_id, "pad_token_id": first, "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch.model_type in MLA_ARCHITECTURES or arch.model_type == "glm4_moe":
        return _grouped_routing_config(args, arch, base)
    if arch.model_type == "gpt_oss":
        window = args.sliding_layer_ids
        return {**base, "head_dim": args.resolved_head_dim, "intermediate_size": args.intermediate_size,
                "num_local_experts": args.num_experts, "sliding_window": args.sliding_window or None,
                "layer_types": ["sliding_attention" if i in window else "full_attention" for i in range(args.n_layers)],
                "swiglu_alpha": args.swiglu_alpha, "swiglu_limit": args.swiglu_limit, "attention_bias":
                args.attention_bias, "router_aux_loss_coef": args.aux_loss_coef, "output_router_logits": False}
    common = {**base, "head_dim": args.resolved_head_dim, "rope_theta": args.rope_theta,
              "router_aux_loss_coef": args.aux_loss_coef, "output_router_logits": False}
    if arch.model_type == "mixtral":
        return {**common, "intermediate_size": args.intermediate_size, "num_local_experts": args.num_experts,
                "router_jitter_noise": 0.0, "sliding_window": None}
    family = {"num_experts": args.num_experts, "norm_topk_prob": args.norm_topk_prob}
    if arch.model_type == "olmoe":
        return {**common, **family, "intermediate_size": args.intermediate_size, "attention_bias": False,
                "clip_qkv": None}
    qwen = {**family, "intermediate_size": args.resolved_dense_intermediate_size,
            "moe_intermediate_size": args.intermediate_size, "decoder_sparse_step": 1,
            "mlp_only_layers": sorted(args.dense_layer_ids), "use_sliding_window": False, "sliding_window": None}
    if arch.model_type == "qwen3_moe":
        return {**common, **qwen, "attention_bias": False}
    return {**common, **qwen, "qkv_bias": True,
            "shared_expert_intermediate_size": args.resolved_shared_intermediate_size}


def _grouped_routing_config(args: ModelArgs, arch: Architecture, base: dict) -> dict:
    """DeepSeek-V2/V3 and GLM-4.5: dense first layers, shared experts, grouped routing (and MLA for DeepSeek)."""
    config = {
        **base, "intermediate_size": args.resolved_dense_intermediate_size,
        "moe_intermediate_size": args.intermediate_size, "n_routed_experts": args.num_experts,
        "n_shared_experts": args.n_shared_experts, "routed_scaling_factor": args.routed_scaling_factor,
        "n_group": args.n_group, "topk_group": args.topk_group, "norm_topk_prob": args.norm_topk_prob,
        "first_k_dense_replace": len(args.dense_layer_ids), "attention_bias": args.attention_bias,
        "output_router_logits": False,
    }
    if arch.model_type == "glm4_moe":
        return {**config, "head_dim": args.resolved_head_dim, "use_qk_norm": args.qk_norm == "head",
                "partial_rotary_factor": args.partial_rotary_factor, "num_nextn_predict_layers": 0}
    config.update(kv_lora_rank=args.kv_lora_rank, q_lora_rank=args.q_lora_rank or None,
                  qk_nope_head_dim=args.qk_nope_head_dim, qk_rope_head_dim=args.qk_rope_head_dim,
                  v_head_dim=args.v_head_dim, head_dim=args.qk_rope_head_dim)
    if arch.model_type == "deepseek_v3":
        return {**config, "rope_interleave": args.rope_interleave, "num_nextn_predict_layers": 0}
    return {**config, "topk_method": args.topk_method, "mlp_bias": False}


# ---- config.json -> ModelArgs ------------------------------------------------------------------------------------
def _reject(config: dict, arch: Architecture, **unsupported) -> None:
    """A clear error for config values our model does not compute (so an import never silently differs)."""
    for key, ok in unsupported.items():
        value = config.get(key)
        if not ok(value):
            raise ValueError(f"{arch.name} with {key} = {value!r} is not supported (moe-platform imports the "
                             f"default form of this setting)")


def _rope_args(config: dict, arch: Architecture, partial_allowed: bool) -> dict:
    """The RoPE options of a config.json (rope_parameters, or the older rope_scaling / rope_theta keys)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES_IMPORTED:
        raise ValueError(f"{arch.name} with rope type {kind!r} is not supported: supported are "
                         f"{', '.join(ROPE_TYPES_IMPORTED)}")
    # GLM-4.5's config class rotates half of each head unless told otherwise
    default_partial = 0.5 if arch.model_type == "glm4_moe" else 1.0
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", default_partial))
    if partial is not None and partial != 1.0 and not partial_allowed:
        raise ValueError(f"{arch.name} with partial_rotary_factor = {partial} is not supported (its attention "
                         f"rotates every dim)")
    out = {"rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 1e6))), "rope_type": kind,
           "partial_rotary_factor": float(partial or 1.0)}
    if kind == "linear":
        out["rope_factor"] = float(rope["factor"])
    elif kind == "yarn":
        original = rope.get("original_max_position_embeddings")
        if not original:
            raise ValueError(f"{arch.name} with yarn RoPE needs rope_parameters.original_max_position_embeddings")
        factor = rope.get("factor") or config.get("max_position_embeddings", original) / original
        out.update(rope_factor=float(factor), rope_original_max_seq_len=int(original),
                   rope_beta_fast=float(rope.get("beta_fast") or 32),
                   rope_beta_slow=float(rope.get("beta_slow") or 1), rope_mscale=float(rope.get("mscale") or 0),
                   rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
                   rope_attention_factor=float(rope.get("attention_factor") or 0),
                   rope_truncate=bool(rope.get("truncate", True)))
    return out


def _find_architecture(config: dict) -> Architecture:
    names = config.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None) or _BY_MODEL_TYPE.get(
        config.get("model_type"))
    if arch is None:
        raise ValueError(f"cannot import architecture {names or config.get('model_type')!r}: supported are "
                         f"{supported_architectures()} (and moe-platform's own exports); nothing is imported "
                         f"through trust_remote_code")
    return arch


def _required_keys(config: dict, arch: Architecture) -> None:
    grouped = arch.model_type in MLA_ARCHITECTURES or arch.model_type == "glm4_moe"
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok",
                "intermediate_size" if arch.model_type in ("mixtral", "olmoe", "gpt_oss") else "moe_intermediate_size"]
    if arch.model_type == "gpt_oss":
        required += ["num_local_experts"]
    if grouped:
        required += ["intermediate_size", "n_routed_experts"]
    if arch.model_type in MLA_ARCHITECTURES:
        required += ["kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"]
    missing = [k for k in required if k not in config]
    if arch.model_type in ("qwen3_moe", "qwen2_moe", "olmoe") and "num_experts" not in config \
            and "num_local_experts" not in config:
        missing.append("num_experts")
    if arch.model_type == "mixtral" and "num_local_experts" not in config:
        missing.append("num_local_experts")
    if arch.model_type == "qwen2_moe" and "shared_expert_intermediate_size" not in config:
        missing.append("shared_expert_intermediate_size")
    if missing:
        raise ValueError(f"{arch.name} config.json lacks {missing}: not a complete model config")


def args_from_hf_config(config: dict) -> ModelArgs:
    """config.json of a supported architecture (or of our own format) -> ModelArgs."""
    if config.get("model_type") == "moe-platform":
        return ModelArgs.from_dict({k: v for k, v in config.items() if k not in ("architectures", "model_type",
                                                                                   "torch_dtype")})
    arch = _find_architecture(config)
    _required_keys(config, arch)
    # quantized checkpoints (DeepSeek-V3's fp8 blocks, say) are refused: dequantize to bf16 first; gpt-oss's MXFP4
    # experts are dequantized on import
    _reject(config, arch, hidden_act=lambda v: v in (None, "silu"),
            quantization_config=lambda v: not v or (arch.model_type == "gpt_oss" and v.get("quant_method") == "mxfp4"))
    heads = config["num_attention_heads"]
    kw = dict(
        vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        n_heads=heads, n_kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim") or 0,
        top_k=config["num_experts_per_tok"], max_seq_len=config.get("max_position_embeddings", 4096),
        norm_eps=config.get("rms_norm_eps", 1e-5), aux_loss_coef=config.get("router_aux_loss_coef", 0.02),
        tie_word_embeddings=config.get("tie_word_embeddings", False), init_std=config.get("initializer_range", 0.02),
        hf_architecture=arch.name, **_rope_args(config, arch, partial_allowed=arch.model_type == "glm4_moe"),
    )
    if arch.model_type in MLA_ARCHITECTURES or arch.model_type == "glm4_moe":
        return _grouped_routing_args(config, arch, kw)
    if arch.model_type == "gpt_oss":
        return _gpt_oss_args(config, arch, kw)
    if arch.model_type == "mixtral":
        _reject(config, arch, sliding_window=lambda v: v is None)
        return ModelArgs(**kw, intermediate_size=config["intermediate_size"], num_experts=config["num_local_experts"])
    experts = config.get("num_experts", config.get("num_local_experts"))  # transformers writes either name
    kw.update(num_experts=experts, norm_topk_prob=bool(config.get("norm_topk_prob", False)))
    if arch.model_type == "olmoe":
        _reject(config, arch, clip_qkv=lambda v: v is None, attention_bias=lambda v: not v)
        return ModelArgs(**kw, intermediate_size=config["intermediate_size"], qk_norm="full")
    _reject(config, arch, use_sliding_window=lambda v: not v,
            decoder_sparse_step=lambda v: v is None or (isinstance(v, int) and v >= 1))
    step = config.get("decoder_sparse_step") or 1
    only = set(config.get("mlp_only_layers") or [])
    dense = [i for i in range(kw["n_layers"]) if i in only or (i + 1) % step != 0]
    kw.update(dense_layers=",".join(map(str, dense)), dense_intermediate_size=config.get("intermediate_size", 0)
              if dense else 0)
    if arch.model_type == "qwen3_moe":
        _reject(config, arch, attention_bias=lambda v: not v)
        return ModelArgs(**kw, intermediate_size=config["moe_intermediate_size"], qk_norm="head")
    return ModelArgs(**kw, intermediate_size=config["moe_intermediate_size"],  # qwen2_moe
                     attention_bias=bool(config.get("qkv_bias", True)), n_shared_experts=1,
                     shared_intermediate_size=config["shared_expert_intermediate_size"], shared_expert_gate=True)


def _grouped_routing_args(config: dict, arch: Architecture, kw: dict) -> ModelArgs:
    """DeepSeek-V2/V3 and GLM-4.5 config.json -> ModelArgs."""
    _reject(config, arch, sliding_window=lambda v: v is None, use_sliding_window=lambda v: not v,
            moe_layer_freq=lambda v: v in (None, 1), mlp_bias=lambda v: not v)
    first_dense = config.get("first_k_dense_replace") or 0
    kw.update(
        intermediate_size=config["moe_intermediate_size"], dense_intermediate_size=config["intermediate_size"],
        num_experts=config["n_routed_experts"], n_shared_experts=config.get("n_shared_experts") or 0,
        routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
        n_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1,
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        dense_layers=",".join(str(i) for i in range(min(first_dense, kw["n_layers"]))),
        attention_bias=bool(config.get("attention_bias", False)),
    )
    if arch.model_type == "glm4_moe":
        return ModelArgs(**kw, qk_norm="head" if config.get("use_qk_norm") else "none", scoring_func="sigmoid",
                         topk_method="noaux_tc", balancing="bias")
    kw.update(n_kv_heads=kw["n_heads"], head_dim=0, kv_lora_rank=config["kv_lora_rank"],
              q_lora_rank=config.get("q_lora_rank") or 0, qk_nope_head_dim=config["qk_nope_head_dim"],
              qk_rope_head_dim=config["qk_rope_head_dim"], v_head_dim=config["v_head_dim"])
    if arch.model_type == "deepseek_v3":
        # transformers' DeepSeek-V3 always scores with a sigmoid and ranks groups by their two best experts
        _reject(config, arch, scoring_func=lambda v: v in (None, "sigmoid"), topk_method=lambda v: v in (None,
                                                                                                       "noaux_tc"))
        return ModelArgs(**kw, scoring_func="sigmoid", topk_method="noaux_tc", balancing="bias",
                         rope_interleave=bool(config.get("rope_interleave", True)))
    method = config.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"DeepseekV2ForCausalLM with topk_method = {method!r} is not supported: supported are "
                         f"greedy, group_limited_greedy")
    if kw["norm_topk_prob"]:
        raise ValueError("DeepseekV2ForCausalLM with norm_topk_prob = True is not supported: transformers' "
                         "DeepSeek-V2 never renormalises its routing weights, and moe-platform computes what it does")
    _reject(config, arch, scoring_func=lambda v: v in (None, "softmax"))
    kw["aux_loss_coef"] = float(config.get("aux_loss_alpha", kw["aux_loss_coef"]))
    return ModelArgs(**kw, scoring_func="softmax", topk_method=method, rope_interleave=True)


def _gpt_oss_args(config: dict, arch: Architecture, kw: dict) -> ModelArgs:
    """gpt-oss config.json -> ModelArgs: q/k/v/o biases, attention sinks, sliding-window layers (`layer_types`),
    softmax over the top-k router logits (with their bias), biased experts with the clamped SwiGLU."""
    types = config.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                          for i in range(kw["n_layers"])]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != kw["n_layers"]:
        raise ValueError(f"GptOssForCausalLM with layer_types {types!r} is not supported: one of sliding_attention, "
                         f"full_attention per layer")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = config.get("sliding_window") or 0
    if sliding and not window:
        raise ValueError("GptOssForCausalLM has sliding_attention layers but no sliding_window")
    bias = bool(config.get("attention_bias", True))
    kw["aux_loss_coef"] = config.get("router_aux_loss_coef", 0.001)
    return ModelArgs(**kw, intermediate_size=config["intermediate_size"], num_experts=config["num_local_experts"],
                     attention_bias=bias, o_proj_bias=bias, attention_sinks=True, sliding_window=window,
                     sliding_layers=",".join(map(str, sliding)), router_bias=True, expert_bias=True,
                     expert_activation="clamped_swiglu", swiglu_alpha=float(config.get("swiglu_alpha", 1.702)),
                     swiglu_limit=float(config.get("swiglu_limit", 7.0)), norm_topk_prob=True)
