"""Many LoRA adapters in one batch (multi-LoRA serving): each row of a batch may use a different adapter, or none.

Training folds one adapter into its model (model/lora.py). A serving replica instead holds up to `max_loras`
adapters at once in fixed slots, stacked per adapted module: A (S, r, in), B (S, out, r) and a scale per slot, the
rank padded with zeros to `max_rank` (zero rows of A and zero columns of B add nothing). Before each forward the
engine tells `AdapterBatch` which slot every token row uses (-1: the base model); every adapted module then adds
scale_s * B_s (A_s x) to the rows of slot s:

- few rows (decode): the adapter pairs are gathered per row and applied in two batched matmuls (the BGMV shape);
- many rows (prefill): rows are grouped by slot and each slot's rows run as one matmul pair (the SGMV shape).

Either way the work is batched per adapter, never a loop over requests. The routed experts hold one pair per
(slot, expert): A (S*E, r, in), grouped by slot * E + expert; with adapters in the batch the experts run unfused so
that the adapter term enters before the SwiGLU nonlinearity, as training computes it. A batch with no adapter row
runs exactly the base model's code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Gather A and B per row while the gathered copy stays this small (elements); beyond it, loop over adapter groups.
_GATHER_MAX_ELEMENTS = 1 << 20


class AdapterBatch:
    """The adapter slot of every token row of the current forward (shared by all adapted modules of a model)."""

    def __init__(self):
        self.token_slots: torch.Tensor | None = None  # (N,) slot per flattened token row, -1 = base model

    def set(self, row_slots: list[int], width: int) -> None:
        """Row i of the next forward's (rows, width) tokens uses adapter slot row_slots[i] (-1: none)."""
        if all(s < 0 for s in row_slots):
            self.token_slots = None
        else:
            self.token_slots = torch.tensor(row_slots, dtype=torch.long).repeat_interleave(width)

    @property
    def active(self) -> bool:
        return self.token_slots is not None


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor,
               gather_max: int = _GATHER_MAX_ELEMENTS) -> torch.Tensor:
    """scale[g] * B[g] (A[g] x) for each row of x (N, in) with group g = groups[row] (-1 rows get 0).
    a: (G, r, in), b: (G, out, r), scale: (G,) -> (N, out). Rows are gathered per row while the gathered adapter
    copies stay within `gather_max` elements, else grouped."""
    n, rank = x.shape[0], a.shape[1]
    used = groups >= 0
    if n * rank * (a.shape[2] + b.shape[1]) <= gather_max:
        g = groups.clamp(min=0)
        xa = torch.bmm(a[g].to(x.dtype), x.unsqueeze(-1))  # (N, r, 1)
        xa = xa * (scale[g] * used).to(x.dtype)[:, None, None]
        return torch.bmm(b[g].to(x.dtype), xa).squeeze(-1)
    out = x.new_zeros(n, b.shape[1])
    for g in groups[used].unique().tolist():
        rows = (groups == g).nonzero().squeeze(1)
        xa = x[rows] @ a[g].t().to(x.dtype)
        out.index_add_(0, rows, xa @ (b[g].t() * scale[g]).to(x.dtype))
    return out


class _Slots(nn.Module):
    """Stacked adapter pairs of `groups` groups (slots, or slots x experts), allocated when first written."""

    def __init__(self, batch: AdapterBatch, groups: int, in_features: int, out_features: int, max_rank: int,
                 dtype: torch.dtype):
        super().__init__()
        self.batch = batch
        self.shape = (groups, in_features, out_features, max_rank)
        self.dtype = dtype
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.scale = torch.zeros(groups)

    def write(self, group: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Set one group's pair (a (r, in), b (out, r), r <= max_rank); None clears it to no adapter."""
        if a is None:
            if self.a is not None:
                self.a[group].zero_()
                self.b[group].zero_()
            self.scale[group] = 0.0
            return
        groups, fan_in, fan_out, max_rank = self.shape
        if self.a is None:
            self.a = torch.zeros(groups, max_rank, fan_in, dtype=self.dtype)
            self.b = torch.zeros(groups, fan_out, max_rank, dtype=self.dtype)
        rank = a.shape[0]
        self.a[group].zero_()
        self.b[group].zero_()
        self.a[group, :rank] = a.to(self.dtype)
        self.b[group, :, :rank] = b.to(self.dtype)
        self.scale[group] = scale


class MultiLoRA(_Slots):
    """The adapters of one linear map in -> out, one per slot: `forward(x)` is the adapter term of each token row of
    x (..., in), or None when no row of the batch uses an adapter here."""

    def __init__(self, batch: AdapterBatch, slots: int, in_features: int, out_features: int, max_rank: int,
                 dtype: torch.dtype):
        super().__init__(batch, slots, in_features, out_features, max_rank, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.batch.active or self.a is None:
            return None
        flat = x.reshape(-1, x.shape[-1])
        return lora_delta(flat, self.a, self.b, self.scale, self.batch.token_slots).reshape(*x.shape[:-1], -1)


class MultiExpertLoRA(nn.Module):
    """The routed experts' adapters, one pair per (slot, expert) for gate_up_proj and down_proj."""

    def __init__(self, batch: AdapterBatch, slots: int, num_experts: int, dim: int, hidden: int, max_rank: int,
                 dtype: torch.dtype):
        super().__init__()
        self.batch = batch
        self.num_experts = num_experts
        self.gate_up_proj = _Slots(batch, slots * num_experts, dim, 2 * hidden, max_rank, dtype)
        self.down_proj = _Slots(batch, slots * num_experts, hidden, dim, max_rank, dtype)

    def write(self, slot: int, tensors: dict[str, torch.Tensor] | None, scale: float) -> None:
        """tensors: {"gate_up_proj.A": (E, r, D), ...B, "down_proj.A", "down_proj.B"}; None clears the slot."""
        for name in ("gate_up_proj", "down_proj"):
            target: _Slots = getattr(self, name)
            for e in range(self.num_experts):
                pair = (None, None) if tensors is None else (tensors[f"{name}.A"][e], tensors[f"{name}.B"][e])
                target.write(slot * self.num_experts + e, *pair, scale)

    def experts_forward(self, weights, x: torch.Tensor, counts: torch.Tensor, token_index: torch.Tensor,
                        scores: torch.Tensor | None) -> torch.Tensor | None:
        """`GroupedExperts.forward` with each row's adapter added before the nonlinearity; None when no row of the
        batch has an expert adapter (the caller then runs its fused base path)."""
        from moe_platform.model.moe import grouped_mm

        if not self.batch.active or self.gate_up_proj.a is None:
            return None
        experts = torch.repeat_interleave(torch.arange(self.num_experts), counts.cpu())  # (M,) expert of each row
        slots = self.batch.token_slots[token_index.cpu()]
        groups = torch.where(slots >= 0, slots * self.num_experts + experts, -1).to(x.device)
        rows = x[token_index]  # (M, D)
        h = grouped_mm(rows, weights.gate_up_proj, counts)
        up, down = self.gate_up_proj, self.down_proj
        h = h + lora_delta(rows, up.a, up.b, up.scale, groups)
        gate, lin = h.chunk(2, dim=-1)
        act = F.silu(gate) * lin
        out = grouped_mm(act, weights.down_proj, counts) + lora_delta(act, down.a, down.b, down.scale, groups)
        if scores is not None:
            out = out * scores[:, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_index, out)
