"""What the engine hands back for a request: `RequestOutput` per step, `RequestStream`, its asyncio view, and
`StepSink`, a sink that takes a whole step's outputs at once."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from moe_platform.serving.errors import EngineUnavailableError, RequestFailedError


class _Engine(Protocol):
    def abort(self, request_id: str) -> None: ...

    def tokens_per_output(self) -> int: ...


@dataclass
class RequestOutput:
    """What one step produced for one request: the new text/tokens since the previous output."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    request_failed: bool = False  # the error is this request's alone (500); else the engine stopped (503)
    # With SamplingParams.logprobs: per token of token_ids, (its log-probability, [(token, log-probability)] of the
    # most likely ones).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # With SamplingParams.prompt_logprobs, on the output of the first generated token: per prompt token, None for the
    # first, then (its log-probability, its rank, [(token, log-probability)] of the most likely ones).
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] | None = None

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This output followed by `later` (of the same request) as one output."""
        logprobs = None if self.logprobs is None and later.logprobs is None else \
            (self.logprobs or []) + (later.logprobs or [])
        return dataclasses.replace(later, text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                                   logprobs=logprobs, prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs)

    def failure(self) -> RequestFailedError | EngineUnavailableError:
        """The error a failed output (`error` set) raises for its client."""
        return (RequestFailedError if self.request_failed else EngineUnavailableError)(self.error)


class StepSink:
    """A sink that takes all the outputs of one engine step for its requests at once, in one call of `put_many`
    (e.g. to send them to another process in one message)."""

    def __init__(self, put_many: Callable[[list[RequestOutput]], None]):
        self.put_many = put_many


class RequestStream:
    """A submitted request seen from asyncio: iterate it for outputs (queued ones are merged; after the first, each
    gathers the engine's `tokens_per_output()` new tokens, or up to the last); `abort()` cancels."""

    def __init__(self, engine: _Engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.request_id = ""
        self.finished = False
        self._started = False
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    @staticmethod
    def deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
        """Runs on the streams' event loop: hand every output of one engine step to its stream."""
        for stream, out in items:
            stream._queue.put_nowait(out)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        while not self._queue.empty():
            out = out.merge(self._queue.get_nowait())
        if self._started:  # after the first output, gather the engine's tokens_per_output() new tokens
            want = self.engine.tokens_per_output()
            while len(out.token_ids) < want and not out.finished and out.error is None:
                out = out.merge(await self._queue.get())
        self._started = True
        self.finished = out.finished
        if out.error is not None:
            raise out.failure()
        return out

    def abort(self) -> None:
        if not self.finished and self.request_id:
            self.engine.abort(self.request_id)
