"""Multi-head latent attention (MLA, DeepSeek-V2/V3, Kimi-K2, Moonlight), with transformers' parameter names.

Keys and values come from one small latent per token: `kv_a_proj_with_mqa` maps the input to the latent c (kv_lora_rank,
normalised by `kv_a_layernorm`) beside one rotary key k_pe (qk_rope_head_dim) shared by every head; `kv_b_proj` expands
c into each head's position-free key (qk_nope_head_dim) and value (v_head_dim). Queries come from `q_proj`, or through
a low-rank latent (`q_a_proj`, `q_a_layernorm`, `q_b_proj`). A head's query/key is [nope; rope].

What a cache has to keep is only (c, k_pe) per token. A cache that stores that latent attends itself
(`attend_latent`, serving's latent cache: decode absorbs kv_b_proj into the query and output sides); every other
path expands c into per-head keys and values and runs ordinary attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.adapter_hooks import with_adapter
from moe_platform.model.args import ModelArgs
from moe_platform.model.attention import RMSNorm
from moe_platform.model.rope import apply_rotary, mla_softmax_scale

# The latent norms' epsilon: DeepSeek's reference code and transformers build them with their default, not the
# config's rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = self.n_kv_heads = args.n_heads  # keys and values are expanded per head
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = args.qk_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.rope_interleave = args.rope_interleave
        self.scale = mla_softmax_scale(args)
        bias = args.attention_bias
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, args.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(args.dim, args.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, args.n_heads * (args.qk_nope_head_dim + args.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.v_head_dim, args.dim, bias=bias)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> queries (B, H, T, qk_head_dim), before RoPE."""
        if hasattr(self, "q_proj"):
            q = self._proj("q_proj", x)
        else:
            q = self._proj("q_b_proj", self.q_a_layernorm(self._proj("q_a_proj", x)))
        return q.view(*x.shape[:2], -1, self.qk_head_dim).transpose(1, 2)

    def latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> the normalised latent c (B, T, kv_lora_rank) and the rotary key k_pe (B, 1, T, rope), before
        RoPE."""
        c, k_pe = self._proj("kv_a_proj_with_mqa", x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c), k_pe[:, None]

    def expand(self, c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent c (B, S, r) and rotated k_pe (B, 1, S, rope) -> keys (B, H, S, qk_head_dim) and values
        (B, H, S, v_head_dim)."""
        kv = self._proj("kv_b_proj", c).view(*c.shape[:2], -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """As `Attention.forward`: mask (B, 1, T, T), True where a query may attend a key (packed documents)."""
        bsz, seq, _ = x.shape
        q = self.queries(x)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c, k_pe = self.latent(x)
        cos, sin = rope
        q_pe = apply_rotary(q_pe, cos, sin, self.rope_interleave)
        k_pe = apply_rotary(k_pe, cos, sin, self.rope_interleave)
        if hasattr(cache, "attend_latent"):  # a cache of latents (serving): attention runs on them
            out = cache.attend_latent(self.layer_idx, q_nope, q_pe, c, k_pe, self)
        else:
            k, v = self.expand(c, k_pe)
            q = torch.cat((q_nope, q_pe), dim=-1)
            if cache is None:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
            elif hasattr(cache, "attend"):
                out = cache.attend(self.layer_idx, q, k, v, scale=self.scale)
            else:
                k, v, mask = cache.update(self.layer_idx, k, v)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # (B, H, T, v) -> (B, T, H*v)
        return self._proj("o_proj", out)

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A projection, plus its low-rank adapter when it has one (model/lora.py, serving/multi_lora.py)."""
        return with_adapter(getattr(self, name)(x), getattr(self, "lora", None), name, x)

    def absorbed_weights(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight (its own, or `weight`: the same matrix dequantized, say) split per head for attention
        on the latent: W_UK (H, nope, r), which maps a head's position-free query into latent space (q_nope @ W_UK),
        and W_UV (H, v, r), which maps an attention-weighted latent to the head's value output (o_latent @ W_UV^T)."""
        w = self.kv_b_proj.weight if weight is None else weight
        w = w.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
