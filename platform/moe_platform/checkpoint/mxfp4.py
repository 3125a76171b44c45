"""MXFP4 (the OCP microscaling format gpt-oss ships its experts in): FP4 e2m1 values in blocks of 32 along the input
dim, each block with one e8m0 scale (a power of two).

A tensor W (..., K) is stored as `blocks` (..., K/32, 16) uint8, two e2m1 values per byte (the low nibble first), and
`scales` (..., K/32) uint8, each block's exponent biased by 127: W[..., 32g + i] = E2M1[nibble i of block g] *
2^(scales[..., g] - 127). The dequantized values are exact in bfloat16 and float32.
"""

from __future__ import annotations

import torch

# e2m1: sign, two exponent bits, one mantissa bit; nibble n -> its value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def check_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, where: str) -> None:
    """A clear error unless `blocks` and `scales` are MXFP4 halves of one tensor."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{where}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"{where}: MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                         f"(blocks must be (..., groups, {BLOCK // 2}) and scales (..., groups))")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     where: str = "MXFP4 tensor") -> torch.Tensor:
    """blocks (..., G, 16) and scales (..., G) -> the tensor (..., G * 32) in `dtype`."""
    check_mxfp4(blocks, scales, where)
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # (..., G, 16, 2)
    values = values.flatten(-2)  # (..., G, 32): low nibble, then high, byte by byte
    exponents = scales.to(torch.int32) - 127
    return torch.ldexp(values, exponents[..., None]).flatten(-2).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (..., K), K a multiple of 32 -> (blocks (..., K/32, 16), scales (..., K/32)): each block scaled by
    2^(floor(log2(absmax)) - 2), so its largest value lands in e2m1's top binade, then rounded to the nearest e2m1
    value."""
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 quantizes the last dim in blocks of {BLOCK}, got shape {tuple(weight.shape)}")
    w = weight.float().reshape(*weight.shape[:-1], -1, BLOCK)  # (..., G, 32)
    amax = w.abs().amax(dim=-1)
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0**-126))) - 2, torch.zeros_like(amax))
    exponent = exponent.clamp(-127, 127)
    scaled = w / torch.ldexp(torch.ones_like(amax), exponent.to(torch.int32))[..., None]
    lut = torch.tensor(E2M1_VALUES[:8])  # the magnitudes
    nibble = (scaled.abs()[..., None] - lut).abs().argmin(dim=-1)  # nearest magnitude
    nibble = nibble | ((scaled < 0).long() << 3)
    nibble = nibble.to(torch.uint8).reshape(*w.shape[:-1], BLOCK // 2, 2)
    blocks = nibble[..., 0] | (nibble[..., 1] << 4)
    return blocks, (exponent + 127).to(torch.uint8)
