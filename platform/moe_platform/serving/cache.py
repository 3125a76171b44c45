"""The serving KV cache: the model's slot cache plus what continuous batching needs on top of it.

The model's `KVCache` gathers every bound slot's keys and values into a new tensor per layer and builds a boolean
mask. That is right for arbitrary slots, but a decode batch of 64 rows at ~600 positions then copies ~50 MB per layer
per step and SDPA converts the boolean mask for every layer. The scheduler therefore keeps decoding sequences packed
in slots [0, D) in slot order, so a decode step reads a *view* `k[layer, 0:D, :, :kv_len]` (no copy), and the mask
is built once per forward as an additive float mask. Prefill batches (arbitrary slots) still gather.

`move_slot` / `swap_slots` relocate a sequence's cached prefix; the scheduler uses them to keep the decode region
packed when sequences finish or finish their prefill.
"""

from __future__ import annotations

import torch

from moe_platform.model.args import ModelArgs
from moe_platform.model.kv_cache import KVCache


class ServingKVCache(KVCache):
    """A `KVCache` whose `bind_rows` uses slice views for contiguous ascending slots and an additive float mask."""

    def __init__(self, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__(args, num_slots, max_len, dtype=dtype, device=device)
        self._range: tuple[int, int] | None = None
        self._rows: torch.Tensor | None = None

    def bind_rows(self, slots: list[int], positions: torch.Tensor, mask_dtype: torch.dtype) -> ServingKVCache:
        """Bind batch row i to slot `slots[i]`; positions (B, T) are the absolute positions of each row's tokens."""
        if positions.dim() != 2 or len(slots) != positions.shape[0]:
            raise ValueError(f"bind_rows expects {len(slots)} slots and positions (B, T), got {tuple(positions.shape)}")
        top = int(positions.max())
        if top >= self.max_len:
            raise ValueError(f"position {top} is beyond the KV cache length {self.max_len}")
        lo = slots[0]
        contiguous = slots == list(range(lo, lo + len(slots)))
        self._range = (lo, lo + len(slots)) if contiguous else None
        slot_t = torch.tensor(slots, device=self.k.device)
        self._slots = slot_t
        self._positions = positions.to(self.k.device)
        self._rows = slot_t[:, None].expand_as(self._positions)  # (B, T): slot of every written token
        self._kv_len = top + 1
        keys = torch.arange(self._kv_len, device=self.k.device)
        hidden = keys[None, None, :] > self._positions[:, :, None]  # (B, T, kv_len): True = key is in the future
        mask = torch.zeros(hidden.shape, dtype=mask_dtype, device=self.k.device)
        self._mask = mask.masked_fill_(hidden, float("-inf"))[:, None]  # (B, 1, T, kv_len), broadcast over heads
        return self

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, KV, T, hd) at the bound positions; return this layer's keys/values so far and the mask."""
        assert self._rows is not None, "bind_rows() must be called before the forward pass"
        # Advanced indices (rows, positions) around a slice put (B, T) first: (B, T, KV, hd).
        self.k[layer, self._rows, :, self._positions] = k.permute(0, 2, 1, 3).to(self.k.dtype)
        self.v[layer, self._rows, :, self._positions] = v.permute(0, 2, 1, 3).to(self.v.dtype)
        if self._range is not None:
            lo, hi = self._range
            keys = self.k[layer, lo:hi, :, : self._kv_len]  # (B, KV, kv_len, hd) view, no copy
            values = self.v[layer, lo:hi, :, : self._kv_len]
        else:
            keys = self.k[layer, self._slots, :, : self._kv_len]  # gathered copy
            values = self.v[layer, self._slots, :, : self._kv_len]
        return keys.to(k.dtype), values.to(v.dtype), self._mask

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of slot `src` into slot `dst` (all layers)."""
        if src == dst or length <= 0:
            return
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the cached prefixes of slots `a` (length_a positions) and `b` (length_b positions)."""
        if a == b:
            return
        saved_k = self.k[:, a, :, :length_a].clone()
        saved_v = self.v[:, a, :, :length_a].clone()
        self.move_slot(b, a, length_b)
        self.k[:, b, :, :length_a] = saved_k
        self.v[:, b, :, :length_a] = saved_v
