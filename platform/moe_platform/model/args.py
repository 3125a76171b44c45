"""Model hyper-parameters: one dataclass, saved with every checkpoint and export so a model rebuilds from its files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moe_platform.checks import requirer

BALANCING_METHODS = ("aux_loss", "bias", "none")
QK_NORMS = ("none", "head", "full")


@dataclass
class ModelArgs:
    vocab_size: int = field(default=0, metadata={"doc": "vocabulary size; 0 takes the tokenizer's size"})
    dim: int = field(default=256, metadata={"doc": "hidden size of the residual stream"})
    n_layers: int = field(default=4, metadata={"doc": "number of transformer blocks"})
    n_heads: int = field(default=8, metadata={"doc": "attention query heads"})
    n_kv_heads: int = field(default=4, metadata={"doc": "key/value heads (grouped-query attention); divides n_heads"})
    head_dim: int = field(default=0, metadata={"doc": "size of one attention head; 0 means dim // n_heads"})
    intermediate_size: int = field(default=512, metadata={"doc": "hidden size of each routed SwiGLU expert"})
    num_experts: int = field(default=16, metadata={"doc": "routed experts per MoE layer"})
    top_k: int = field(default=2, metadata={"doc": "experts each token is routed to"})
    n_shared_experts: int = field(default=0, metadata={"doc": "always-active shared experts (DeepSeek style)"})
    shared_intermediate_size: int = field(
        default=0, metadata={"doc": "hidden size of each shared expert; 0 means intermediate_size"}
    )
    max_seq_len: int = field(default=2048, metadata={"doc": "longest sequence (RoPE table, KV cache bound)"})
    rope_theta: float = field(default=1_000_000.0, metadata={"doc": "RoPE base frequency"})
    norm_eps: float = field(default=1e-5, metadata={"doc": "RMSNorm epsilon"})
    balancing: str = field(
        default="aux_loss",
        metadata={"doc": "load balancing: aux_loss (Switch/Mixtral), bias (DeepSeek-V3 aux-loss-free) or none"},
    )
    aux_loss_coef: float = field(default=0.02, metadata={"doc": "weight of the load-balancing auxiliary loss"})
    z_loss_coef: float = field(default=0.0, metadata={"doc": "weight of the router z-loss (0 disables it)"})
    bias_update_rate: float = field(
        default=1e-3, metadata={"doc": "step size of the aux-loss-free routing-bias update (balancing='bias')"}
    )
    capacity_factor: float = field(
        default=0.0, metadata={"doc": "expert capacity as a multiple of the even share; 0 means dropless"}
    )
    tie_word_embeddings: bool = field(default=False, metadata={"doc": "share input embedding and output head"})
    qk_norm: str = field(
        default="none",
        metadata={"doc": "RMSNorm of queries and keys before RoPE: none, head (each head, Qwen3-MoE) or full (the "
                         "whole projection, OLMoE)"},
    )
    attention_bias: bool = field(default=False, metadata={"doc": "bias on the q/k/v projections (Qwen2-MoE)"})
    norm_topk_prob: bool = field(
        default=True, metadata={"doc": "renormalise the top-k routing weights to sum to 1 (Mixtral, Qwen3-MoE)"}
    )
    shared_expert_gate: bool = field(
        default=False, metadata={"doc": "scale the shared experts' output by a per-token sigmoid gate (Qwen2-MoE)"}
    )
    hf_architecture: str = field(
        default="",
        metadata={"doc": "the Hugging Face architecture an imported model exports back to; empty: Mixtral when "
                         "the options allow, else our own format"},
    )
    init_std: float = field(default=0.02, metadata={"doc": "standard deviation of the weight initialisation"})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def resolved_shared_intermediate_size(self) -> int:
        return self.shared_intermediate_size or self.intermediate_size

    def validate(self) -> None:
        need = requirer("model config")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "num_experts", "top_k",
                     "max_seq_len"):
            need(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        need(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        need(self.head_dim >= 0, f"model.head_dim must be >= 0, got {self.head_dim}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        need(self.head_dim > 0 or self.dim % self.n_heads == 0,
             f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}) unless head_dim is set")
        need(self.resolved_head_dim % 2 == 0, f"head dim must be even for RoPE, got {self.resolved_head_dim}")
        need(self.top_k <= self.num_experts,
             f"model.top_k ({self.top_k}) must be <= model.num_experts ({self.num_experts})")
        need(self.balancing in BALANCING_METHODS,
             f"model.balancing must be one of {BALANCING_METHODS}, got {self.balancing!r}")
        need(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(self.capacity_factor >= 0, f"model.capacity_factor must be >= 0, got {self.capacity_factor}")
        need(self.qk_norm in QK_NORMS, f"model.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        need(not self.shared_expert_gate or self.n_shared_experts > 0,
             "model.shared_expert_gate needs shared experts (model.n_shared_experts > 0)")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "rope_theta", "norm_eps", "init_std"):
            need(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model args {unknown}; known: {sorted(known)}")
        return cls(**d)

    def num_params(self) -> dict[str, int]:
        """Total and per-token-active parameter counts (embeddings included once each)."""
        hd = self.resolved_head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += hd * (self.n_heads + 2 * self.n_kv_heads) if self.attention_bias else 0
        attn += {"none": 0, "head": 2 * hd, "full": hd * (self.n_heads + self.n_kv_heads)}[self.qk_norm]
        expert = 3 * self.dim * self.intermediate_size
        shared = 3 * self.dim * self.resolved_shared_intermediate_size * self.n_shared_experts
        router = self.dim * self.num_experts + (self.dim if self.shared_expert_gate else 0)
        norms = 2 * self.dim
        per_layer_total = attn + expert * self.num_experts + shared + router + norms
        per_layer_active = attn + expert * self.top_k + shared + router + norms
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer_total + emb + head + self.dim
        active = self.n_layers * per_layer_active + emb + head + self.dim
        return {"total": total, "active": active}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6 x active non-embedding matmul params + attention), as in the PaLM MFU formula."""
        p = self.num_params()
        non_emb_active = p["active"] - self.vocab_size * self.dim  # the embedding lookup is not a matmul
        attn = 12 * self.n_layers * self.n_heads * self.resolved_head_dim * seq_len / 2  # causal: half the scores
        return 6 * non_emb_active + attn
