"""RMSNorm, rotary embeddings and grouped-query attention (SDPA), with an optional KV cache for decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.adapter_hooks import with_adapter
from moe_platform.model.args import ModelArgs


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


class RotaryEmbedding(nn.Module):
    """RoPE in the non-interleaved (rotate-half) convention used by Llama/Mixtral checkpoints."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def reset_buffers(self) -> None:
        """Compute the frequencies again where they live (after `to_empty` gave a model built on meta its memory)."""
        self.inv_freq = self._inv_freq(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) -> cos, sin: (B, 1, T, head_dim)
        freqs = positions.float()[..., None] * self.inv_freq.float()  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None], emb.sin()[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.resolved_head_dim
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
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
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
