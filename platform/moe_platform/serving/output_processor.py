"""Outputs out (vLLM's output processor): each sampled token is detokenized and checked against EOS, stop strings
and max_tokens; the request's `RequestOutput` (text, tokens, log-probabilities) is built and handed to its sink at
the end of the step; time-to-first-token and inter-token latencies are sampled. Engine thread only, except
`drain_latency_samples`."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from moe_platform.serving.outputs import RequestOutput, RequestStream, StepSink
from moe_platform.serving.scheduler import SeqStatus
from moe_platform.serving.scheduler import SequenceState as Seq

MAX_LATENCY_SAMPLES = 65536
logger = logging.getLogger("moe_platform.serving.engine")


class OutputProcessor:
    def __init__(self, stop_token_ids: frozenset[int], max_seq_len: int, finish: Callable[[Seq, str], None],
                 on_finished: Callable[[Seq], None]):
        self.stop_token_ids = stop_token_ids
        self.max_seq_len = max_seq_len
        self._finish = finish  # the scheduler's: retires the sequence and frees its KV memory
        self._on_finished = on_finished  # the core's: the request id and its adapter are free again
        self.counters = {"requests_finished": 0, "generated_tokens": 0}
        self._ttft: deque[float] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._itl: deque[float] = deque(maxlen=MAX_LATENCY_SAMPLES)
        self._deliveries: list[tuple[object, RequestOutput]] = []  # (sink, output) of the current step

    def append_token(self, seq: Seq, token: int, now: float, outputs: list[RequestOutput],
                     logprob: tuple[float, list[tuple[int, float]]] | None = None) -> bool | None:
        """Record one generated token; return True if it finished the sequence, None if it failed it (alone)."""
        try:
            seq.output_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
                self._ttft.append(now - seq.arrival_time)
            else:
                self._itl.append(now - seq.last_token_time)
            seq.last_token_time = now
            self.counters["generated_tokens"] += 1
            reason = None
            if token in self.stop_token_ids and not seq.params.ignore_eos:
                reason = "stop"
            elif seq.stopper.append(seq.detokenizer.add(token)):
                reason = "stop"
            if reason is None and (len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_seq_len):
                reason = "length"
            if reason is not None and not seq.stopper.stopped and seq.stopper.append(seq.detokenizer.flush()):
                reason = "stop"
            if reason is not None:
                self._finish(seq, reason)
                self.counters["requests_finished"] += 1
            prompt, seq.prompt_logprobs = seq.prompt_logprobs, None  # handed out once, with the first token
            self.emit(seq, outputs, [token], logprobs=None if logprob is None else [logprob], prompt_logprobs=prompt)
        except Exception as e:  # noqa: BLE001 - detokenizing and stop strings are this request's own
            self.fail_request(seq, outputs, e)
            return None
        return reason is not None

    def fail_request(self, seq: Seq, outputs: list[RequestOutput], error: Exception) -> None:
        """Finish `seq` with an error (its client gets 500) and log why; the step goes on for the others."""
        logger.error("request %s failed in the engine step and is finished with an error (the others go on)",
                     seq.request_id, exc_info=error)
        self._finish(seq, "error")
        self.emit(seq, outputs, error=f"the server failed while generating this request "
                                      f"({type(error).__name__}); retry it", request_failed=True)

    def emit(self, seq: Seq, outputs: list[RequestOutput], new_ids: list[int] | None = None,
             error: str | None = None, logprobs: list | None = None, request_failed: bool = False,
             prompt_logprobs: list | None = None) -> None:
        finished = seq.status is SeqStatus.FINISHED
        text = seq.stopper.take(finished) if error is None else ""
        out = RequestOutput(seq.request_id, text, new_ids or [], finished, seq.finish_reason, seq.prompt_len,
                            len(seq.output_ids), error, request_failed, logprobs, prompt_logprobs)
        if finished:
            self._on_finished(seq)
        outputs.append(out)
        if seq.sink is not None:
            self._deliveries.append((seq.sink, out))

    def deliver(self) -> None:
        """Hand this step's outputs to their sinks: one wake-up per event loop per step, not one per token."""
        deliveries, self._deliveries = self._deliveries, []
        deliver_outputs(deliveries)

    def drain_latency_samples(self) -> tuple[list[float], list[float]]:
        """Time-to-first-token and inter-token latency samples (seconds) recorded since the previous call."""
        ttft = [self._ttft.popleft() for _ in range(len(self._ttft))]
        itl = [self._itl.popleft() for _ in range(len(self._itl))]
        return ttft, itl


def deliver_outputs(deliveries: list[tuple[object, RequestOutput]]) -> None:
    """Hand (sink, output) pairs to their sinks: a `RequestStream` gets its outputs on its event loop (one wake-up per
    loop), a `StepSink` all of its outputs at once, a callable each output."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
    by_sink: dict[StepSink, list[RequestOutput]] = {}
    for sink, out in deliveries:
        if isinstance(sink, RequestStream):
            by_loop.setdefault(sink._loop, []).append((sink, out))
        elif isinstance(sink, StepSink):
            by_sink.setdefault(sink, []).append(out)
        else:
            try:
                sink(out)
            except Exception:  # noqa: BLE001 - a caller's callback fails its own request's delivery only
                logger.exception("the output sink of request %s failed", out.request_id)
    for step_sink, outs in by_sink.items():
        try:
            step_sink.put_many(outs)
        except Exception:  # noqa: BLE001 - as a callback's: those requests' delivery only
            logger.exception("the step sink of requests %s failed", [o.request_id for o in outs][:5])
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(RequestStream.deliver, items)
