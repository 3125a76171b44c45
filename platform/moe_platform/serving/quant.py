"""Weight-only int8 quantization of a model for serving (`engine.quantization: int8`).

- Dense projections (attention q/k/v/o, shared experts) use torchao's `Int8WeightOnlyConfig`: int8 weights with one
  scale per output channel, through torchao's own kernels on whatever device the model is on.
- The routed experts are stacked 3-D weights, which torchao's weight-only configs do not cover. `Int8Experts` holds
  them as int8 with one scale per output channel of each expert and multiplies each expert's rows with PyTorch's
  int8 weight-pack kernel (`torch._weight_int8pack_mm`) where an expert has one row on the CPU, or with the expert's
  weights dequantized otherwise.
- The embeddings, the router and the output head stay in the model's dtype.

Weights shrink to about a quarter of float32; the effect on quality is measured by `bench/quant.py` (perplexity on
held-out text against the unquantized model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_platform.model.moe import GroupedExperts, MoE

QUANTIZATIONS = ("none", "int8")


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


class Int8Experts(nn.Module):
    """`GroupedExperts` with int8 weights (same forward contract)."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.num_experts = experts.num_experts
        for name in ("gate_up_proj", "down_proj"):
            q, scale = quantize_per_channel(getattr(experts, name))
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, token_index: torch.Tensor | None = None,
                scores: torch.Tensor | None = None) -> torch.Tensor:
        rows = x if token_index is None else x[token_index]  # (N, D) -> (M, D), grouped by expert
        out = rows.new_empty(rows.shape[0], self.down_proj_q.shape[1])
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = _int8_mm(rows[start:start + n], self.gate_up_proj_q[e],
                                    self.gate_up_proj_scale[e]).chunk(2, dim=-1)
                out[start:start + n] = _int8_mm(F.silu(gate) * up, self.down_proj_q[e], self.down_proj_scale[e])
            start += n
        if scores is not None:
            out = out * scores[:, None].to(out.dtype)
        if token_index is None:
            return out
        return torch.zeros_like(x).index_add_(0, token_index, out)


def quantize_model(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` in place for inference (`method` in QUANTIZATIONS); returns it."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {method!r}")
    if method == "none":
        return model
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, GroupedExperts):
            module.experts = Int8Experts(module.experts)
    dense = {id(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in dense)
    return model


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


__all__ = ["QUANTIZATIONS", "Int8Experts", "model_bytes", "quantize_model", "quantize_per_channel"]
