"""RMSNorm and grouped-query attention (SDPA), with an optional KV cache for decoding; the positions of packed
documents. Rotary embeddings are in model/rope.py, multi-head latent attention in model/mla.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.adapter_hooks import with_adapter
from moe_platform.model.args import ModelArgs
from moe_platform.model.rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Mixtral does, so bf16 activations keep their precision here.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.resolved_head_dim
        self.rope_interleave = args.rope_interleave
        self.q_proj = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # Query/key norms: over each head (Qwen3-MoE) or over the whole projection (OLMoE); both before RoPE.
        self.qk_norm = args.qk_norm
        if args.qk_norm != "none":
            q_width, k_width = ((self.head_dim, self.head_dim) if args.qk_norm == "head"
                                else (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim))
            self.q_norm = RMSNorm(q_width, args.norm_eps)
            self.k_norm = RMSNorm(k_width, args.norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask (B, 1, T, T), True where a query may attend a key, replaces the causal mask (packed documents)."""
        bsz, seq, _ = x.shape
        # Head counts come from the projections so a tensor-parallel shard (fewer local heads) runs unchanged.
        q, k = self._proj("q_proj", x), self._proj("k_proj", x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bsz, seq, -1, self.head_dim)  # (B, T, H, hd)
        k = k.view(bsz, seq, -1, self.head_dim)  # (B, T, KV, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, KV, T, hd)
        v = self._proj("v_proj", x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin, self.rope_interleave), apply_rotary(k, cos, sin, self.rope_interleave)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        elif hasattr(cache, "attend"):  # a cache that lays keys out its own way attends itself (serving's paged cache)
            out = cache.attend(self.layer_idx, q, k, v)
        else:
            k, v, mask = cache.update(self.layer_idx, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # (B, H, T, hd) -> (B, T, H*hd)
        return self._proj("o_proj", out)

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A projection, plus its low-rank adapter when it has one (model/lora.py, serving/multi_lora.py)."""
        return with_adapter(getattr(self, name)(x), getattr(self, "lora", None), name, x)


def document_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask of packed documents. segments (B, T) numbers the documents of each row (equal
    ids are one document, which must be contiguous) -> positions (B, T) restarting at 0 with each document, and a
    mask (B, 1, T, T) that lets a token attend only to earlier tokens of its own document. A packed row then computes
    what each of its documents would alone."""
    seq = segments.shape[1]
    index = torch.arange(seq, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return index - first, mask[:, None]
