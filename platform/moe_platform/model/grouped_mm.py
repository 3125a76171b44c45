"""Grouped matmuls over contiguous row groups: the expert kernels of model/moe.py and serving's multi-LoRA.

A leaf: it imports nothing from model/, so every layer and every adapter module can use it without an import cycle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GroupedMatmul(torch.autograd.Function):
    """y[g] = x[g] @ w[g].T for contiguous row groups g of x; backward is the same loop transposed.

    `torch._grouped_mm` runs this forward on CPU too, but its backward fails when a group is empty, so the CPU
    path keeps its own loop (measured as fast as `_grouped_mm` there).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # x: (N, K), w: (E, M, K) -> (N, M)
        out = x.new_empty(x.shape[0], w.shape[1])
        for g, rows in row_groups(counts):
            torch.mm(x[rows], w[g].t(), out=out[rows])
        ctx.save_for_backward(x, w)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = _empty_group_grads(w, ctx.counts) if ctx.needs_input_grad[1] else None
        for g, rows in row_groups(ctx.counts):
            dy = grad_out[rows]
            if grad_x is not None:
                torch.mm(dy, w[g], out=grad_x[rows])
            if grad_w is not None:
                torch.mm(dy.t(), x[rows], out=grad_w[g])
        return grad_x, grad_w, None


def row_groups(counts: list[int]):
    """(group, row slice) for every non-empty group of contiguous rows."""
    start = 0
    for g, n in enumerate(counts):
        if n:
            yield g, slice(start, start + n)
        start += n


def _empty_group_grads(w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Gradient buffer for stacked per-group weights: groups with rows get overwritten, only empty ones zeroed."""
    grad = torch.empty_like(w)
    for g, n in enumerate(counts):
        if n == 0:
            grad[g].zero_()
    return grad


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM: rows of x (N, K) are grouped by `counts` (E,); group g is multiplied by w[g].T (w: (E, M, K))."""
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)
    return _GroupedMatmul.apply(x, w, counts.tolist())


class GroupedSwiGLU(torch.autograd.Function):
    """All SwiGLU experts in one pass over their row groups, optionally fused with the token gather and the
    router-weighted scatter back: out[token] += score * down(silu(gate(x[token])) * up(x[token])).

    Why one Function instead of composing grouped_mm calls: on CPU, memory traffic of the (rows, 2I) intermediates
    and the number of small kernels, not the GEMMs, separate a grouped MoE from a dense FFN. Working expert by expert
    keeps a group's activations in cache between its GEMMs; backward writes the gate and up gradients straight into
    one buffer (no chunk/cat copies); the activation is recomputed per group from the saved pre-activations instead
    of being stored. The router score is applied to whole (rows, D) tensors outside the loop, after the down
    projection as in Mixtral, and its gradient is one row-wise dot product with the saved unscaled output.

    x: (N, D) tokens with token_index (M,) giving the source token of each grouped row, or (M, D) rows already
    grouped when token_index is None. scores: (M,) router weight per row or None.
    Returns (N, D) per-token sums over their rows with token_index, else (M, D) per-row outputs.
    """

    @staticmethod
    def forward(ctx, x, gate_up, down, counts: list[int], token_index, scores, grad_enabled: bool):
        inter = down.shape[-1]
        n_rows = sum(counts)
        for_backward = grad_enabled and any(ctx.needs_input_grad)  # needs_input_grad ignores torch.no_grad()
        rows_in = x if token_index is None else x.new_empty(n_rows, x.shape[1])  # (M, D) grouped input rows
        y = x.new_empty(n_rows, x.shape[1])  # (M, D) expert outputs before the router weight
        # Pre-activations (n, 2I) of each group, kept for backward. One buffer per group rather than one (M, 2I)
        # buffer: allocations that large bypass the allocator's free lists, and first-touch page faults on a fresh
        # 64 MB block cost ~20% of the GEMM writing it.
        pre = []
        for g, rows in row_groups(counts):
            if token_index is not None:
                torch.index_select(x, 0, token_index[rows], out=rows_in[rows])
            h = torch.mm(rows_in[rows], gate_up[g].t())  # (n, D) -> (n, 2I)
            torch.mm(F.silu(h[:, :inter]).mul_(h[:, inter:]), down[g].t(), out=y[rows])
            if for_backward:
                pre.append(h)
        ctx.counts = counts
        ctx.x_shape = x.shape
        ctx.save_for_backward(rows_in, gate_up, down, token_index, scores,
                              y if for_backward and ctx.needs_input_grad[5] else None, *pre)
        out = y if scores is None else y * scores[:, None].to(y.dtype)
        if token_index is None:
            return out
        # Rows are sorted by expert, so each token sums its experts in expert order (as Mixtral's loop does).
        return x.new_zeros(x.shape).index_add_(0, token_index, out)

    @staticmethod
    def backward(ctx, grad_out):
        rows_in, gate_up, down, token_index, scores, y, *pre = ctx.saved_tensors
        need_x, need_gate_up, need_down, _, _, need_scores, _ = ctx.needs_input_grad
        counts, inter = ctx.counts, down.shape[-1]
        # (N, D) -> (M, D): the gradient reaching each grouped row
        grad_rows_out = grad_out.contiguous() if token_index is None else grad_out.index_select(0, token_index)
        grad_scores = None
        if scores is not None:
            if need_scores:
                grad_scores = torch.linalg.vecdot(grad_rows_out, y).to(scores.dtype)
            grad_rows_out = grad_rows_out * scores[:, None].to(grad_rows_out.dtype)
        grad_gate_up = _empty_group_grads(gate_up, counts) if need_gate_up else None
        grad_down = _empty_group_grads(down, counts) if need_down else None
        grad_rows_in = torch.empty_like(rows_in) if need_x else None
        grad_pre = rows_in.new_empty(max(counts, default=0), 2 * inter)  # one group's, reused
        for (g, rows), h in zip(row_groups(counts), pre, strict=True):
            dy = grad_rows_out[rows]  # (n, D)
            gate, up = h[:, :inter], h[:, inter:]
            silu = F.silu(gate)
            if need_down:
                torch.mm(dy.t(), silu * up, out=grad_down[g])
            if not (need_x or need_gate_up):
                continue
            d_act = torch.mm(dy, down[g])  # (n, D) -> (n, I)
            dh = grad_pre[: rows.stop - rows.start]  # (n, 2I): gate half, up half
            torch.mul(d_act, silu, out=dh[:, inter:])
            torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=dh[:, :inter])
            if need_gate_up:
                torch.mm(dh.t(), rows_in[rows], out=grad_gate_up[g])
            if need_x:
                torch.mm(dh, gate_up[g], out=grad_rows_in[rows])
        grad_x = grad_rows_in
        if need_x and token_index is not None:
            grad_x = grad_rows_in.new_zeros(ctx.x_shape).index_add_(0, token_index, grad_rows_in)
        return grad_x, grad_gate_up, grad_down, None, None, grad_scores, None
