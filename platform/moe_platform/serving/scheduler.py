"""Iteration-level scheduling: which sequences prefill (and how much) and which decode in the next engine step.

Two schedulers with one interface, one per KV-cache layout (`EngineConfig.kv_cache_layout`):

`PagedScheduler` (the default) gives each sequence KV blocks as its tokens need them (serving/kv_blocks.py):
requests are admitted while blocks are free, a new request first takes the cached blocks of its longest cached
prefix, and when blocks run out mid-decode the newest running sequences are preempted: their blocks are freed and
they go back to the head of the queue, to be recomputed (prompt and tokens so far, as one prefill whose last logits
give the next token) when blocks free up. Nothing fails for lack of KV memory.

`SlotScheduler` gives every running sequence one KV-cache slot of `max_seq_len` positions for its whole life, so
admission is simply "is a slot free". Slots are split in two regions: decoding sequences are packed in [0, D) in
slot order (a decode step then reads cache views, see `ServingKVCache`), and sequences still prefilling take the
highest free slots. A sequence that finishes its prompt moves to slot D; one that finishes generating is replaced by
the sequence in slot D-1. Moves copy only the cached prefix of one slot.

Neither scheduler touches a tensor. The paged one holds a `KVCacheManager` (block pool, prefix hashes,
allocate/free) and hands block tables to the model runner, which owns the KV tensors; the slot one queues its slot
moves (`take_kv_ops`), which the runner applies before its next forward. Both satisfy the `Scheduler` protocol, and
tests/unit/test_scheduler.py runs them with no model.

Prefill is chunked under a per-step token budget, so a 512-token prompt cannot stall running decodes for more than
one budget's worth of compute per step. Chunks are grouped into length buckets (powers of two) and each bucket runs
as one right-padded batch.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from moe_platform.serving.cache import PagedKVCache, ServingKVCache
from moe_platform.serving.kv_blocks import BlockPool, KVCacheManager
from moe_platform.serving.latent_cache import PagedLatentCache
from moe_platform.serving.sampling import SamplingParams

MIN_BUCKET = 16


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """One request's state. `num_computed` counts tokens whose keys/values are in the cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float
    sink: Callable[[Any], None] | None = None
    generator: Any = None
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    num_computed: int = 0
    output_ids: list[int] = field(default_factory=list)
    detokenizer: Any = None
    stopper: Any = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    adapter: str | None = None  # the LoRA adapter it runs with (serving/adapters.py), None for the base model
    adapter_slot: int = -1
    # Paged layout: the KV blocks of positions 0.. in order (with a sliding window, the full-attention layers'; the
    # sliding layers' in window_table, the scratch block where they slid out), the chained hashes of its full
    # blocks, and how many of its blocks are registered in the prefix cache.
    block_table: list[int] = field(default_factory=list)
    window_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0
    # With SamplingParams.prompt_logprobs: per prompt position, the log-probability entry of its token (None for
    # position 0 and until computed), filled as the prompt's chunks run; None once handed out with the first token.
    prompt_logprobs: list | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def prompt_remaining(self) -> int:
        """Tokens still to prefill: the prompt, or after a preemption the prompt and the tokens generated so far."""
        return max(0, self.num_tokens - self.num_computed)


@dataclass
class PrefillChunk:
    seq: SequenceState
    start: int  # first prompt position of the chunk
    length: int  # real (unpadded) tokens in the chunk

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """The chunk's positions whose logits score the prompt's next token (none unless the request asks): every
        position before the prompt's last, whose logits give the first generated token instead."""
        if self.seq.prompt_logprobs is None:
            return range(0)
        return range(self.start, min(self.start + self.length, self.seq.prompt_len - 1))


@dataclass
class PrefillGroup:
    """Chunks of one length bucket, run as one right-padded (rows, padded_len) forward."""

    bucket: int
    chunks: list[PrefillChunk]

    @property
    def padded_len(self) -> int:
        return max(c.length for c in self.chunks)


def bucket_of(length: int) -> int:
    """The power-of-two length bucket (at least MIN_BUCKET) that a chunk of `length` tokens falls into."""
    if length <= 0:
        raise ValueError(f"a prefill chunk needs at least one token, got {length}")
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def group_chunks(chunks: list[PrefillChunk]) -> list[PrefillGroup]:
    """Chunks by length bucket, shortest bucket first."""
    groups: dict[int, PrefillGroup] = {}
    for c in chunks:
        bucket = bucket_of(c.length)
        groups.setdefault(bucket, PrefillGroup(bucket, [])).chunks.append(c)
    return [groups[b] for b in sorted(groups)]


@dataclass(frozen=True)
class SlotMove:
    """Copy the first `length` cached positions of slot `src` into slot `dst` (slot layout)."""

    src: int
    dst: int
    length: int


@dataclass(frozen=True)
class SlotSwap:
    """Exchange the cached positions of slots `a` and `b` (their first `length_a` / `length_b`)."""

    a: int
    b: int
    length_a: int
    length_b: int


class Scheduler(Protocol):
    """What the engine core asks of a scheduler, whatever the KV layout. Not thread-safe (engine thread only)."""

    waiting: deque[SequenceState]
    max_batch_size: int

    @property
    def num_running(self) -> int: ...

    @property
    def prefilling(self) -> list[SequenceState]: ...

    def has_work(self) -> bool: ...

    def add(self, seq: SequenceState) -> None: ...

    def schedule_prefill(self) -> list[PrefillGroup]: ...

    def advance(self, seq: SequenceState, n: int) -> None: ...

    def prefill_done(self, seq: SequenceState) -> None: ...

    def decode_batch(self) -> list[SequenceState]: ...

    def finish(self, seq: SequenceState, reason: str) -> None: ...

    def find(self, request_id: str) -> SequenceState | None: ...

    def all_unfinished(self) -> list[SequenceState]: ...

    def kv_stats(self) -> dict: ...

    def take_kv_ops(self) -> list[SlotMove | SlotSwap]: ...


class SlotScheduler:
    """Owns the waiting queue, the slot table and the per-step prefill plan. Not thread-safe (engine thread only)."""

    def __init__(self, num_slots: int, max_batch_size: int, prefill_token_budget: int):
        if max_batch_size < 1 or max_batch_size > num_slots:
            raise ValueError(f"max_batch_size must be in [1, {num_slots}] (cache slots), got {max_batch_size}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be >= 1, got {prefill_token_budget}")
        self._kv_ops: list[SlotMove | SlotSwap] = []  # slot moves for the runner, in order
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[SequenceState] = deque()
        self.prefilling: list[SequenceState] = []  # admission order
        self.slot_owner: list[SequenceState | None] = [None] * max_batch_size
        self.num_decoding = 0  # D: decoding sequences occupy slots [0, D)
        self._free = set(range(max_batch_size))

    # -- queries -----------------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.num_decoding + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.num_decoding)

    def decode_batch(self) -> list[SequenceState]:
        """Decoding sequences in slot order: row i of the decode batch is slot i."""
        batch = self.slot_owner[: self.num_decoding]
        assert all(s is not None and s.status is SeqStatus.DECODE and s.slot == i for i, s in enumerate(batch))
        return batch  # type: ignore[return-value]

    # -- transitions -------------------------------------------------------------------------------------------------
    def add(self, seq: SequenceState) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule_prefill(self) -> list[PrefillGroup]:
        """Admit waiting sequences into free slots, then plan this step's prefill chunks under the token budget."""
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = max(self._free)
            self._free.remove(seq.slot)
            self.slot_owner[seq.slot] = seq
            seq.status = SeqStatus.PREFILL
            self.prefilling.append(seq)
        budget = self.prefill_token_budget
        chunks = []
        for seq in self.prefilling:
            if budget == 0:
                break
            n = min(seq.prompt_remaining, budget)
            budget -= n
            chunks.append(PrefillChunk(seq, seq.num_computed, n))
        return group_chunks(chunks)

    def take_kv_ops(self) -> list[SlotMove | SlotSwap]:
        """The slot moves since the last call, in order: the runner applies them before its next forward."""
        ops, self._kv_ops = self._kv_ops, []
        return ops

    def advance(self, seq: SequenceState, n: int) -> None:
        """`n` more of `seq`'s tokens are in the cache."""
        seq.num_computed += n

    def kv_stats(self) -> dict:
        """KV use in slots (kv_cache_used of kv_cache_capacity); nothing is ever preempted or shared."""
        return {"kv_cache_usage": self.num_running / self.max_batch_size, "kv_cache_used": self.num_running,
                "kv_cache_capacity": self.max_batch_size, "num_preemptions": 0, "prefix_cache_queries": 0,
                "prefix_cache_hits": 0}

    def prefill_done(self, seq: SequenceState) -> None:
        """`seq` has its whole prompt cached and its first token sampled: move it into the decode region."""
        assert seq.status is SeqStatus.PREFILL and seq.num_computed == seq.num_tokens - 1
        self.prefilling.remove(seq)
        target = self.num_decoding
        other = self.slot_owner[target]
        if other is None:
            self._kv_ops.append(SlotMove(seq.slot, target, seq.num_computed))
            self._free.add(seq.slot)
            self._free.discard(target)
            self.slot_owner[seq.slot] = None
        elif other is not seq:
            assert other.status is SeqStatus.PREFILL
            self._kv_ops.append(SlotSwap(seq.slot, target, seq.num_computed, other.num_computed))
            self.slot_owner[seq.slot] = other
            other.slot = seq.slot
        self.slot_owner[target] = seq
        seq.slot = target
        seq.status = SeqStatus.DECODE
        self.num_decoding += 1

    def finish(self, seq: SequenceState, reason: str) -> None:
        """Retire `seq` (finished, or aborted with reason "abort") and free its slot, keeping [0, D) packed."""
        if seq.status is SeqStatus.FINISHED:
            return
        status = seq.status
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if status is SeqStatus.WAITING:
            self.waiting.remove(seq)
            return
        slot = seq.slot
        if status is SeqStatus.PREFILL:
            self.prefilling.remove(seq)
        else:
            last = self.num_decoding - 1
            if slot != last:
                mover = self.slot_owner[last]
                assert mover is not None and mover.status is SeqStatus.DECODE
                self._kv_ops.append(SlotMove(last, slot, mover.num_computed))
                self.slot_owner[slot] = mover
                mover.slot = slot
                slot = last
            self.num_decoding -= 1
        self.slot_owner[slot] = None
        self._free.add(slot)
        seq.slot = -1

    def find(self, request_id: str) -> SequenceState | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        for seq in self.slot_owner:
            if seq is not None and seq.request_id == request_id:
                return seq
        return None

    def all_unfinished(self) -> list[SequenceState]:
        return list(self.waiting) + [s for s in self.slot_owner if s is not None]


class PagedScheduler:
    """Owns the waiting queue, the running sequences (admission order: the newest is preempted first), their block
    tables and the per-step prefill plan. Not thread-safe (engine thread only)."""

    def __init__(self, kv: KVCacheManager, max_batch_size: int, prefill_token_budget: int):
        if max_batch_size < 1 or prefill_token_budget < 1:
            raise ValueError(f"max_batch_size and prefill_token_budget must be >= 1, got {max_batch_size}, "
                             f"{prefill_token_budget}")
        self.kv = kv
        self.block_size = kv.block_size
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[SequenceState] = deque()
        self.running: list[SequenceState] = []
        self.num_preemptions = 0

    # -- queries -----------------------------------------------------------------------------------------------------
    @property
    def prefilling(self) -> list[SequenceState]:
        return [s for s in self.running if s.status is SeqStatus.PREFILL]

    @property
    def num_decoding(self) -> int:
        return sum(1 for s in self.running if s.status is SeqStatus.DECODE)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_stats(self) -> dict:
        """KV use in blocks (kv_cache_used of kv_cache_capacity), preemptions and the prefix cache's queries and hits
        (tokens) so far."""
        return {**self.kv.stats(), "num_preemptions": self.num_preemptions}

    def take_kv_ops(self) -> list[SlotMove | SlotSwap]:
        return []  # blocks never move: the runner reads the block tables

    def _blocks_for(self, seq: SequenceState, tokens: int) -> int:
        """New blocks `seq` needs to hold `tokens` positions."""
        return self.kv.blocks_needed(seq, tokens)

    def _decode_reserve(self) -> int:
        """Blocks the decoding sequences need for their next token (admission leaves them free)."""
        return sum(1 for s in self.running if s.status is SeqStatus.DECODE and self._blocks_for(s, s.num_computed + 1))

    # -- transitions -------------------------------------------------------------------------------------------------
    def add(self, seq: SequenceState) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule_prefill(self) -> list[PrefillGroup]:
        """Plan this step's prefill chunks under the token budget: running prefills go on (as far as blocks allow),
        then waiting sequences are admitted, each first taking its cached prefix, while blocks are free."""
        budget = self.prefill_token_budget
        chunks = []
        for seq in self.prefilling:
            if budget == 0:
                break
            n = self._grow(seq, min(seq.prompt_remaining, budget))
            if n:
                budget -= n
                chunks.append(PrefillChunk(seq, seq.num_computed, n))
        reserve = self._decode_reserve()
        while self.waiting and budget and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            tokens = seq.all_ids
            hit, max_hit = self.kv.cached_prefix(tokens, seq.adapter, seq.block_hashes)
            if seq.prompt_logprobs is not None:
                # Scoring the prompt needs the logits of every position, so a cached prefix is computed again (as
                # vLLM does); its blocks are still registered for the requests after it.
                hit, max_hit = [], 0
            start = len(hit) * self.block_size
            n = min(len(tokens) - start, budget)
            need = (-(-(start + n) // self.block_size) - len(hit)) * len(self.kv.tables(seq))
            if self.kv.admission_room(hit, need, seq.block_hashes) < reserve:
                break  # wait for blocks; the queue keeps its order
            self.waiting.popleft()
            seq.num_computed, seq.num_registered = start, len(hit)
            self.kv.admit(seq, hit, max_hit, start + n)
            seq.status = SeqStatus.PREFILL
            self.running.append(seq)
            budget -= n
            chunks.append(PrefillChunk(seq, start, n))
        return group_chunks(chunks)

    def _grow(self, seq: SequenceState, n: int) -> int:
        """Allocate blocks for up to `n` more tokens of `seq`; return how many tokens its blocks now hold room for."""
        self.kv.grow(seq, seq.num_computed + n)
        return min(n, self.kv.room(seq) - seq.num_computed)

    def advance(self, seq: SequenceState, n: int) -> None:
        """`n` more of `seq`'s tokens are in the cache: register its newly full blocks in the prefix cache."""
        seq.num_computed += n
        self.kv.register_full(seq, seq.num_computed // self.block_size)

    def prefill_done(self, seq: SequenceState) -> None:
        """`seq` has all its tokens cached and its next token sampled: it decodes from the next step on."""
        assert seq.status is SeqStatus.PREFILL and seq.num_computed == seq.num_tokens - 1
        seq.status = SeqStatus.DECODE

    def decode_batch(self) -> list[SequenceState]:
        """The decoding sequences, each with a block for its next token: when none is free, the newest running
        sequence is preempted (possibly the one asking) until one is."""
        for seq in [s for s in self.running if s.status is SeqStatus.DECODE]:
            while seq.status is SeqStatus.DECODE and self._blocks_for(seq, seq.num_computed + 1):
                if self.kv.num_free:
                    self.kv.grow(seq, seq.num_computed + 1)
                else:
                    self.preempt(self.running[-1])
        return [s for s in self.running if s.status is SeqStatus.DECODE]

    def preempt(self, seq: SequenceState) -> None:
        """Free `seq`'s blocks and put it back at the head of the queue, to be recomputed later."""
        self._release(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: SequenceState) -> None:
        self.kv.free(seq)  # empties its block tables
        seq.num_registered = 0

    def finish(self, seq: SequenceState, reason: str) -> None:
        """Retire `seq` (finished, or aborted with reason "abort") and free its blocks."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def find(self, request_id: str) -> SequenceState | None:
        for seq in itertools.chain(self.waiting, self.running):
            if seq.request_id == request_id:
                return seq
        return None

    def all_unfinished(self) -> list[SequenceState]:
        return list(self.waiting) + list(self.running)


def build_scheduler(args, config, max_seq_len: int, dtype, device) -> tuple[ServingKVCache | PagedKVCache, Scheduler]:
    """The KV cache (its tensors, for the model runner) and its scheduler for an `EngineConfig` (serving/engine.py)
    on `device`.

    Paged: `kv_cache_memory_bytes` of blocks; 0 sizes it at `kv_cache_memory_fraction` of the free device memory on
    CUDA, and on the CPU at what `max_batch_size` sequences of `max_seq_len` tokens take. A multi-head latent
    attention model's blocks hold its latents (`mla_kv_cache: latent`, serving/latent_cache.py) unless told to hold
    expanded keys and values. Slots: `max_batch_size` slots of `max_seq_len` (+ one prefill budget of padding room),
    or as many as `kv_cache_memory_bytes` holds."""
    import torch

    paged = PagedLatentCache if args.mla and config.mla_kv_cache == "latent" else PagedKVCache
    per_token = (PagedKVCache if config.kv_cache_layout == "slots" else paged).bytes_per_token(
        args, dtype, config.kv_cache_dtype)
    groups = kv_layer_groups(args) if config.windowed_kv_cache else [list(range(args.n_layers))]
    budget = config.kv_cache_memory_bytes
    if config.kv_cache_layout == "slots":
        cache_len = max_seq_len + config.prefill_token_budget  # right padding of a chunk writes past the prompt
        slots = config.max_batch_size if not budget else min(config.max_batch_size, budget // (per_token * cache_len))
        if slots < 1:
            raise ValueError(f"engine option kv_cache_memory_bytes={budget} holds no slot of {cache_len} positions "
                             f"({per_token * cache_len} bytes); raise it or lower max_seq_len")
        cache = ServingKVCache(args, slots, cache_len, dtype=dtype, device=device)
        return cache, SlotScheduler(slots, slots, config.prefill_token_budget)
    if not budget:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * config.kv_cache_memory_fraction)
        else:
            budget = config.max_batch_size * max_seq_len * per_token
    bs = config.block_size
    num_blocks = budget * len(groups) // (per_token * bs)  # a block holds one layer group's keys and values
    # one full-length sequence (with a window: in both groups, as a prompt prefilled whole holds them at once)
    one_sequence = -(-max_seq_len // bs) * len(groups)
    if num_blocks < one_sequence:
        raise ValueError(f"engine option kv_cache_memory_bytes={budget} holds {num_blocks} KV blocks of {bs} tokens "
                         f"({per_token * bs // len(groups)} bytes each), but one sequence of max_seq_len "
                         f"{max_seq_len} needs {one_sequence}; raise kv_cache_memory_bytes or lower max_seq_len")
    cache = paged(args, num_blocks + 1, bs, dtype=dtype, device=device, kv_dtype=config.kv_cache_dtype,
                  **({"layer_groups": groups} if len(groups) > 1 else {}))
    pool = BlockPool(num_blocks + 1, bs, config.enable_prefix_caching)
    kv = KVCacheManager(pool, args.sliding_window if len(groups) > 1 else 0)
    return cache, PagedScheduler(kv, config.max_batch_size, config.prefill_token_budget)


def kv_layer_groups(args) -> list[list[int]]:
    """The layer groups a paged KV block holds one of: the full-attention layers and the sliding-window layers when a
    model has equally many of each (gpt-oss; the sliding group then keeps only its window's blocks), else all
    layers in one group (sliding layers, if any, mask their window)."""
    sliding = sorted(args.sliding_layer_ids)
    full = [i for i in range(args.n_layers) if i not in args.sliding_layer_ids]
    return [full, sliding] if sliding and len(sliding) == len(full) else [list(range(args.n_layers))]
