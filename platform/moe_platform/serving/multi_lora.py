"""Many LoRA adapters in one batch (multi-LoRA serving): each row of a batch may use a different adapter, or none.

Training folds one adapter into its model (model/lora.py). A serving replica instead holds up to `max_loras`
adapters at once in fixed slots, stacked per adapted module and transposed for the grouped matmuls: A.T (S, in, r),
B.T (S, r, out) and a scale per slot, the rank padded with zeros to `max_rank` (zero rows of A and zero columns of B
add nothing). Before each forward the engine tells `AdapterBatch` which slot every token row uses (-1: the base
model); every adapted module then adds scale_s * B_s (A_s x) to the rows of slot s. The rows are sorted by slot
once per forward and every adapted module runs two grouped matmuls over them (the SGMV shape: `torch._grouped_mm`,
or one matmul pair per slot where that has no kernel for the device and dtype). The work is batched per adapter,
never a loop over requests. The routed experts hold one pair per (slot, expert), grouped by slot * E + expert; the
adapter term of gate_up enters before the SwiGLU nonlinearity, as training computes it. A batch with no adapter
row runs exactly the base model's code.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_platform.model.grouped_mm import grouped_mm, row_groups


class Segments:
    """The rows of a batch that use an adapter group, sorted by group: what the grouped matmuls below run over."""

    def __init__(self, groups: torch.Tensor, num_groups: int):
        used = (groups >= 0).nonzero().squeeze(1)
        group_of_used = groups[used]
        order = torch.argsort(group_of_used, stable=True)
        self.rows = used[order]  # (U,) row indices, grouped
        self.groups = group_of_used[order]  # (U,) the group of each of them
        self.counts = torch.bincount(group_of_used, minlength=num_groups)
        self.offsets = torch.cumsum(self.counts, 0, dtype=torch.int32)
        self.num_rows = groups.numel()


class AdapterBatch:
    """The adapter slot of every token row of the current forward (shared by all adapted modules of a model)."""

    def __init__(self, num_slots: int = 0):
        self.num_slots = num_slots
        self.token_slots: torch.Tensor | None = None  # (N,) slot per flattened token row, -1 = base model
        self.segments: Segments | None = None  # the token rows grouped by slot

    def set(self, row_slots: list[int], width: int) -> None:
        """Row i of the next forward's (rows, width) tokens uses adapter slot row_slots[i] (-1: none)."""
        if all(s < 0 for s in row_slots):
            self.token_slots = self.segments = None
        else:
            self.token_slots = torch.tensor(row_slots, dtype=torch.long).repeat_interleave(width)
            self.segments = Segments(self.token_slots, self.num_slots)

    @property
    def active(self) -> bool:
        return self.token_slots is not None


def _segment_mm(x: torch.Tensor, w: torch.Tensor, seg: Segments) -> torch.Tensor:
    """Grouped rows of x (U, K) times their group's w[g] (w: (G, K, M), contiguous) -> (U, M)."""
    if hasattr(torch, "_grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return torch._grouped_mm(x, w, offs=seg.offsets.to(x.device))
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for g, n in enumerate(seg.counts.tolist()):
        if n:
            torch.mm(x[start:start + n], w[g], out=out[start:start + n])
        start += n
    return out


def lora_delta(x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, scale: torch.Tensor,
               seg: Segments) -> torch.Tensor:
    """scale[g] * B[g] (A[g] x) for each row of x (N, in) in group g of `seg` (rows in no group get 0), from the
    factors stored transposed: a_t = A.T (G, in, r), b_t = B.T (G, r, out); scale (G,) -> (N, out). Two grouped
    matmuls over the rows sorted by group (the SGMV shape): the work is batched per adapter whatever the rows."""
    xa = _segment_mm(x[seg.rows], a_t, seg)  # (U, r)
    xa = xa * scale.to(x.device, x.dtype)[seg.groups][:, None]
    out = x.new_zeros(seg.num_rows, b_t.shape[2])
    return out.index_copy_(0, seg.rows, _segment_mm(xa, b_t, seg))


class _Slots(nn.Module):
    """Stacked adapter pairs of `groups` groups (slots, or slots x experts), allocated when first written."""

    def __init__(self, batch: AdapterBatch, groups: int, in_features: int, out_features: int, max_rank: int,
                 dtype: torch.dtype):
        super().__init__()
        self.batch = batch
        self.shape = (groups, in_features, out_features, max_rank)
        self.dtype = dtype
        self.a_t: torch.Tensor | None = None  # A transposed, (groups, in, max_rank): what the grouped matmul reads
        self.b_t: torch.Tensor | None = None  # B transposed, (groups, max_rank, out)
        self.scale = torch.zeros(groups)

    def write(self, group: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Set one group's pair (a (r, in), b (out, r), r <= max_rank); None clears it to no adapter."""
        if a is None:
            if self.a_t is not None:
                self.a_t[group].zero_()
                self.b_t[group].zero_()
            self.scale[group] = 0.0
            return
        groups, fan_in, fan_out, max_rank = self.shape
        if self.a_t is None:
            self.a_t = torch.zeros(groups, fan_in, max_rank, dtype=self.dtype)
            self.b_t = torch.zeros(groups, max_rank, fan_out, dtype=self.dtype)
        rank = a.shape[0]
        self.a_t[group].zero_()
        self.b_t[group].zero_()
        self.a_t[group, :, :rank] = a.t().to(self.dtype)
        self.b_t[group, :rank] = b.t().to(self.dtype)
        self.scale[group] = scale


class MultiLoRA(_Slots):
    """The adapters of one linear map in -> out, one per slot: `forward(x)` is the adapter term of each token row of
    x (..., in), or None when no row of the batch uses an adapter here."""

    def __init__(self, batch: AdapterBatch, slots: int, in_features: int, out_features: int, max_rank: int,
                 dtype: torch.dtype):
        super().__init__(batch, slots, in_features, out_features, max_rank, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.batch.active or self.a_t is None:
            return None
        flat = x.reshape(-1, x.shape[-1])
        return lora_delta(flat, self.a_t, self.b_t, self.scale, self.batch.segments).reshape(*x.shape[:-1], -1)


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
        batch has an expert adapter (the caller then runs its fused base path). model/moe.py calls it on any `lora`
        module that has it, so the model needs no import of serving."""
        if not self.batch.active or self.gate_up_proj.a_t is None:
            return None
        experts = torch.repeat_interleave(torch.arange(self.num_experts), counts.cpu())  # (M,) expert of each row
        slots = self.batch.token_slots[token_index.cpu()]
        seg = Segments(torch.where(slots >= 0, slots * self.num_experts + experts, -1), self.gate_up_proj.shape[0])
        rows = x[token_index]  # (M, D)
        up, down = self.gate_up_proj, self.down_proj
        # (M, 2I): the adapter terms first, and the experts' gate/up biases when they have them (gpt-oss)
        h = weights.add_bias(lora_delta(rows, up.a_t, up.b_t, up.scale, seg), "gate_up_proj", counts)
        if x.device.type == "cpu":  # expert by expert, a group's activations stay in cache (as the fused path)
            inter = weights.down_proj.shape[-1]
            act = x.new_empty(rows.shape[0], inter)
            out = x.new_empty(rows.shape)
            for g, r in row_groups(counts.tolist()):
                act[r] = weights.activate(torch.addmm(h[r], rows[r], weights.gate_up_proj[g].t()))
                torch.mm(act[r], weights.down_proj[g].t(), out=out[r])
        else:
            act = weights.activate(h + grouped_mm(rows, weights.gate_up_proj, counts))
            out = grouped_mm(act, weights.down_proj, counts)
        out = weights.add_bias(out, "down_proj", counts) + lora_delta(act, down.a_t, down.b_t, down.scale, seg)
        if scores is not None:
            out = out * scores[:, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_index, out)
