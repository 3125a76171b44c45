"""Rotary position embeddings: the default, linear and YaRN frequency schedules, partial rotation (the first dims of
each head only: GLM) and interleaved pairs (DeepSeek).

Frequencies follow the formulas as Hugging Face's configs define them (`rope_parameters`), so an imported model's
cos/sin tables equal transformers' bit for bit in fp32. YaRN also scales cos and sin by its attention factor, and
multi-head latent attention scales its softmax by `mla_softmax_scale`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_platform.model.args import ModelArgs


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context extension `factor` (its eq. 21): 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(args: ModelArgs, device=None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (rope_dim / 2,) of `args`' rotary dims, and the factor cos and sin are scaled by."""
    dim, base = args.rope_dim, args.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if args.rope_type == "default":
        return 1.0 / (base ** exponents), 1.0
    if args.rope_type == "linear":
        return 1.0 / (base ** exponents) / args.rope_factor, 1.0
    factor = args.rope_factor
    if args.rope_attention_factor:
        attention = args.rope_attention_factor
    elif args.rope_mscale and args.rope_mscale_all_dim:
        attention = yarn_mscale(factor, args.rope_mscale) / yarn_mscale(factor, args.rope_mscale_all_dim)
    else:
        attention = yarn_mscale(factor)
    wavelengths = base ** exponents
    extrapolation = 1.0 / wavelengths
    interpolation = 1.0 / (factor * wavelengths)
    low, high = _yarn_correction_range(args, dim)
    if low == high:
        high += 0.001  # a degenerate ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the dim keeps its original frequency (high frequencies), 0: it is interpolated
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


def _yarn_correction_range(args: ModelArgs, dim: int) -> tuple[float, float]:
    """The dims between which YaRN moves from extrapolation to interpolation (beta_fast and beta_slow rotations over
    the original context)."""
    def dim_of(rotations: float) -> float:
        return (dim * math.log(args.rope_original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(
            args.rope_theta))

    low, high = dim_of(args.rope_beta_fast), dim_of(args.rope_beta_slow)
    if args.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def mla_softmax_scale(args: ModelArgs) -> float:
    """Multi-head latent attention's softmax scale: 1/sqrt(qk head dim), times YaRN's mscale(mscale_all_dim) squared
    when the RoPE is scaled (DeepSeek scales every query/key dim, not only the rotary ones)."""
    scale = args.qk_head_dim ** -0.5
    if args.rope_type != "default" and args.rope_mscale_all_dim:
        m = yarn_mscale(args.rope_factor, args.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """cos and sin of every position for the model's rotary dims (`ModelArgs.rope_dim`), in the rotate-half layout."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        inv_freq, self.attention_scaling = rope_frequencies(args)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Compute the frequencies again where they live (after `to_empty` gave a model built on meta its memory)."""
        self.inv_freq = rope_frequencies(self.args, self.inv_freq.device)[0]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) -> cos, sin: (B, 1, T, rope_dim)
        freqs = positions.float()[..., None] * self.inv_freq.float()  # (B, T, rope_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos[:, None], sin[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (..., hd); the rest pass through (partial rotary).

    interleave: the rotary dims are pairs (x0, x1), (x2, x3), ...; the result holds the rotated first members, then
    the rotated second members (the de-interleaved layout, as DeepSeek-V3's transformers code returns it; query and
    key are laid out alike, so their dot products are those of the interleaved layout)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot], cos, sin, interleave), x[..., rot:]), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        cos, sin = cos[..., : rot // 2], sin[..., : rot // 2]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return (x * cos) + (_rotate_half(x) * sin)
