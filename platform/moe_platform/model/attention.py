"""RMSNorm and grouped-query attention (SDPA), with an optional KV cache for decoding, sliding-window layers and
learned attention sinks (gpt-oss); the positions of packed documents. Rotary embeddings are in model/rope.py,
multi-head latent attention in model/mla.py."""

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
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=args.o_proj_bias)
        self.window = args.window_of(layer_idx)  # 0: every earlier key
        if args.attention_sinks:  # one learned logit per head beside the keys (gpt-oss)
            self.sinks = nn.Parameter(torch.zeros(self.n_heads))
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
        sinks = getattr(self, "sinks", None)
        if cache is None:
            if self.window:
                window = window_mask(seq, self.window, x.device)
                mask = window if mask is None else mask & window
            out = attend(q, k, v, mask, sinks)
        elif hasattr(cache, "attend"):  # a cache that lays keys out its own way attends itself (serving's paged cache)
            out = cache.attend(self.layer_idx, q, k, v, window=self.window, sinks=sinks)
        else:
            k, v, mask = cache.update(self.layer_idx, k, v, window=self.window)
            out = attend(q, k, v, mask, sinks)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)  # (B, H, T, hd) -> (B, T, H*hd)
        return self._proj("o_proj", out)

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A projection, plus its low-rank adapter when it has one (model/lora.py, serving/multi_lora.py)."""
        return with_adapter(getattr(self, name)(x), getattr(self, "lora", None), name, x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           sinks: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, d) over k, v (B, KV, S, d) (KV divides H; the queries are the last T of the S
    positions): mask None (causal), bool (True = attend) or additive float, broadcast to (B, H, T, S); `sinks` (H,),
    a learned logit per head that takes its share of the softmax without a value (gpt-oss)."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=q.shape[1] != k.shape[1], scale=scale)
    if k.shape[1] != q.shape[1]:  # each key/value head serves heads // kv_heads query heads, in order
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is None:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    combined = torch.cat([logits, sinks.to(logits.dtype).view(1, -1, 1, 1).expand(*logits.shape[:3], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1)[..., :-1]  # the sink's share is dropped: it has no value
    return torch.matmul(probs.to(v.dtype), v)


def window_mask(seq: int, window: int, device) -> torch.Tensor:
    """(T, T) True where a query may attend a key of a sliding-window layer: itself and the window - 1 before."""
    index = torch.arange(seq, device=device)
    distance = index[:, None] - index[None, :]
    return (distance >= 0) & (distance < window)


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
