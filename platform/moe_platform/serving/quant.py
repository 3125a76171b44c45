"""Weight-only quantization of a model for serving (`engine.quantization: int8 | int4`).

int8:
- Dense projections (attention q/k/v/o or latent attention's, shared experts, dense MLPs) use torchao's
  `Int8WeightOnlyConfig`: int8 weights with one
  scale per output channel, through torchao's own kernels on whatever device the model is on.
- The routed experts are stacked 3-D weights, which torchao's weight-only configs do not cover. `Int8Experts` holds
  them as int8 with one scale per output channel of each expert and multiplies each expert's rows with PyTorch's
  int8 weight-pack kernel (`torch._weight_int8pack_mm`) where an expert has one row on the CPU, or with the expert's
  weights dequantized otherwise.

int4: torchao 0.18's `Int4WeightOnlyConfig` needs its separate `mslk` kernel package (or CUDA tile packing), and
runs on no CPU, so int4 is our own everywhere: symmetric int4 in groups of `INT4_GROUP` input channels with one
float32 scale per group, two weights per byte (`Int4Linear`, `Int4Experts`), dequantized to the activations' dtype
for each matmul. It saves memory (about 0.16x float32 for these layers), not time.

The embeddings, the router and the output head stay in the model's dtype. The effect on quality is measured by
`bench/quant.py` (perplexity on held-out text against the unquantized model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.moe import GroupedExperts, MoE

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> int8 weights of the same shape and float32 scales (..., out): symmetric, one scale per
    output channel."""
    scale = weight.detach().float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(weight.detach().float() / scale[..., None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def _int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ (q (out, in) * scale (out,)).T -> (M, out). PyTorch's CPU int8 weight-pack kernel works row by
    row: it is the faster one for a single row, and dequantizing the weights first is for more (measured on a 2-core
    x86 CPU: 1 row 127 against 189 us, 4 rows 519 against 268 us, at 1024 x 256)."""
    if x.device.type == "cpu" and x.shape[0] == 1:
        return torch._weight_int8pack_mm(x.contiguous(), q, scale.to(x.dtype))
    return x @ (q.to(x.dtype) * scale.to(x.dtype)[:, None]).T


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> packed uint8 (..., out, in / 2) (two weights per byte, low nibble first) and float32
    scales (..., out, in / group): symmetric int4 in [-8, 7], one scale per `group` input channels (per output
    channel when `in` is not a multiple of `group`)."""
    *lead, out_dim, in_dim = weight.shape
    if in_dim % 2:
        raise ValueError(f"int4 needs an even number of input channels, got {in_dim}")
    group = group if in_dim % group == 0 else in_dim
    w = weight.detach().float().reshape(*lead, out_dim, in_dim // group, group)
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 7.0
    q = (torch.round(w / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(*lead, out_dim, in_dim)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_int4`, in `dtype`."""
    *lead, out_dim, half = packed.shape
    q = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*lead, out_dim, scale.shape[-1], -1)
    return ((q.to(dtype) - 8) * scale[..., None].to(dtype)).reshape(*lead, out_dim, 2 * half)


class Int4Linear(nn.Module):
    """An `nn.Linear` with int4 weights (see `quantize_int4`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_int4(linear.weight)
        self.register_buffer("weight_q", q)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4(self.weight_q, self.weight_scale, x.dtype), self.bias)


class _QuantizedExperts(nn.Module):
    """`GroupedExperts` with weights quantized by `quantize` (same forward contract); a subclass's `_mm(x, name, e)`
    multiplies rows by expert e's weight `name`."""

    def __init__(self, experts: GroupedExperts, quantize):
        super().__init__()
        self.num_experts = experts.num_experts
        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize(getattr(experts, name))
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)
        # biases stay in the model's dtype; the activation is the experts' own (gpt-oss's clamped SwiGLU)
        self.gate_up_proj_bias, self.down_proj_bias = experts.gate_up_proj_bias, experts.down_proj_bias
        self.activate = experts.activate

    def forward(self, x: torch.Tensor, counts: torch.Tensor, token_index: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> torch.Tensor:
        rows = x if token_index is None else x[token_index]  # (N, D) -> (M, D), grouped by expert
        out = rows.new_empty(rows.shape[0], x.shape[-1])
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                h = self._mm(rows[start:start + n], "gate_up_proj", e)
                if self.gate_up_proj_bias is not None:
                    h = h + self.gate_up_proj_bias[e].to(h.dtype)
                out[start:start + n] = self._mm(self.activate(h), "down_proj", e)
                if self.down_proj_bias is not None:
                    out[start:start + n] += self.down_proj_bias[e].to(out.dtype)
            start += n
        if scores is not None:
            out = out * scores[:, None].to(out.dtype)
        if token_index is None:
            return out
        return torch.zeros_like(x).index_add_(0, token_index, out)


class Int8Experts(_QuantizedExperts):
    """Routed experts as int8, one scale per output channel of each expert."""

    def __init__(self, experts: GroupedExperts):
        super().__init__(experts, quantize_per_channel)

    def _mm(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return _int8_mm(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e])


class Int4Experts(_QuantizedExperts):
    """Routed experts as int4 in groups (see `quantize_int4`)."""

    def __init__(self, experts: GroupedExperts):
        super().__init__(experts, quantize_int4)

    def _mm(self, x: torch.Tensor, name: str, e: int) -> torch.Tensor:
        return x @ dequantize_int4(getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e], x.dtype).T


# the projections quantized as dense matrices: attention (grouped-query and latent), shared experts, dense MLPs
_DENSE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                      "gate_proj", "up_proj", "down_proj")


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` in place for inference (`method` in QUANTIZATIONS); returns it."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {method!r}")
    if method == "none":
        return model
    experts_cls = Int8Experts if method == "int8" else Int4Experts
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, GroupedExperts):
            module.experts = experts_cls(module.experts)
    dense = {id(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and name.split(".")[-1] in _DENSE_PROJECTIONS}
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in dense)
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in dense:
                setattr(parent, name, Int4Linear(child))
    return model


def dense_weight(linear: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight (out, in) of a projection, quantized or not (ours int4, torchao's int8), in `dtype` (default
    its own): what code that reads a weight rather than calling the layer needs."""
    if isinstance(linear, Int4Linear):
        return dequantize_int4(linear.weight_q, linear.weight_scale, dtype or torch.float32)
    weight = linear.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize"):  # a torchao tensor
        weight = weight.dequantize()
    return weight if dtype is None else weight.to(dtype)


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, counting the int8 data and scales inside torchao's tensors."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


__all__ = ["QUANTIZATIONS", "Int4Experts", "Int4Linear", "Int8Experts", "dense_weight", "dequantize_int4",
           "model_bytes", "quantize_int4", "quantize_model", "quantize_per_channel"]
