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

from typing import NamedTuple

import torch

from moe_platform.model.args import ModelArgs
from moe_platform.model.attention import attend
from moe_platform.model.kv_cache import KVCache


def causal_mask(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, kv_len) on positions' device: -inf where key position > the query's position (B, T),
    broadcast over heads."""
    keys = torch.arange(kv_len, device=positions.device)
    hidden = keys[None, None, :] > positions[:, :, None]
    return torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, float("-inf"))[:, None]


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
        self._mask = causal_mask(self._positions, self._kv_len, mask_dtype)
        return self

    def window_mask(self, window: int) -> torch.Tensor:
        """The additive mask of a sliding-window layer: also -inf for keys more than window - 1 before the query."""
        keys = torch.arange(self._kv_len, device=self.k.device)
        too_old = (keys[None, None, :] <= self._positions[:, :, None] - window)[:, None]
        return self._mask.masked_fill(too_old, float("-inf"))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int = 0):
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
        return keys.to(k.dtype), values.to(v.dtype), self.window_mask(window) if window else self._mask

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


KV_CACHE_DTYPES = ("auto", "int8", "fp8")
GROUP_SPAN = 1.5


class RowGroup(NamedTuple):
    """Rows of a bound batch attended together: their indices (None: the whole batch, in its order), the blocks to
    read (rows x width, flat), how many rows, the keys they attend, their causal additive mask (n, 1, T, kv_len)
    and their token positions (n, T) on the cache's device."""

    rows: torch.Tensor | None
    read: torch.Tensor
    n: int
    kv_len: int
    mask: torch.Tensor
    positions: torch.Tensor


class Binding(NamedTuple):
    """One layer group's view of a bound batch: the slots its new keys and values go to, and its row groups."""

    write: torch.Tensor
    groups: list[RowGroup]


class PagedKVCache:
    """Keys and values in blocks of `block_size` positions: per layer and KV head a (num_blocks * block_size, hd)
    table of token slots, block after block. `bind(block_tables, positions)` maps every written token to its slot;
    `attend` (called by the model's attention in place of its own) scatters the new keys/values there, gathers each
    row's blocks (whole blocks, in table order; past a row's blocks, the scratch block 0, masked) into
    (rows, KV, kv_len, hd), each row's and head's keys contiguous as attention reads them, and runs attention.

    `kv_dtype`: auto stores the model's dtype; int8 and fp8 store each token's head vector as int8 or float8_e4m3fn
    (kept as its bytes, which every device can index) with one float32 scale per token and head (absmax / 127 or
    / 448), dequantized on read.

    `layer_groups` (gpt-oss: its full-attention layers, then its sliding-window layers, equally many): a block then
    holds one group's layers, and each group has its own block tables (serving/kv_blocks.py's KVCacheManager): the
    sliding group's hold only the window's blocks, and attention there reads only them.
    """

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", kv_dtype: str = "auto",
                 widths: tuple[int, int, int] | None = None, layer_groups: list[list[int]] | None = None):
        """`widths`: (heads, key dims, value dims) of the two tables; default the model's KV heads and head dims."""
        if kv_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_dtype!r}")
        groups = layer_groups or [list(range(args.n_layers))]
        if len({len(g) for g in groups}) != 1:
            raise ValueError(f"KV layer groups must be equally large, got {groups}")
        self.layer_groups = groups
        self._where = {layer: (g, i) for g, layers in enumerate(groups) for i, layer in enumerate(layers)}
        self.window = args.sliding_window if len(groups) > 1 else 0
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_dtype = kv_dtype
        store = {"auto": dtype, "int8": torch.int8, "fp8": torch.uint8}[kv_dtype]
        heads, k_dim, v_dim = widths or (args.kv_heads, args.qk_head_dim, args.value_head_dim)
        shape = (len(groups[0]), heads, num_blocks * block_size)
        self.k = torch.zeros(shape + (k_dim,), dtype=store, device=device)
        self.v = torch.zeros(shape + (v_dim,), dtype=store, device=device)
        self.k_scale = self.v_scale = None
        if kv_dtype != "auto":
            self.k_scale = torch.ones(shape + (1,), dtype=torch.float32, device=device)
            self.v_scale = torch.ones(shape + (1,), dtype=torch.float32, device=device)
        self._bindings: list[Binding] = []
        self._window_masks: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def _write(self) -> torch.Tensor | None:
        return self._bindings[0].write if self._bindings else None

    @property
    def _groups(self) -> list[RowGroup]:
        return self._bindings[0].groups if self._bindings else []

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """KV bytes one token position takes over all layers (keys and values, with int8's and fp8's scales)."""
        elem = {"auto": torch.empty(0, dtype=dtype).element_size(), "int8": 1, "fp8": 1}[kv_dtype]
        per_head = (args.qk_head_dim + args.value_head_dim) * elem + (8 if kv_dtype != "auto" else 0)
        return args.n_layers * args.kv_heads * per_head

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else 2 * self.k_scale.numel() * 4
        return (self.k.numel() + self.v.numel()) * self.k.element_size() + scales

    def bind(self, block_tables: list[list[int]], positions: torch.Tensor, mask_dtype: torch.dtype,
             window_tables: list[list[int]] | None = None) -> PagedKVCache:
        """Row i uses the blocks `block_tables[i]` (and the sliding layers `window_tables[i]`); positions (B, T) are
        the absolute positions of its tokens.

        Rows are grouped by how many keys they attend (sorted; a new group starts where a row needs over
        `GROUP_SPAN` times the keys of its group's first), and each group gathers and attends only up to its own
        longest row: a batch of a 30-token and a 700-token sequence does not pad the first to 700."""
        if positions.dim() != 2 or len(block_tables) != positions.shape[0]:
            raise ValueError(f"bind expects {len(block_tables)} block tables and positions (B, T), got "
                             f"{tuple(positions.shape)}")
        positions = positions.cpu()
        self._bindings = [self._bind_full(block_tables, positions, mask_dtype)]
        if self.window:
            self._bindings.append(self._bind_window(window_tables, positions, mask_dtype))
        self._window_masks = {}
        return self

    def _slots(self, block_tables: list[list[int]], positions: torch.Tensor, width: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
        """The (B, width) block table tensor (scratch past each row's blocks) and the flat slot of every token."""
        bs = self.block_size
        table = torch.zeros((len(block_tables), width), dtype=torch.long)  # 0: the scratch block
        for i, blocks in enumerate(block_tables):
            row = blocks[:width]
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        write = table.gather(1, positions // bs) * bs + positions % bs
        return table, write.flatten().to(self.k.device)

    def _bind_full(self, block_tables, positions: torch.Tensor, mask_dtype) -> Binding:
        bs = self.block_size
        lengths = (positions.max(dim=1).values + 1).tolist()  # keys each row attends
        table, write = self._slots(block_tables, positions, -(-max(lengths) // bs))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        groups, current = [], [order[0]]
        for i in order[1:]:
            if lengths[i] > GROUP_SPAN * lengths[current[0]]:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        if len(groups) == 1:
            groups = [list(range(len(lengths)))]  # one group: the batch's own row order, no reordering
        device = self.k.device
        out = []
        for rows in groups:
            kv_len = max(lengths[i] for i in rows)
            idx = torch.tensor(rows, dtype=torch.long)
            pos = positions[idx]
            mask = causal_mask(pos, kv_len, mask_dtype)
            whole = len(rows) == len(lengths)
            out.append(RowGroup(None if whole else idx.to(device), table[idx, : -(-kv_len // bs)].flatten().to(device),
                                len(rows), kv_len, mask.to(device), pos.to(device)))
        return Binding(write, out)

    def _bind_window(self, window_tables, positions: torch.Tensor, mask_dtype) -> Binding:
        """The sliding layers' binding: each row reads from the first block of its first query's window on, and
        its mask keeps the keys of each query's window (positions q - window + 1 .. q)."""
        bs, window = self.block_size, self.window
        last = (positions.max(dim=1).values // bs).tolist()
        first = [max(0, p - window + 1) // bs for p in positions.min(dim=1).values.tolist()]
        width = max(b - a + 1 for a, b in zip(first, last, strict=True))
        table, write = self._slots(window_tables, positions, max(last) + 1)
        read = torch.zeros((len(first), width), dtype=torch.long)
        for i, (a, b) in enumerate(zip(first, last, strict=True)):
            read[i, : b - a + 1] = table[i, a:b + 1]
        offset = torch.tensor(first, dtype=torch.long)[:, None] * bs
        keys = offset + torch.arange(width * bs)  # (B, kv_len): each read key's absolute position
        visible = (keys[:, None, :] <= positions[:, :, None]) & (keys[:, None, :] > positions[:, :, None] - window)
        mask = torch.zeros(visible.shape, dtype=mask_dtype).masked_fill_(~visible, float("-inf"))[:, None]
        device = self.k.device
        return Binding(write, [RowGroup(None, read.flatten().to(device), len(first), width * bs, mask.to(device),
                                        positions.to(device))])

    def group_mask(self, g: int, window: int = 0) -> torch.Tensor:
        """Row group g's additive mask, for a sliding-window layer's `window` when > 0 (built once per bind)."""
        group = self._groups[g]
        if not window:
            return group.mask
        if (g, window) not in self._window_masks:
            keys = torch.arange(group.kv_len, device=group.mask.device)
            too_old = (keys[None, None, :] <= group.positions[:, :, None] - window)[:, None]
            self._window_masks[(g, window)] = group.mask.masked_fill(too_old, float("-inf"))
        return self._window_masks[(g, window)]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
               window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Store k, v (B, KV, T, hd) at the bound slots, then attend q (B, H, T, hd) to each row's keys so far,
        group by group -> (B, H, T, v hd). `scale`: the softmax scale (default 1/sqrt(hd)); `window`: a
        sliding-window layer's window (0: every earlier key); `sinks` (H,): learned sink logits (gpt-oss)."""
        assert self._bindings, "bind() must be called before the forward pass"
        g_layer, local = self._where[layer]
        binding = self._bindings[g_layer]
        self._store(local, self.k, self.k_scale, k, binding.write)
        self._store(local, self.v, self.v_scale, v, binding.write)
        out = None
        for g, (rows, read, n, kv_len, mask, _) in enumerate(binding.groups):
            keys = self._gather(local, self.k, self.k_scale, read, n, kv_len, q.dtype)
            values = self._gather(local, self.v, self.v_scale, read, n, kv_len, q.dtype)
            if window and not g_layer:  # a sliding layer sharing the full layers' blocks: masked to its window
                mask = self.group_mask(g, window)
            part = attend(q if rows is None else q[rows], keys, values, mask, sinks, scale)
            if rows is None:
                return part
            if out is None:
                out = q.new_empty(*q.shape[:-1], v.shape[-1])
            out[rows] = part
        return out

    def _store(self, layer: int, table: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor,
               write: torch.Tensor | None = None) -> None:
        """Write x (B, KV, T, hd) into `table` at the bound slots (`write`, default the first layer group's),
        quantized with its scales for int8 and fp8."""
        write = self._write if write is None else write
        flat = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3])  # (KV, B*T, hd)
        if scale is None:
            table[layer].index_copy_(1, write, flat.to(table.dtype))
            return
        top = 127.0 if self.kv_dtype == "int8" else 448.0  # the largest int8 / float8_e4m3fn value used
        s = flat.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / top
        q = flat.float() / s
        q = q.round_().clamp_(-127, 127).to(torch.int8) if self.kv_dtype == "int8" else \
            q.to(torch.float8_e4m3fn).view(torch.uint8)
        table[layer].index_copy_(1, write, q)
        scale[layer].index_copy_(1, write, s)

    def _gather(self, layer: int, table: torch.Tensor, scale: torch.Tensor | None, read: torch.Tensor, rows: int,
                kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        """The blocks `read` (rows x width, flat) of one layer -> (rows, KV, kv_len, hd) in `dtype`."""
        heads, _, hd = table.shape[1:]
        bs = self.block_size
        blocks = table[layer].view(heads, -1, bs, hd).index_select(1, read)  # (KV, rows*width, bs, hd)
        if scale is not None:
            blocks = blocks.float() if self.kv_dtype == "int8" else blocks.view(torch.float8_e4m3fn).float()
            blocks = blocks * scale[layer].view(heads, -1, bs, 1).index_select(1, read)
        blocks = blocks.to(dtype)
        return blocks.view(heads, rows, -1, hd)[:, :, :kv_len].transpose(0, 1)
