"""The OpenAI-compatible HTTP layer over an `Engine`, written against Starlette/FastAPI only (no Ray).

`OpenAIFrontend` turns a request into engine submissions and engine outputs into OpenAI JSON or server-sent events.
Everything a client can get wrong becomes a 4xx OpenAI error object before any work is queued; an overloaded engine
answers 429 with Retry-After, and a failure of the server's own is a 500 OpenAI error object, logged here. Prompts
are tokenized (and chat templates rendered) off the event loop when they are long, after a check of their length in
characters that costs nothing. The Serve deployment (`app.py`) only routes to these methods.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from moe_platform.serving import protocol as P
from moe_platform.serving.engine import Engine, RequestOutput, RequestStream
from moe_platform.serving.errors import (
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    NotFoundError,
    RequestFailedError,
    ServingError,
)
from moe_platform.serving.traffic import MAX_SESSION_ID_CHARS

DEFAULT_MAX_BODY_BYTES = 1 << 20
INLINE_PROMPT_CHARS = 4096  # prompts up to this are tokenized on the event loop (sub-millisecond), longer in a thread
logger = logging.getLogger(__name__)


class PayloadTooLargeError(InvalidRequestError):
    status = 413


class AuthenticationError(ServingError):
    status = 401
    type = "invalid_request_error"


class ForbiddenError(ServingError):
    status = 403
    type = "invalid_request_error"


def error_response(err: ServingError) -> JSONResponse:
    headers = {}
    if isinstance(err, EngineOverloadedError):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    elif isinstance(err, EngineUnavailableError):
        headers["Retry-After"] = "1"
    elif isinstance(err, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make FastAPI's own errors (unknown route, wrong method, ...) OpenAI-shaped too."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ServingError(str(exc.detail), code=None)
        err.status, err.type = exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error"
        if exc.status_code == 404:
            err.message = f"unknown endpoint {request.method} {request.url.path}"
        return JSONResponse(err.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequestError(f"invalid request: {exc.errors()[:3]}"))

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)


class OpenAIFrontend:
    """OpenAI endpoints over the engine returned by `engine_ref()` (the deployment may swap engines at runtime)."""

    def __init__(self, engine_ref: Callable[[], Engine], model_name: str, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, admin_api_key: str | None = None,
                 pick: Callable[[str | None, str | None, str | None], tuple[Engine, str | None]] | None = None,
                 observe: Callable[[str | None, int, float], None] | None = None,
                 rollout: Callable[[str, dict], Awaitable[dict]] | None = None):
        """`pick(pinned version, session id, adapter) -> (engine, version)`, each None where the request has none,
        chooses the model version of a request where several are served (NotFoundError for an unknown pin);
        without it `engine_ref()` serves every request and no version can be pinned. `observe(version, HTTP status,
        seconds)` hears of every finished completion request. `rollout(action, body)` carries out the admin
        route's rollout commands (start, status, promote, abort, traffic); without it that route is 404."""
        if max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {max_body_bytes}")
        self.engine_ref = engine_ref
        self.pick = pick or self._one_version
        self.observe = observe or (lambda version, status, seconds: None)
        self.rollout_command = rollout
        self.model_name = model_name
        self.api_key = api_key or None
        # The admin routes (adapters, rollouts, the traffic split) have their own key and never fall back to the
        # API key: every API client holds that one. Without an admin key they are off.
        self.admin_key = admin_api_key or None
        self.max_body_bytes = max_body_bytes
        self.created = P.now_s()

    # -- endpoints -----------------------------------------------------------------------------------------------
    async def health(self) -> Response:
        try:
            self.engine_ref().check_health()
        except RuntimeError as e:
            return error_response(EngineUnavailableError(f"unhealthy: {e}"))
        return JSONResponse({"status": "ok", "model": self.model_name})

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ServingError as e:
            return error_response(e)
        adapters = self.engine_ref().loaded_adapters()
        return JSONResponse(P.models_response(self.model_name, self.created, adapters))

    async def load_adapter(self, request: Request) -> Response:
        """POST {"lora_name": NAME, "lora_path": DIR or registry://NAME[@VERSION]} (admin key): load an adapter,
        served as model 'BASE:NAME'. This replica only: with several replicas, declare adapters in the app's
        user_config instead, which every replica applies."""
        try:
            body = await self._admin_body(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(path, str) or not path:
                raise InvalidRequestError("lora_path must be an adapter directory or registry://NAME[@VERSION]",
                                          param="lora_path")
            engine = self.engine_ref()
            loaded = await asyncio.to_thread(engine.load_adapter, name, path)
        except ServingError as e:
            return error_response(e)
        return JSONResponse({"object": "lora_adapter", "id": f"{self.model_name}:{loaded.name}",
                             "root": loaded.name, "rank": loaded.rank})

    async def unload_adapter(self, request: Request) -> Response:
        """POST {"lora_name": NAME} (admin key): new requests for it get 404; those in flight finish."""
        try:
            body = await self._admin_body(request)
            self.engine_ref().unload_adapter(body.get("lora_name"))
        except ServingError as e:
            return error_response(e)
        return JSONResponse({"object": "lora_adapter", "id": f"{self.model_name}:{body['lora_name']}",
                             "deleted": True})

    async def rollout(self, request: Request) -> Response:
        """GET: the app's rollout status; POST {"action": "start", "to": VERSION, "steps": [...], "dwell_s": ...,
        "blue_green": ..., "gates": {...}}, {"action": "promote" | "abort", "reason": ...} or {"action": "traffic",
        "weights": {VERSION: PERCENT}} (admin key). The app's rollout controller carries it out, so every replica
        follows."""
        try:
            if self.rollout_command is None:
                raise NotFoundError("this server has no rollouts", code="not_found")
            if request.method == "GET":
                self._admin_allowed(request)
                return JSONResponse(await self.rollout_command("status", {}))
            body = await self._admin_json(request)
            action = body.get("action")
            if not isinstance(action, str):
                raise InvalidRequestError("action (start, status, promote, abort or traffic) is required",
                                          param="action")
            return JSONResponse(await self.rollout_command(action, body))
        except ServingError as e:
            return error_response(e)

    def _admin_allowed(self, request: Request) -> None:
        if self.admin_key is None:
            raise ForbiddenError("admin routes are disabled because no admin key is configured: start the server "
                                 "with admin_api_key (moe-platform serve: --admin-key-file or "
                                 "MOE_PLATFORM_ADMIN_KEY); the API key does not open them", code="admin_disabled")
        self.authorize(request, self.admin_key)

    async def _admin_json(self, request: Request) -> dict:
        self._admin_allowed(request)
        data = P.parse_json_body(await self.read_body(request))
        if not isinstance(data, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        return data

    async def _admin_body(self, request: Request) -> dict:
        data = await self._admin_json(request)
        if not isinstance(data.get("lora_name"), str):
            raise InvalidRequestError("lora_name (the adapter's name, a string) is required", param="lora_name")
        return data

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    # -- request pipeline ----------------------------------------------------------------------------------------
    async def _handle(self, request: Request, chat: bool) -> Response:
        start = time.monotonic()
        try:
            response = await self._answer(request, chat, start)
        except Exception:  # noqa: BLE001 - a bug of ours: logged, and the client still gets an OpenAI error object
            logger.exception("a %s request failed", "chat completion" if chat else "completion")
            response = error_response(RequestFailedError("the server failed while handling this request"))
        if not isinstance(response, StreamingResponse):  # a stream reports when it ends (`_sse`)
            self.observe(response.headers.get("x-model-version"), response.status_code, time.monotonic() - start)
        return response

    async def _answer(self, request: Request, chat: bool, start: float) -> Response:
        version = None
        try:
            self.authorize(request)
            body = await self.read_body(request)
            req = P.parse_request(P.ChatCompletionRequest if chat else P.CompletionRequest, body)
            model, at, pinned = req.model.partition("@")  # NAME@VERSION pins a version
            adapter = self.adapter_of(model)
            engine, version = self.pick(pinned if at else None, _session_id(request), adapter)
            if _prompt_chars(req, chat) <= INLINE_PROMPT_CHARS:
                jobs = self._jobs(engine, req, chat)
            else:  # tokenizing a long prompt would hold up every other request on this event loop
                jobs = await asyncio.to_thread(self._jobs, engine, req, chat)
            streams = self._submit_all(engine, jobs, adapter)
        except ServingError as e:
            return _served_by(error_response(e), version)
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        created = P.now_s()
        served = {"X-Model-Version": version} if version else {}
        if req.stream:
            gen = self._sse(streams, rid, created, chat, req, jobs, version, start, engine)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **served})
        try:
            results = await asyncio.gather(*(_collect(s) for s in streams))
        except ServingError as e:
            return _served_by(error_response(e), version)
        finally:
            for s in streams:
                s.abort()
        if not chat and req.prompt_only:
            results = [_prompt_alone(r) for r in results]
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        use = P.usage(prompt_tokens, completion_tokens)
        if chat:
            choices = [P.chat_choice(i, r.text, r.finish_reason, _logprobs(engine, r, chat))
                       for i, r in enumerate(results)]
            return JSONResponse(P.chat_response(rid, req.model, created, choices, use), headers=served)
        if len(results) > 1 or results[0].prompt_logprobs:  # prompt log-probabilities to render: off the event loop
            choices = await asyncio.to_thread(_completion_choices, engine, req, jobs, results)
        else:
            choices = _completion_choices(engine, req, jobs, results)
        return JSONResponse(P.completion_response(rid, req.model, created, choices, use), headers=served)

    def _one_version(self, pinned: str | None, session: str | None, adapter: str | None) -> tuple[Engine, None]:
        if pinned is not None:
            raise NotFoundError(f"the model '{self.model_name}@{pinned}' does not exist; this server serves one "
                                f"version of '{self.model_name}'", param="model", code="model_not_found")
        return self.engine_ref(), None

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's model id names: 'BASE' -> None (the base model), 'BASE:ADAPTER' -> ADAPTER."""
        if model == self.model_name:
            return None
        adapter = model.removeprefix(f"{self.model_name}:") if model.startswith(f"{self.model_name}:") else ""
        if not adapter:
            raise NotFoundError(f"the model '{model}' does not exist; this server serves '{self.model_name}' and its "
                                f"adapters as '{self.model_name}:ADAPTER' (see GET /v1/models)", param="model",
                                code="model_not_found")
        return adapter

    def authorize(self, request: Request, key: str | None = None) -> None:
        key = key or self.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise AuthenticationError("invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequestError(f"invalid Content-Length header {declared!r}")
            if int(declared) > limit:
                raise PayloadTooLargeError(f"the request body is {declared} bytes; the limit is {limit} bytes",
                                           code="payload_too_large")
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise PayloadTooLargeError(f"the request body exceeds the limit of {limit} bytes",
                                           code="payload_too_large")
            chunks.append(part)
        return b"".join(chunks)

    def _jobs(self, engine: Engine, req, chat: bool) -> list[Job]:
        """(prompt ids, sampling params, echo text) for every choice; validates lengths against the context."""
        if chat:
            prompts = [engine.render_chat(req.template_messages())]
            requested = req.requested_max_tokens
            param = "messages"
            limit = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        else:
            prompts = req.prompts()
            requested = req.max_tokens if "max_tokens" in req.model_fields_set else None
            param, limit = "prompt", "max_tokens"
        jobs = []
        for prompt in prompts:
            ids = engine.prepare_prompt(prompt, param=param)
            echo = ""
            if not chat and req.echo:
                echo = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
            for choice in range(req.n):
                params = req.sampling_params(requested, choice)
                if requested is None and not chat:
                    # OpenAI's completions default is 16 tokens; without an explicit value, fit what room is left.
                    params.max_tokens = min(16, engine.max_seq_len - len(ids))
                engine.resolve_max_tokens(len(ids), params, limit)
                jobs.append(Job(ids, params, echo))
        return jobs

    def _submit_all(self, engine: Engine, jobs, adapter: str | None) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for job in jobs:
                streams.append(self._submit(engine, job.ids, job.params, adapter))
        except ServingError:
            for s in streams:
                s.abort()
            raise
        return streams

    def _submit(self, engine: Engine, ids: list[int], params, adapter: str | None) -> RequestStream:
        try:
            return engine.submit(ids, params, adapter=adapter)
        except EngineUnavailableError:
            # The deployment may have just swapped in a new engine (hot model update): use that one instead.
            current = self.engine_ref()
            if current is engine:
                raise
            return current.submit(ids, params, adapter=adapter)

    async def _sse(self, streams: list[RequestStream], rid: str, created: int, chat: bool, req, jobs: list[Job],
                   version: str | None, start: float, engine: Engine) -> AsyncIterator[str]:
        obj, model = "chat.completion.chunk" if chat else "text_completion", req.model
        include_usage = req.include_usage
        every_chunk = include_usage and req.stream_options.continuous_usage_stats
        prompt_only = not chat and req.prompt_only
        # One choice (the common case) reads its stream directly; several are merged through a queue.
        outputs = _indexed(streams[0]) if len(streams) == 1 else _merged(streams)
        counts = [(0, 0)] * len(streams)  # (prompt, completion) tokens of each choice so far
        remaining = len(streams)
        status = 200
        # An echo with log-probabilities goes out with the first output, which brings the prompt's.
        deferred = {i for i, job in enumerate(jobs) if job.echo and not chat and req.logprobs is not None}
        try:
            for i in range(len(streams)):
                if chat:
                    yield P.sse(P.chunk(rid, obj, model, created, [P.chat_chunk_choice(
                        i, {"role": "assistant", "content": ""}, None)]))
                elif jobs[i].echo and i not in deferred:
                    yield P.sse(P.chunk(rid, obj, model, created, [P.completion_choice(i, jobs[i].echo, None)]))
            async for index, out in outputs:
                if isinstance(out, ServingError):
                    status = out.status
                    yield P.sse(out.to_dict())
                    break
                if prompt_only:
                    out = _prompt_alone(out)
                counts[index] = (out.prompt_tokens, out.completion_tokens)
                use = P.usage(*map(sum, zip(*counts, strict=True))) if every_chunk else None
                if index in deferred or (not chat and out.prompt_logprobs and req.prompt_logprobs is not None):
                    deferred.discard(index)
                    echo = _completion_choices(engine, req, [jobs[index]], [out], generated=False)[0]
                    yield P.sse(P.chunk(rid, obj, model, created, [{**echo, "index": index}], use))
                if out.finished:
                    remaining -= 1
                elif not out.text and not out.logprobs:
                    continue
                reason = out.finish_reason if out.finished else None
                logprobs = _logprobs(engine, out, chat)
                choice = (P.chat_chunk_choice(index, {"content": out.text} if out.text else {}, reason, logprobs)
                          if chat else P.completion_choice(index, out.text, reason, logprobs))
                # Without stream_options.include_usage the usage rides on the last chunk (clients may ignore it).
                if remaining == 0 and not include_usage:
                    use = P.usage(*map(sum, zip(*counts, strict=True)))
                yield P.sse(P.chunk(rid, obj, model, created, [choice], use))
                if remaining == 0:
                    break
            if remaining == 0 and include_usage:
                yield P.sse(P.chunk(rid, obj, model, created, [], P.usage(*map(sum, zip(*counts, strict=True)))))
            yield P.sse("[DONE]")
        finally:
            await outputs.aclose()
            for s in streams:
                s.abort()
            if remaining == 0 or status != 200:  # a client that went away says nothing about the version
                self.observe(version, status, time.monotonic() - start)


def _session_id(request: Request) -> str | None:
    session = request.headers.get("x-session-id")
    if session is not None and len(session) > MAX_SESSION_ID_CHARS:
        raise InvalidRequestError(f"the X-Session-Id header is {len(session)} characters long; at most "
                                  f"{MAX_SESSION_ID_CHARS} are allowed", param="X-Session-Id",
                                  code="invalid_session_id")
    return session


def _prompt_chars(req, chat: bool) -> int:
    """The characters of text a request brings to tokenize (token-id prompts count none)."""
    if chat:
        return sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content or ())
                   for m in req.messages)
    return sum(len(p) for p in req.prompts() if isinstance(p, str))


@dataclass
class Job:
    """One choice of a request: its prompt's token ids, its sampling parameters and the text it echoes."""

    ids: list[int]
    params: object
    echo: str


def _prompt_alone(out: RequestOutput) -> RequestOutput:
    """A max_tokens 0 echo's output: the one token its prompt's last position sampled is not part of the answer."""
    return dataclasses.replace(out, text="", token_ids=[], logprobs=[] if out.logprobs is not None else None,
                               completion_tokens=0, finish_reason="length" if out.finished else None)


def _logprobs(engine: Engine, out: RequestOutput, chat: bool) -> dict | None:
    """The OpenAI `logprobs` object of an output's tokens (None when the request asked for none)."""
    if out.logprobs is None:
        return None
    pieces = engine.token_texts(out.token_ids)
    tops = [engine.token_texts([t for t, _ in top]) for _, top in out.logprobs]
    if chat:
        return P.chat_logprobs(pieces, out.logprobs, tops)
    return P.completion_logprobs(pieces, [lp for lp, _ in out.logprobs],
                                 [P.top_entry(piece, lp, names, [v for _, v in top])
                                  for piece, (lp, top), names in zip(pieces, out.logprobs, tops, strict=True)])


def _completion_choices(engine: Engine, req, jobs: list[Job], results: list[RequestOutput],
                        generated: bool = True) -> list[dict]:
    """The completion choices of finished outputs (or, `generated` False, the echo chunk of a stream: the prompt
    alone): text with the echoed prompt, and `logprobs` over the echoed prompt and the generated tokens together
    (the prompt's first token has none); with vLLM's `prompt_logprobs`, that field too."""
    choices = []
    for i, (job, out) in enumerate(zip(jobs, results, strict=True)):
        prompt = out.prompt_logprobs
        logprobs = None
        if req.logprobs is not None and (generated or (job.echo and prompt)):
            pieces, values, tops = [], [], []
            if job.echo and prompt:
                pieces = engine.token_texts(job.ids)
                values, tops = [None], [None]
                for piece, (lp, _, alts) in zip(pieces[1:], prompt[1:], strict=True):
                    alts = alts[: req.logprobs]
                    values.append(lp)
                    tops.append(P.top_entry(piece, lp, engine.token_texts([t for t, _ in alts]), [v for _, v in alts]))
            if generated and out.logprobs:
                more = _logprobs(engine, out, chat=False)
                pieces, values, tops = (pieces + more["tokens"], values + more["token_logprobs"],
                                        tops + more["top_logprobs"])
            logprobs = P.completion_logprobs(pieces, values, tops)
        text = job.echo + (out.text if generated else "")
        choice = P.completion_choice(i, text, out.finish_reason if generated else None, logprobs)
        if req.prompt_logprobs is not None and prompt:
            k = req.prompt_logprobs
            choice["prompt_logprobs"] = P.prompt_logprobs_field(
                job.ids, prompt, engine.token_texts(job.ids), [engine.token_texts([t for t, _ in e[2][:k]]) if e
                                                               else [] for e in prompt], k)
        choices.append(choice)
    return choices


def _served_by(response: Response, version: str | None) -> Response:
    if version:
        response.headers["X-Model-Version"] = version
    return response


async def _collect(stream: RequestStream) -> RequestOutput:
    """Run a request to the end; return one output holding all its text."""
    total = None
    async for out in stream:
        total = out if total is None else total.merge(out)
    assert total is not None and total.finished
    return total


async def _indexed(stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput | ServingError]]:
    try:
        async for out in stream:
            yield 0, out
    except ServingError as e:
        yield 0, e


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput | ServingError]]:
    """(choice index, output) pairs from several streams as they arrive; a failed stream yields its error."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async for item in _indexed(stream):
            queue.put_nowait((index, item[1]))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            index, out = await queue.get()
            done += isinstance(out, ServingError) or out.finished
            yield index, out
    finally:
        for p in pumps:
            p.cancel()
