"""The engine core (vLLM's EngineCore): a thread-safe inbox of new requests and aborts, and `step()`, one iteration
of schedule (the scheduler's prefill chunks and decode batch) -> execute (the model runner's forwards) -> update
(sampling, then the output processor). Holds no tokenizer and no Serve or asyncio state.

What one request does alone in a step (sampling its row, log-probabilities, detokenizing, stop strings, its sink)
is isolated: an exception there finishes that request with an error and the step goes on for the others. What the
whole batch shares (a forward, the scheduler) raises out of `step()`."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import torch

from moe_platform.serving.errors import EngineOverloadedError, EngineUnavailableError, InvalidRequestError
from moe_platform.serving.model_runner import ModelRunner
from moe_platform.serving.output_processor import OutputProcessor
from moe_platform.serving.outputs import RequestOutput
from moe_platform.serving.sampling import draw_uniforms, prompt_token_logprobs, sample_tokens, token_logprobs
from moe_platform.serving.scheduler import PrefillChunk, PrefillGroup, Scheduler, SeqStatus
from moe_platform.serving.scheduler import SequenceState as Seq

THROUGHPUT_WINDOW_S = 10.0


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, stop_token_ids: frozenset[int], max_seq_len: int,
                 max_waiting: int, on_finished: Callable[[Seq], None] = lambda seq: None,
                 step_lock: threading.Lock | None = None):
        self.runner = runner
        self.scheduler = scheduler
        self.max_waiting = max_waiting
        # One step at a time; adapter writes (LoRAManager) and scoring wait between steps.
        self.step_lock = step_lock or threading.Lock()
        # Thread-safe inbox: ("add", Seq) / ("abort", request_id); drained by the thread that runs step().
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.inbox: deque[tuple[str, object]] = deque()
        self.inbox_adds = 0
        self.closed = False
        self.failure: BaseException | None = None
        self._active_ids: set[str] = set()
        self._on_finished = on_finished
        self._id_prefix = f"{uuid.uuid4().hex[:12]}-"  # request ids: prefix + counter (no os.urandom per request)
        self._id_counter = itertools.count()
        self.outputs = OutputProcessor(stop_token_ids, max_seq_len, scheduler.finish, self._finished)
        self.counters = {"prompt_tokens": 0, "steps": 0}
        self.last_decode_batch = 0
        self._recent: deque[tuple[float, int]] = deque()  # (step end time, tokens generated in the step)
        self._recent_total = 0
        self.tokens_per_s = 0.0
        self.last_step_time = 0.0

    # -- the inbox (any thread) ------------------------------------------------------------------------------------
    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):x}"

    def add(self, seq: Seq) -> None:
        """Queue `seq` for the next step (EngineUnavailableError, InvalidRequestError or EngineOverloadedError)."""
        with self.cv:
            if self.closed or self.failure is not None:
                raise EngineUnavailableError("the engine is shut down; retry on another replica")
            if seq.request_id in self._active_ids:
                raise InvalidRequestError(f"request id {seq.request_id!r} is already running", param="request_id")
            if self.inbox_adds + len(self.scheduler.waiting) >= self.max_waiting:
                raise EngineOverloadedError(f"the server is overloaded ({self.max_waiting} requests are already "
                                            f"waiting); retry later")
            self._active_ids.add(seq.request_id)
            self.inbox.append(("add", seq))
            self.inbox_adds += 1
            self.cv.notify()

    def abort(self, request_id: str) -> None:
        """Cancel a request; it finishes with reason "abort" at the next step."""
        with self.cv:
            if request_id in self._active_ids:
                self.inbox.append(("abort", request_id))
                self.cv.notify()

    def has_unfinished(self) -> bool:
        return bool(self._active_ids)

    def num_active(self) -> int:
        """Requests queued or running."""
        return len(self._active_ids)

    def _finished(self, seq: Seq) -> None:
        with self.lock:
            self._active_ids.discard(seq.request_id)
        self._on_finished(seq)

    # -- one iteration (the engine thread) ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduling iteration (prefill chunks + one decode step); return the outputs it produced."""
        with self.step_lock:
            outputs: list[RequestOutput] = []
            self._drain_inbox(outputs)
            for group in self.scheduler.schedule_prefill():
                self._run_prefill(group, outputs)
            batch = self.scheduler.decode_batch()
            self.last_decode_batch = len(batch)
            if batch:
                self._run_decode(batch, outputs)
            self.counters["steps"] += 1
            self._update_throughput(sum(len(o.token_ids) for o in outputs))
            self.outputs.deliver()
            return outputs

    def _update_throughput(self, produced: int) -> None:
        now = time.monotonic()
        self._recent.append((now, produced))
        self._recent_total += produced
        while now - self._recent[0][0] > THROUGHPUT_WINDOW_S:
            self._recent_total -= self._recent.popleft()[1]
        span = now - self._recent[0][0]
        self.tokens_per_s = self._recent_total / span if span > 0.5 else 0.0
        self.last_step_time = now

    def _drain_inbox(self, outputs: list[RequestOutput]) -> None:
        with self.lock:
            items = list(self.inbox)
            self.inbox.clear()
            self.inbox_adds = 0
        for kind, item in items:
            if kind == "add":
                self.scheduler.add(item)  # type: ignore[arg-type]
            else:
                seq = self.scheduler.find(item)  # type: ignore[arg-type]
                if seq is not None:
                    self.scheduler.finish(seq, "abort")
                    self.outputs.emit(seq, outputs)

    def _run_prefill(self, group: PrefillGroup, outputs: list[RequestOutput]) -> None:
        chunks = group.chunks
        # (rows, vocab) on the CPU, sampled here; (M, vocab) at the prompt positions of the requests that score theirs
        logits, prompt_logits = self.runner.prefill(group, self.scheduler)
        for c in chunks:
            self.scheduler.advance(c.seq, c.length)
        failed = self._score_prompts(chunks, prompt_logits, outputs) if prompt_logits is not None else ()
        done = [i for i, c in enumerate(chunks) if c.completes_prompt and c.seq not in failed]
        if not done:
            return
        now = time.monotonic()
        for seq, token, lp in self._sample(logits[done], [chunks[i].seq for i in done], outputs):
            if not seq.output_ids:  # not a preempted sequence's recomputation
                self.counters["prompt_tokens"] += seq.prompt_len
            if self.outputs.append_token(seq, token, now, outputs, lp) is False:
                self.scheduler.prefill_done(seq)

    def _score_prompts(self, chunks: list[PrefillChunk], logits: torch.Tensor, outputs: list[RequestOutput]
                       ) -> set[Seq]:
        """Record the prompt log-probabilities of this step's chunks (logits: their scored positions in chunk order,
        all rows at once); when the batch fails, chunk by chunk, and a chunk that fails alone fails its request.
        Returns the requests that failed."""
        parts, row = [], 0
        for c in chunks:
            positions = c.prompt_logprob_positions
            parts.append((c, positions, row))
            row += len(positions)

        def record(part_list) -> None:
            tokens = [c.seq.prompt_ids[p + 1] for c, positions, _ in part_list for p in positions]
            tops = [c.seq.params.prompt_logprobs for c, positions, _ in part_list for _ in positions]
            rows = [r + j for _, positions, r in part_list for j in range(len(positions))]
            entries = iter(prompt_token_logprobs(logits[rows], tokens, tops))
            for c, positions, _ in part_list:
                for p in positions:
                    c.seq.prompt_logprobs[p + 1] = next(entries)

        parts = [part for part in parts if part[1]]
        try:
            record(parts)
            return set()
        except Exception:  # noqa: BLE001 - the chunks at fault are found below
            pass
        failed = set()
        for part in parts:
            try:
                record([part])
            except Exception as e:  # noqa: BLE001 - this request's own failure
                failed.add(part[0].seq)
                self.outputs.fail_request(part[0].seq, outputs, e)
        return failed

    def _run_decode(self, batch: list[Seq], outputs: list[RequestOutput]) -> None:
        logits = self.runner.decode(batch, self.scheduler)  # (D, vocab) on the CPU
        for seq in batch:
            self.scheduler.advance(seq, 1)
        now = time.monotonic()
        for seq, token, lp in self._sample(logits, batch, outputs):
            self.outputs.append_token(seq, token, now, outputs, lp)

    def _sample(self, logits: torch.Tensor, seqs: list[Seq], outputs: list[RequestOutput]) -> list[tuple]:
        """(seq, next token, its log-probabilities) of every row of logits (rows, V); when the batch fails, row by
        row with the same draws, and a row that fails alone fails its request alone."""
        params, gens = [s.params for s in seqs], [s.generator for s in seqs]
        u = draw_uniforms(params, gens)  # (rows,) each row's one draw of this step, whatever happens below
        try:
            ids = sample_tokens(logits, params, gens, u).tolist()
            return list(zip(seqs, ids, token_logprobs(logits, ids, [p.logprobs for p in params]), strict=True))
        except Exception:  # noqa: BLE001 - the rows at fault are found below
            pass
        kept = []
        for i, seq in enumerate(seqs):
            try:
                ids = sample_tokens(logits[i:i + 1], params[i:i + 1], gens[i:i + 1], u[i:i + 1]).tolist()
                kept.append((seq, ids[0], token_logprobs(logits[i:i + 1], ids, [params[i].logprobs])[0]))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self.outputs.fail_request(seq, outputs, e)
        return kept

    # -- shutting down ------------------------------------------------------------------------------------------------
    def fail_all(self, message: str) -> None:
        """Finish every request, queued or running, with `message` as its error (the engine is stopping)."""
        with self.lock:
            pending = [item for kind, item in self.inbox if kind == "add"]
            self.inbox.clear()
            self.inbox_adds = 0
        reason = "error" if self.failure is not None else "abort"
        for seq in pending:  # never reached the scheduler
            seq.status, seq.finish_reason = SeqStatus.FINISHED, reason
            self.outputs.emit(seq, [], error=message)
        for seq in self.scheduler.all_unfinished():
            self.scheduler.finish(seq, reason)
            self.outputs.emit(seq, [], error=message)
        self.outputs.deliver()

    def stats(self) -> dict:
        """The core's numbers (read from any thread)."""
        stale = time.monotonic() - self.last_step_time > THROUGHPUT_WINDOW_S
        return {
            "waiting": self.inbox_adds + len(self.scheduler.waiting),
            "running": self.scheduler.num_running,
            "decode_batch_size": self.last_decode_batch,
            "prefilling": len(self.scheduler.prefilling),
            "max_batch_size": self.scheduler.max_batch_size,
            "tokens_per_s": 0.0 if stale else self.tokens_per_s,
            "expert_load": self.runner.expert_load.tolist(),
            "kv_cache_bytes": self.runner.cache.nbytes,
            "requests_finished": self.outputs.counters["requests_finished"],
            "prompt_tokens": self.counters["prompt_tokens"],
            "generated_tokens": self.outputs.counters["generated_tokens"],
            "steps": self.counters["steps"],
            "prefill_forwards": self.runner.forwards["prefill"],
            "decode_forwards": self.runner.forwards["decode"],
            "prompt_logprob_tokens": self.runner.prompt_logprob_tokens,
            **self.scheduler.kv_stats(),
        }
