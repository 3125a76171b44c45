"""A preallocated slot-based KV cache: each running sequence owns one slot; rows of a batch may sit at any position.

The model calls `update(layer, k, v)`; everything about which slot and which positions a batch row uses is set once per
forward by `bind(slots, positions)`, so the model code knows nothing about batching policy.
"""

from __future__ import annotations

import torch

from moe_platform.model.args import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, num_slots: int, max_len: int | None = None, dtype=torch.float32,
                 device: torch.device | str = "cpu", n_kv_heads: int | None = None):
        max_len = max_len or args.max_seq_len
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs num_slots > 0 and max_len > 0, got {num_slots}, {max_len}")
        kv_heads = n_kv_heads or args.kv_heads
        shape = (args.n_layers, num_slots, kv_heads, max_len)
        self.k = torch.zeros(shape + (args.qk_head_dim,), dtype=dtype, device=device)
        self.v = torch.zeros(shape + (args.value_head_dim,), dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len
        self._slots: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()

    def bind(self, slots: torch.Tensor, positions: torch.Tensor) -> KVCache:
        """Set the slot of each batch row (B,) and the absolute position of each token (B, T) for the next forward."""
        if positions.dim() != 2 or slots.shape[0] != positions.shape[0]:
            raise ValueError(f"bind expects slots (B,) and positions (B, T), got {tuple(slots.shape)} and "
                             f"{tuple(positions.shape)}")
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"position {top} is beyond the KV cache length {self.max_len}")
        self._slots = slots.to(self.k.device)
        self._positions = positions.to(self.k.device)
        self._kv_len = top + 1
        # A query at position p sees keys 0..p of its own slot: (B, 1, T, kv_len), True = attend.
        keys = torch.arange(self._kv_len, device=self.k.device)
        self._mask = (keys[None, None, :] <= self._positions[:, :, None])[:, None]
        return self

    def window_mask(self, window: int) -> torch.Tensor:
        """The bound batch's mask for a sliding-window layer: a query at position p sees keys p - window + 1..p."""
        keys = torch.arange(self._kv_len, device=self.k.device)
        return self._mask & (keys[None, None, :] > self._positions[:, :, None] - window)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int = 0):
        """Store k, v (B, KV, T, hd) at the bound positions; return this layer's keys/values so far and the mask
        (of a sliding-window layer's `window` when > 0)."""
        assert self._slots is not None, "bind() must be called before the forward pass"
        bsz, _, seq, _ = k.shape
        rows = self._slots[:, None].expand(bsz, seq)
        # Advanced indices (rows, positions) around a slice put (B, T) first: (B, T, KV, hd).
        self.k[layer, rows, :, self._positions] = k.permute(0, 2, 1, 3).to(self.k.dtype)
        self.v[layer, rows, :, self._positions] = v.permute(0, 2, 1, 3).to(self.v.dtype)
        keys = self.k[layer, self._slots, :, : self._kv_len].to(k.dtype)  # (B, KV, kv_len, hd)
        values = self.v[layer, self._slots, :, : self._kv_len].to(v.dtype)
        return keys, values, self.window_mask(window) if window else self._mask
