"""KV-cache blocks: the pool of fixed-size blocks, their reference counts, and the automatic prefix cache.

A sequence's keys and values live in blocks of `block_size` token positions listed in its block table; it holds
blocks only for the tokens it has, so KV memory grows with the tokens in use. Block 0 is scratch: right padding of a
prefill batch writes there, and nothing ever reads it unmasked.

Prefix caching. Once every position of a block is computed, the block is registered under a content hash chained
over all the tokens before it (and the LoRA adapter, whose keys differ): `hash(parent hash, adapter, block tokens)`.
A new sequence whose first blocks' hashes are registered takes those blocks (reference count + 1) instead of
computing them. A block whose last user finishes keeps its hash and joins an LRU list; allocation takes never-hashed
blocks first, then evicts the least recently freed hashed block (dropping its hash). Shared blocks are full, so they
are never written again: a sequence writes only into its own tail blocks (a prompt that hits the cache in full still
recomputes its last token, in a block of its own, to get the logits for its first output token). Copy-on-write is
therefore never needed, as in vLLM's V1 engine.

Pure Python bookkeeping (no tensors, no threads): the paged scheduler's `KVCacheManager` owns the pool on the engine
thread; the model runner owns the tensors the block ids point into.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

SCRATCH_BLOCK = 0


def block_hashes(tokens: Sequence[int], block_size: int, adapter: str | None, known: list[bytes]) -> list[bytes]:
    """Extend `known` (the chained hashes of the first blocks of `tokens`) to every full block of `tokens`."""
    full = len(tokens) // block_size
    parent = known[-1] if known else (adapter or "").encode()
    for i in range(len(known), full):
        chunk = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        known.append(parent)
    return known


class BlockPool:
    """`num_blocks` blocks (block 0 is scratch), reference counts, and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._plain: list[int] = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # popped from the end: 1, 2, ...
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free hashed blocks, least recently freed first
        # Prefix-cache statistics, in tokens (as vLLM's prefix_cache_queries / prefix_cache_hits).
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    # -- queries -----------------------------------------------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (never-hashed ones and evictable cached ones)."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_usable - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """The fraction of usable blocks held by running sequences (cached free blocks count as free)."""
        return self.num_used / self.num_usable

    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    # -- allocation --------------------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks with reference count 1, or None (nothing taken) when fewer are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._plain:
                block = self._plain.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash[block]]  # type: ignore[index]
                self._hash[block] = None
                self.evictions += 1
            self.ref[block] = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds becomes free (evictable last, if hashed). Pass a
        sequence's blocks tail first, so that its later blocks, the least shareable, are evicted first."""
        for block in blocks:
            self.ref[block] -= 1
            assert self.ref[block] >= 0, f"block {block} freed twice"
            if self.ref[block] == 0:
                if self._hash[block] is None:
                    self._plain.append(block)
                else:
                    self._evictable[block] = None

    # -- prefix cache ------------------------------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """The cached blocks holding the longest run of `hashes[:max_blocks]` (nothing is taken)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for h in hashes[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def reclaimable(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` are free now (taking them lowers `num_free`)."""
        return sum(1 for b in blocks if self.ref[b] == 0)

    def acquire(self, blocks: Sequence[int], query_tokens: int | None) -> None:
        """Take (reference + 1) blocks found by `lookup` for a sequence that looked up `query_tokens` tokens; counts
        the query and the hit, in tokens, towards the hit rate (None: not counted, the blocks of another layer group
        for the same tokens)."""
        for block in blocks:
            if self.ref[block] == 0:
                del self._evictable[block]
            self.ref[block] += 1
        if query_tokens is not None:
            self.queries += query_tokens
            self.hits += len(blocks) * self.block_size

    def register(self, block: int, h: bytes) -> None:
        """Record that `block` (full, held by a sequence) holds the content hashed `h`. A block with the same content
        already cached stays the one that later sequences find; this block is then simply not shared."""
        if not self.enable_prefix_caching or self._hash[block] is not None or h in self._cached:
            return
        self._hash[block] = h
        self._cached[h] = block

    def reset_prefix_cache(self) -> int:
        """Forget every cached block nobody holds (e.g. after new weights); returns how many were dropped."""
        dropped = list(self._evictable)
        self._evictable.clear()
        for block in dropped:
            del self._cached[self._hash[block]]  # type: ignore[index]
            self._hash[block] = None
            self._plain.append(block)
        return len(dropped)


class KVCacheManager:
    """The paged scheduler's view of KV memory: which blocks each sequence holds, the prefix cache's hashes of its
    full blocks, and allocate/free on the `BlockPool`. Bookkeeping only: the model runner owns the KV tensors and
    reads the block tables the scheduler hands it.

    With `window` > 0 the model's layers form two equal groups, full attention and sliding window (gpt-oss), and a
    block holds one group's keys and values for `block_size` positions. A sequence then has two tables:
    `block_table` (the full layers: every position) and `window_table` (the sliding layers), whose blocks are freed
    as they slide out of the window of the next query (their entries become the scratch block) and go back to the
    pool for any sequence and either group. Both groups' full blocks are registered in the prefix cache (the sliding
    group's under its own hashes); a prefix hit needs the full group's blocks of the whole prefix and the sliding
    group's blocks of the prefix's last window."""

    def __init__(self, pool: BlockPool, window: int = 0):
        self.pool = pool
        self.block_size = pool.block_size
        self.window = window

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def tables(self, seq) -> list[list[int]]:
        return [seq.block_table, seq.window_table] if self.window else [seq.block_table]

    def blocks_needed(self, seq, tokens: int) -> int:
        """New blocks `seq` needs for `tokens` positions (in both tables, with a window)."""
        return sum(max(0, -(-tokens // self.block_size) - len(t)) for t in self.tables(seq))

    def first_needed(self, position: int) -> int:
        """The first block the sliding layers read for a query at `position`."""
        return max(0, position - self.window + 1) // self.block_size

    def cached_prefix(self, tokens: list[int], adapter: str | None, known: list[bytes]) -> tuple[list[int], int]:
        """(cached blocks of the longest cached prefix of `tokens`, the most blocks a hit may cover): a prompt cached
        in full still computes its last token, whose logits give the first output token. `known` caches hashes.
        With a window, the hit is cut to the longest prefix whose last window is cached in the sliding group too."""
        max_hit = (len(tokens) - 1) // self.block_size
        if not max_hit:
            return [], 0
        hashes = block_hashes(tokens, self.block_size, adapter, known)
        hit = self.pool.lookup(hashes, max_hit)
        while self.window and hit and len(self._window_hit(hashes, len(hit))) != len(hit) - self.first_needed(
                len(hit) * self.block_size):
            hit = hit[:-1]
        return hit, max_hit

    def _window_hit(self, hashes: list[bytes], n: int) -> list[int]:
        """The sliding group's cached blocks of blocks [first needed, n) of a prefix of n blocks."""
        first = self.first_needed(n * self.block_size)
        found = []
        for h in hashes[first:n]:
            block = self.pool.lookup([_windowed(h)], 1)
            if not block:
                break
            found += block
        return found

    def admission_room(self, hit: list[int], need: int, known: list[bytes] | None = None) -> int:
        """Free blocks left once a sequence takes its cached prefix `hit` (with its window's blocks) and `need` new
        ones."""
        taken = hit + (self._window_hit(known, len(hit)) if self.window and hit else [])
        return self.pool.num_free - self.pool.reclaimable(taken) - need

    def admit(self, seq, hit: list[int], max_hit: int, tokens: int) -> None:
        """Give `seq` its cached prefix `hit` and new blocks for `tokens` positions."""
        self.pool.acquire(hit, max_hit * self.block_size)
        seq.block_table = list(hit)
        if self.window:
            window = self._window_hit(seq.block_hashes, len(hit)) if hit else []
            self.pool.acquire(window, None)
            seq.window_table = [SCRATCH_BLOCK] * (len(hit) - len(window)) + window
        self.grow(seq, tokens)

    def grow(self, seq, tokens: int) -> None:
        """Give `seq` blocks for up to `tokens` positions, table by table, as far as blocks are free."""
        for table in self.tables(seq):
            want = max(0, -(-tokens // self.block_size) - len(table))
            if want:
                table += self.pool.allocate(min(want, self.pool.num_free)) or []

    def room(self, seq) -> int:
        """Positions `seq`'s tables hold room for (the shorter table's)."""
        return min(len(t) for t in self.tables(seq)) * self.block_size

    def register_full(self, seq, full: int) -> None:
        """Register blocks [num_registered, full) of `seq` in the prefix cache (the sliding group's where it still
        holds them), and free the sliding blocks the next query no longer reads."""
        if full > seq.num_registered and self.pool.enable_prefix_caching:
            hashes = block_hashes(seq.all_ids[: full * self.block_size], self.block_size, seq.adapter,
                                  seq.block_hashes)
            for j in range(seq.num_registered, full):
                self.pool.register(seq.block_table[j], hashes[j])
                if self.window and seq.window_table[j] != SCRATCH_BLOCK:
                    self.pool.register(seq.window_table[j], _windowed(hashes[j]))
        seq.num_registered = max(seq.num_registered, full)
        if self.window:
            for j in range(min(self.first_needed(seq.num_computed), len(seq.window_table))):
                if seq.window_table[j] != SCRATCH_BLOCK:
                    self.pool.free([seq.window_table[j]])
                    seq.window_table[j] = SCRATCH_BLOCK

    def free(self, seq) -> None:
        """Give a sequence's blocks back, tail first (so its prefix stays cached longest)."""
        for table in self.tables(seq):
            self.pool.free([b for b in table[::-1] if b != SCRATCH_BLOCK])
            table.clear()

    def stats(self) -> dict:
        pool = self.pool
        return {"kv_cache_usage": pool.usage(), "kv_cache_used": pool.num_used, "kv_cache_capacity": pool.num_usable,
                "prefix_cache_queries": pool.queries, "prefix_cache_hits": pool.hits}


def _windowed(h: bytes) -> bytes:
    """The sliding group's key for a block of content hash `h` (its blocks hold other layers' keys and values)."""
    return hashlib.blake2b(b"window" + h, digest_size=16).digest()
