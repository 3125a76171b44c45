"""The two schedulers on their own, with no model and no tensor: admission, chunked prefill, preemption and prefix
hits (paged), slot packing and its queued moves (slots). The engine core drives them the same way: schedule, run the
chunks (here: only `advance`), sample (here: a token appended by hand), finish."""

from __future__ import annotations

import pytest

from moe_platform.serving.kv_blocks import BlockPool, KVCacheManager
from moe_platform.serving.sampling import SamplingParams
from moe_platform.serving.scheduler import (
    PagedScheduler,
    Scheduler,
    SeqStatus,
    SequenceState,
    SlotMove,
    SlotScheduler,
    SlotSwap,
)

BS = 4  # tokens per block


def seq(rid: str, n: int, first: int = 0, max_tokens: int = 8) -> SequenceState:
    return SequenceState(rid, list(range(first, first + n)), SamplingParams(), max_tokens, 0.0)


def paged(blocks: int, max_batch: int = 8, budget: int = 64, prefix_caching: bool = True) -> PagedScheduler:
    """`blocks` usable blocks (the pool's block 0 is scratch)."""
    return PagedScheduler(KVCacheManager(BlockPool(blocks + 1, BS, prefix_caching)), max_batch, budget)


def run_prefill(sched) -> list[SequenceState]:
    """One step's prefill as the engine core runs it: every chunk computed; a completed prompt samples a token."""
    done = []
    for group in sched.schedule_prefill():
        for c in group.chunks:
            sched.advance(c.seq, c.length)
            if c.completes_prompt:
                c.seq.output_ids.append(99)
                sched.prefill_done(c.seq)
                done.append(c.seq)
    return done


def run_decode(sched) -> list[SequenceState]:
    batch = sched.decode_batch()
    for s in batch:
        sched.advance(s, 1)
        s.output_ids.append(98)
    return batch


def test_both_schedulers_satisfy_the_protocol():
    def drive(s: Scheduler) -> int:  # what the engine core relies on, typed by the protocol
        s.add(seq("a", 5))
        run_prefill(s)
        return len(s.decode_batch())

    assert drive(paged(16)) == 1 and drive(SlotScheduler(4, 4, 64)) == 1


def test_paged_admission_waits_for_blocks_and_keeps_the_queue_order():
    sched = paged(blocks=5, budget=64)
    a, b, c = seq("a", 12), seq("b", 9, first=100), seq("c", 2, first=200)
    for s in (a, b, c):
        sched.add(s)
    run_prefill(sched)
    # a takes 3 blocks; b needs 3 of the 2 left and waits, and c, which would fit, waits behind it
    assert [s.request_id for s in sched.running] == ["a"] and [s.request_id for s in sched.waiting] == ["b", "c"]
    assert a.status is SeqStatus.DECODE and len(a.block_table) == 3 and 0 not in a.block_table
    sched.finish(a, "stop")
    assert sched.kv_stats()["kv_cache_used"] == 0
    run_prefill(sched)
    assert [s.request_id for s in sched.running] == ["b", "c"]  # c did not jump ahead of b


def test_paged_prefill_is_chunked_under_the_token_budget():
    sched = paged(blocks=32, budget=8)
    long = seq("long", 20)
    sched.add(long)
    lengths = []
    while long.status is not SeqStatus.DECODE:
        lengths.append(sum(c.length for g in sched.schedule_prefill() for c in g.chunks))
        sched.advance(long, lengths[-1])
        if long.num_computed == long.num_tokens:
            long.output_ids.append(1)
            sched.prefill_done(long)
    assert lengths == [8, 8, 4] and len(long.block_table) == 5


def test_paged_preemption_frees_the_newest_and_recomputes_it_first():
    sched = paged(blocks=4, budget=64)
    old, new = seq("old", 7), seq("new", 3, first=50)
    sched.add(old)
    sched.add(new)
    run_prefill(sched)  # old: 2 blocks (8 positions), new: 1 block (4 positions); 1 block stays free
    assert [s.status for s in (old, new)] == [SeqStatus.DECODE, SeqStatus.DECODE]
    assert sched.kv_stats()["kv_cache_used"] == 3
    for _ in range(8):  # old takes the free block at its 9th position; new then needs one more and none is free
        batch = run_decode(sched)
        if new.status is SeqStatus.WAITING:
            break
    assert new.status is SeqStatus.WAITING and sched.waiting[0] is new and new not in batch
    assert new.block_table == [] and new.num_computed == 0 and sched.kv_stats()["num_preemptions"] == 1
    assert old.status is SeqStatus.DECODE and len(old.block_table) == 3 and old in batch
    assert sched.kv_stats()["kv_cache_used"] == 3
    produced = len(new.output_ids)
    sched.finish(old, "length")
    run_prefill(sched)  # recomputed: its prompt and every token it had produced, then it decodes again
    assert new.status is SeqStatus.DECODE and new.num_computed == new.prompt_len + produced
    assert len(new.output_ids) == produced + 1


def test_paged_prefix_hits_share_full_blocks_and_skip_their_compute():
    sched = paged(blocks=16, budget=64)
    first = seq("first", 10)
    sched.add(first)
    run_prefill(sched)
    cached = first.block_table[:2]
    sched.finish(first, "stop")  # its two full blocks stay in the prefix cache
    again = seq("again", 10)  # the same 10 prompt tokens
    other = seq("other", 10, first=1)  # shifted by one: no block in common
    sched.add(again)
    sched.add(other)
    groups = sched.schedule_prefill()
    chunks = {c.seq.request_id: c for g in groups for c in g.chunks}
    assert chunks["again"].start == 8 and chunks["again"].length == 2  # 2 cached blocks, 2 tokens computed
    assert chunks["other"].start == 0 and chunks["other"].length == 10
    assert again.block_table[:2] == cached and not set(again.block_table) & set(other.block_table)
    stats = sched.kv_stats()
    assert stats["prefix_cache_queries"] >= 18 and stats["prefix_cache_hits"] == 8


def test_a_prompt_cached_in_full_still_computes_its_last_token():
    sched = paged(blocks=16)
    first = seq("first", 8)
    sched.add(first)
    run_prefill(sched)
    sched.finish(first, "stop")
    same = seq("same", 8)
    sched.add(same)
    (chunk,) = [c for g in sched.schedule_prefill() for c in g.chunks]
    assert (chunk.start, chunk.length) == (4, 4)  # one block shared; the last one is recomputed for the logits


def test_prefix_hits_are_per_adapter_and_off_without_prefix_caching():
    for caching, adapter, want in ((True, "other", 0), (False, None, 0), (True, None, 4)):
        sched = paged(blocks=16, prefix_caching=caching)
        first = seq("first", 6)
        sched.add(first)
        run_prefill(sched)
        sched.finish(first, "stop")
        again = seq("again", 6)
        again.adapter = adapter
        sched.add(again)
        (chunk,) = [c for g in sched.schedule_prefill() for c in g.chunks]
        assert chunk.start == want, (caching, adapter)


def test_slot_scheduler_packs_decoders_and_queues_its_moves():
    sched = SlotScheduler(num_slots=4, max_batch_size=4, prefill_token_budget=64)
    a, b, c = seq("a", 3), seq("b", 5), seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    groups = sched.schedule_prefill()
    assert [s.slot for s in (a, b, c)] == [3, 2, 1]  # prefills take the highest free slots
    assert sched.take_kv_ops() == []
    for g in groups:
        for ch in g.chunks:
            sched.advance(ch.seq, ch.length)
    for s in (a, b, c):
        s.output_ids.append(7)
        sched.prefill_done(s)
    assert [s.slot for s in sched.decode_batch()] == [0, 1, 2]  # decoding sequences packed in [0, D)
    # a moves into the free slot 0; b swaps into slot 1 with c, still prefilling there; c is then in place
    assert sched.take_kv_ops() == [SlotMove(3, 0, 3), SlotSwap(2, 1, 5, 2)]
    assert [s.slot for s in (a, b, c)] == [0, 1, 2]
    assert sched.take_kv_ops() == []  # taken once
    sched.finish(a, "stop")  # the last decoder moves into a's slot, keeping [0, D) packed
    assert sched.take_kv_ops() == [SlotMove(2, 0, 2)] and c.slot == 0
    assert [s.slot for s in sched.decode_batch()] == [0, 1]


def test_abort_of_a_waiting_request_frees_nothing_it_never_had():
    sched = paged(blocks=2)
    big, small = seq("big", 8), seq("small", 2)
    sched.add(big)
    sched.add(small)
    run_prefill(sched)
    assert small.status is SeqStatus.WAITING
    sched.finish(small, "abort")
    assert small.status is SeqStatus.FINISHED and small.finish_reason == "abort" and not sched.waiting
    assert sched.find("small") is None and sched.find("big") is big
    sched.finish(big, "abort")
    assert sched.kv_stats()["kv_cache_used"] == 0 and not sched.has_work()


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"budget": 0}])
def test_bad_scheduler_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        paged(blocks=4, **bad)
    with pytest.raises(ValueError):
        SlotScheduler(2, bad.get("max_batch", 2), bad.get("budget", 8))
