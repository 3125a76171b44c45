"""Model hyper-parameters: one dataclass, saved with every checkpoint and export so a model rebuilds from its files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moe_platform.checks import requirer

BALANCING_METHODS = ("aux_loss", "bias", "none")
QK_NORMS = ("none", "head", "full")
SCORING_FUNCS = ("softmax", "sigmoid")
# greedy: top-k over every expert; group_limited_greedy (DeepSeek-V2): the topk_group groups with the highest single
# score, then top-k inside them; noaux_tc (DeepSeek-V3, GLM-4.5): the groups with the highest sum of their two best
# (bias-corrected) scores, then top-k inside them.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "linear", "yarn")
# swiglu: silu(gate) * up; clamped_swiglu (gpt-oss): gate clamped above and up on both sides at swiglu_limit, then
# (up + 1) * gate * sigmoid(swiglu_alpha * gate)
EXPERT_ACTIVATIONS = ("swiglu", "clamped_swiglu")


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
    o_proj_bias: bool = field(default=False, metadata={"doc": "bias on the attention output projection (gpt-oss)"})
    attention_sinks: bool = field(
        default=False, metadata={"doc": "a learned sink logit per head in the attention softmax, which takes "
                                        "probability from every key without a value (gpt-oss)"})
    sliding_window: int = field(
        default=0, metadata={"doc": "keys a query of a sliding-window layer sees: itself and the window - 1 before"})
    sliding_layers: str = field(
        default="", metadata={"doc": "comma-separated indices of the sliding-window layers (gpt-oss: every other)"})
    router_bias: bool = field(default=False, metadata={"doc": "a learned bias in the router's logits (gpt-oss)"})
    expert_bias: bool = field(
        default=False, metadata={"doc": "biases on the routed experts' gate/up and down projections (gpt-oss)"})
    expert_activation: str = field(
        default="swiglu", metadata={"doc": "the routed experts' activation: swiglu or clamped_swiglu (gpt-oss)"})
    swiglu_alpha: float = field(default=1.702, metadata={"doc": "clamped_swiglu: the sigmoid's gain"})
    swiglu_limit: float = field(default=7.0, metadata={"doc": "clamped_swiglu: where gate and up are clamped"})
    norm_topk_prob: bool = field(
        default=True, metadata={"doc": "renormalise the top-k routing weights to sum to 1 (Mixtral, Qwen3-MoE)"}
    )
    shared_expert_gate: bool = field(
        default=False, metadata={"doc": "scale the shared experts' output by a per-token sigmoid gate (Qwen2-MoE)"}
    )
    scoring_func: str = field(
        default="softmax", metadata={"doc": "router scores: softmax over the experts or an independent sigmoid per "
                                            "expert (DeepSeek-V3, GLM-4.5)"})
    topk_method: str = field(
        default="greedy", metadata={"doc": "expert selection: greedy, group_limited_greedy (DeepSeek-V2) or noaux_tc "
                                           "(DeepSeek-V3: groups ranked by their two best scores)"})
    n_group: int = field(default=1, metadata={"doc": "expert groups for group-limited selection (divides num_experts)"})
    topk_group: int = field(default=1, metadata={"doc": "groups a token may pick its experts from"})
    routed_scaling_factor: float = field(
        default=1.0, metadata={"doc": "the routed experts' mixing weights are multiplied by this (DeepSeek)"})
    dense_layers: str = field(
        default="", metadata={"doc": "comma-separated indices of layers with a dense SwiGLU MLP instead of the MoE "
                                     "(DeepSeek's and GLM's first_k_dense_replace, Qwen's mlp_only_layers)"})
    dense_intermediate_size: int = field(
        default=0, metadata={"doc": "hidden size of the dense layers' MLP; 0 means intermediate_size"})
    kv_lora_rank: int = field(
        default=0, metadata={"doc": "> 0: multi-head latent attention (DeepSeek-V2/V3): keys and values come from a "
                                    "latent of this size, which is all the KV cache stores; 0: grouped-query "
                                    "attention"})
    q_lora_rank: int = field(
        default=0, metadata={"doc": "MLA: queries through a low-rank latent of this size with its own norm; 0: one "
                                    "q_proj"})
    qk_nope_head_dim: int = field(default=0, metadata={"doc": "MLA: per-head query/key dims without position"})
    qk_rope_head_dim: int = field(
        default=0, metadata={"doc": "MLA: per-head query/key dims with RoPE (the key part is shared by all heads)"})
    v_head_dim: int = field(default=0, metadata={"doc": "MLA: per-head value dims"})
    rope_interleave: bool = field(
        default=False, metadata={"doc": "RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek) instead of "
                                        "the two halves of the rotary dims"})
    partial_rotary_factor: float = field(
        default=1.0, metadata={"doc": "fraction of each head's dims that RoPE rotates (the first ones; GLM: 0.5)"})
    rope_type: str = field(default="default", metadata={"doc": "RoPE scaling: default, linear or yarn"})
    rope_factor: float = field(default=1.0, metadata={"doc": "linear/yarn: the context extension factor"})
    rope_original_max_seq_len: int = field(
        default=0, metadata={"doc": "yarn: the context length the model was pretrained with"})
    rope_beta_fast: float = field(default=32.0, metadata={"doc": "yarn: rotations where extrapolation ends"})
    rope_beta_slow: float = field(default=1.0, metadata={"doc": "yarn: rotations where interpolation starts"})
    rope_mscale: float = field(default=0.0, metadata={"doc": "yarn: mscale of the attention factor (0: unset)"})
    rope_mscale_all_dim: float = field(
        default=0.0, metadata={"doc": "yarn: mscale_all_dim (0: unset); MLA also scales its softmax by its square"})
    rope_attention_factor: float = field(
        default=0.0, metadata={"doc": "yarn: factor on cos/sin; 0 derives it from rope_factor and the mscales"})
    rope_truncate: bool = field(default=True, metadata={"doc": "yarn: round the correction range to whole dims"})
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

    @property
    def resolved_dense_intermediate_size(self) -> int:
        return self.dense_intermediate_size or self.intermediate_size

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3) instead of grouped-query attention."""
        return self.kv_lora_rank > 0

    @property
    def dense_layer_ids(self) -> frozenset[int]:
        """The layers with a dense MLP (`dense_layers`); every other layer is an MoE layer."""
        return _layer_ids(self.dense_layers)

    @property
    def sliding_layer_ids(self) -> frozenset[int]:
        """The sliding-window layers (`sliding_layers`); the others attend every earlier key."""
        return _layer_ids(self.sliding_layers)

    def window_of(self, layer: int) -> int:
        """Keys a query of `layer` may see (0: all of them)."""
        return self.sliding_window if layer in self.sliding_layer_ids else 0

    @property
    def moe_layer_ids(self) -> list[int]:
        """The MoE layers' indices, in order."""
        return [i for i in range(self.n_layers) if i not in self.dense_layer_ids]

    @property
    def qk_head_dim(self) -> int:
        """Size of one query/key head: MLA's nope + rope dims, else the head dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.mla else self.resolved_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.mla else self.resolved_head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the expanded attention (MLA expands its latent into one key and value per head)."""
        return self.n_heads if self.mla else self.n_kv_heads

    @property
    def rope_dim(self) -> int:
        """The dims of each head that RoPE rotates."""
        return self.qk_rope_head_dim if self.mla else int(self.resolved_head_dim * self.partial_rotary_factor)

    def validate(self) -> None:
        need = requirer("model config")

        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "num_experts", "top_k",
                     "max_seq_len"):
            need(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        need(self.vocab_size >= 0, f"model.vocab_size must be >= 0, got {self.vocab_size}")
        need(self.head_dim >= 0, f"model.head_dim must be >= 0, got {self.head_dim}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})")
        need(self.mla or self.head_dim > 0 or self.dim % self.n_heads == 0,
             f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}) unless head_dim is set")
        need(self.top_k <= self.num_experts,
             f"model.top_k ({self.top_k}) must be <= model.num_experts ({self.num_experts})")
        need(self.balancing in BALANCING_METHODS,
             f"model.balancing must be one of {BALANCING_METHODS}, got {self.balancing!r}")
        need(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(self.capacity_factor >= 0, f"model.capacity_factor must be >= 0, got {self.capacity_factor}")
        need(self.qk_norm in QK_NORMS, f"model.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        need(not self.shared_expert_gate or self.n_shared_experts > 0,
             "model.shared_expert_gate needs shared experts (model.n_shared_experts > 0)")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "rope_theta", "norm_eps", "init_std",
                     "routed_scaling_factor", "dense_intermediate_size", "q_lora_rank", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_mscale", "rope_mscale_all_dim",
                     "rope_attention_factor", "rope_original_max_seq_len"):
            need(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}")
        self._validate_routing(need)
        self._validate_attention(need)
        need(self.expert_activation in EXPERT_ACTIVATIONS,
             f"model.expert_activation must be one of {EXPERT_ACTIVATIONS}, got {self.expert_activation!r}")
        need(self.swiglu_limit > 0, f"model.swiglu_limit must be > 0, got {self.swiglu_limit}")

    def _validate_routing(self, need) -> None:
        need(self.scoring_func in SCORING_FUNCS,
             f"model.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        need(self.topk_method in TOPK_METHODS,
             f"model.topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        need(self.n_group >= 1 and self.num_experts % self.n_group == 0,
             f"model.n_group ({self.n_group}) must be >= 1 and divide model.num_experts ({self.num_experts})")
        need(1 <= self.topk_group <= self.n_group,
             f"model.topk_group ({self.topk_group}) must be between 1 and model.n_group ({self.n_group})")
        if self.topk_method != "greedy":
            per_group = self.num_experts // self.n_group
            need(self.top_k <= self.topk_group * per_group,
                 f"model.top_k ({self.top_k}) exceeds the experts of topk_group ({self.topk_group}) groups of "
                 f"{per_group}")
            need(self.topk_method != "noaux_tc" or per_group >= 2,
                 f"model.topk_method = 'noaux_tc' ranks groups by their two best experts: groups need >= 2 experts, "
                 f"got {per_group}")
        self._validate_layer_list(need, "dense_layers")

    def _validate_layer_list(self, need, name: str) -> frozenset[int]:
        """A comma-separated list of layer indices (`dense_layers`, `sliding_layers`), each in [0, n_layers)."""
        try:
            layers = _layer_ids(getattr(self, name))
        except ValueError:
            need(False, f"model.{name} must be comma-separated layer indices, got {getattr(self, name)!r}")
        need(all(0 <= i < self.n_layers for i in layers),
             f"model.{name} {sorted(layers)} must lie in [0, n_layers = {self.n_layers})")
        return layers

    def _validate_attention(self, need) -> None:
        need(self.rope_type in ROPE_TYPES, f"model.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        need(0 < self.partial_rotary_factor <= 1,
             f"model.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rope_dim % 2 == 0 and self.rope_dim > 0, f"the rotary dims must be even and > 0, got {self.rope_dim}")
        if self.rope_type != "default":
            need(self.rope_factor >= 1, f"model.rope_factor must be >= 1 with rope_type {self.rope_type!r}, got "
                                        f"{self.rope_factor}")
        if self.rope_type == "yarn":
            need(self.rope_original_max_seq_len > 0, "model.rope_type = 'yarn' needs model.rope_original_max_seq_len")
        sliding = self._validate_layer_list(need, "sliding_layers")
        need(self.sliding_window >= 0, f"model.sliding_window must be >= 0, got {self.sliding_window}")
        need(not sliding or self.sliding_window > 0, "model.sliding_layers needs model.sliding_window > 0")
        need(not (self.mla and (sliding or self.attention_sinks or self.o_proj_bias)),
             "sliding windows, attention sinks and model.o_proj_bias are options of grouped-query attention, not of "
             "multi-head latent attention (its o_proj bias is model.attention_bias)")
        if self.mla:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"multi-head latent attention (model.kv_lora_rank > 0) needs "
                                              f"model.{name} > 0")
            need(self.qk_norm == "none", "model.qk_norm cannot be combined with multi-head latent attention")
            need(self.partial_rotary_factor == 1, "MLA rotates qk_rope_head_dim dims: leave "
                                                  "model.partial_rotary_factor at 1")
        else:
            need(self.q_lora_rank == 0, "model.q_lora_rank needs multi-head latent attention (model.kv_lora_rank > 0)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model args {unknown}; known: {sorted(known)}")
        return cls(**d)

    def _attention_params(self) -> int:
        if self.mla:
            qk, bias = self.qk_head_dim, self.attention_bias
            q = (self.dim * self.q_lora_rank + self.q_lora_rank * (1 + self.n_heads * qk) + (self.q_lora_rank if bias
                 else 0)) if self.q_lora_rank else self.dim * self.n_heads * qk
            kv_a = self.kv_lora_rank + self.qk_rope_head_dim
            kv = self.dim * kv_a + (kv_a if bias else 0) + self.kv_lora_rank
            kv += self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            out = self.n_heads * self.v_head_dim * self.dim + (self.dim if bias else 0)
            return q + kv + out
        hd = self.resolved_head_dim
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        attn += hd * (self.n_heads + 2 * self.n_kv_heads) if self.attention_bias else 0
        attn += (self.dim if self.o_proj_bias else 0) + (self.n_heads if self.attention_sinks else 0)
        return attn + {"none": 0, "head": 2 * hd, "full": hd * (self.n_heads + self.n_kv_heads)}[self.qk_norm]

    def num_params(self) -> dict[str, int]:
        """Total and per-token-active parameter counts (embeddings included once each)."""
        attn = self._attention_params()
        expert = 3 * self.dim * self.intermediate_size + ((2 * self.intermediate_size + self.dim) if self.expert_bias
                                                           else 0)
        shared = 3 * self.dim * self.resolved_shared_intermediate_size * self.n_shared_experts
        router = (self.dim + int(self.router_bias)) * self.num_experts + (self.dim if self.shared_expert_gate else 0)
        norms = 2 * self.dim
        dense = len(self.dense_layer_ids)
        dense_layer = attn + 3 * self.dim * self.resolved_dense_intermediate_size + norms
        per_layer_total = attn + expert * self.num_experts + shared + router + norms
        per_layer_active = attn + expert * self.top_k + shared + router + norms
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        moe = self.n_layers - dense
        total = moe * per_layer_total + dense * dense_layer + emb + head + self.dim
        active = moe * per_layer_active + dense * dense_layer + emb + head + self.dim
        return {"total": total, "active": active}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6 x active non-embedding matmul params + attention), as in the PaLM MFU formula."""
        p = self.num_params()
        non_emb_active = p["active"] - self.vocab_size * self.dim  # the embedding lookup is not a matmul
        # scores (q.k) and the weighted sum (p.v), forward and backward; causal: half the scores
        attn = 6 * self.n_layers * self.n_heads * (self.qk_head_dim + self.value_head_dim) * seq_len / 2
        return 6 * non_emb_active + attn


def _layer_ids(text: str) -> frozenset[int]:
    """'0, 2,4' -> {0, 2, 4}; ValueError for anything but comma-separated integers."""
    return frozenset(int(i) for i in text.replace(" ", "").split(",") if i)
