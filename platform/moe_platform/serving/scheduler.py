"""Iteration-level scheduling: which sequences prefill (and how much) and which decode in the next engine step.

Every running sequence owns one KV-cache slot for its whole life, so admission is simply "is a slot free". Slots are
split in two regions: decoding sequences are packed in [0, D) in slot order (a decode step then reads cache views,
see `ServingKVCache`), and sequences still prefilling take the highest free slots. A sequence that finishes its
prompt moves to slot D; one that finishes generating is replaced by the sequence in slot D-1. Moves copy only the
cached prefix of one slot.

Prefill is chunked under a per-step token budget, so a 512-token prompt cannot stall running decodes for more than
one budget's worth of compute per step. Chunks are grouped into length buckets (powers of two) and each bucket runs
as one right-padded batch.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moe_platform.serving.cache import ServingKVCache
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
    emitted_chars: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_reason: str | None = None
    adapter: str | None = None  # the LoRA adapter it runs with (serving/adapters.py), None for the base model
    adapter_slot: int = -1

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prompt_remaining(self) -> int:
        return max(0, self.prompt_len - self.num_computed)


@dataclass
class PrefillChunk:
    seq: SequenceState
    start: int  # first prompt position of the chunk
    length: int  # real (unpadded) tokens in the chunk

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == self.seq.prompt_len


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


class Scheduler:
    """Owns the waiting queue, the slot table and the per-step prefill plan. Not thread-safe (engine thread only)."""

    def __init__(self, cache: ServingKVCache, max_batch_size: int, prefill_token_budget: int):
        if max_batch_size < 1 or max_batch_size > cache.num_slots:
            raise ValueError(f"max_batch_size must be in [1, {cache.num_slots}] (cache slots), got {max_batch_size}")
        if prefill_token_budget < 1:
            raise ValueError(f"prefill_token_budget must be >= 1, got {prefill_token_budget}")
        self.cache = cache
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
        groups: dict[int, PrefillGroup] = {}
        for seq in self.prefilling:
            if budget == 0:
                break
            n = min(seq.prompt_remaining, budget)
            budget -= n
            bucket = bucket_of(n)
            groups.setdefault(bucket, PrefillGroup(bucket, [])).chunks.append(PrefillChunk(seq, seq.num_computed, n))
        return [groups[b] for b in sorted(groups)]

    def prefill_done(self, seq: SequenceState) -> None:
        """`seq` has its whole prompt cached and its first token sampled: move it into the decode region."""
        assert seq.status is SeqStatus.PREFILL and seq.prompt_remaining == 0
        self.prefilling.remove(seq)
        target = self.num_decoding
        other = self.slot_owner[target]
        if other is None:
            self.cache.move_slot(seq.slot, target, seq.num_computed)
            self._free.add(seq.slot)
            self._free.discard(target)
            self.slot_owner[seq.slot] = None
        elif other is not seq:
            assert other.status is SeqStatus.PREFILL
            self.cache.swap_slots(seq.slot, target, seq.num_computed, other.num_computed)
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
                self.cache.move_slot(last, slot, mover.num_computed)
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
