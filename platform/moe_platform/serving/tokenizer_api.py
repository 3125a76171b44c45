"""vLLM's tokenizer routes over the served model's own tokenizer: POST /tokenize, POST /detokenize and
GET /tokenizer_info, in vLLM's JSON shapes, so clients that count or build token ids themselves (lm-evaluation-
harness's default `tokenizer_backend`, which looks for exactly these routes) use the server's tokenizer rather than
guessing one. They take the API key as /v1/* does. Starlette only, no Ray."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from moe_platform.serving import protocol as P
from moe_platform.serving.errors import InvalidRequestError, ServingError
from moe_platform.serving.openai_api import INLINE_PROMPT_CHARS, OpenAIFrontend, error_response


class TokenizerRoutes:
    """The tokenizer routes of a frontend: its API key, body limit and model name; the tokenizer of its main
    version's engine (every version of an app shares the tokenizer: a rollout refuses one that does not)."""

    def __init__(self, frontend: OpenAIFrontend):
        self.frontend = frontend

    async def tokenize(self, request: Request) -> Response:
        """{"prompt": TEXT} or {"messages": [...]} (+ add_special_tokens, add_generation_prompt, return_token_strs)
        -> {"count", "max_model_len", "tokens", "token_strs"}."""
        try:
            req = await self._parse(request, P.TokenizeRequest)
            engine = self.frontend.engine_ref()
            if req.messages is not None:
                text = engine.chat_template.render([m.as_template_message() for m in req.messages],
                                                   add_generation_prompt=req.add_generation_prompt)
            else:
                text = req.prompt
            special = req.add_special_tokens if req.add_special_tokens is not None else req.messages is None
            if len(text) <= INLINE_PROMPT_CHARS:
                ids = engine.tokenizer.encode(text, add_special_tokens=special).ids
            else:  # a long text would hold up every other request on this event loop
                ids = (await asyncio.to_thread(engine.tokenizer.encode, text, add_special_tokens=special)).ids
        except ServingError as e:
            return error_response(e)
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids,
                             "token_strs": engine.token_texts(ids) if req.return_token_strs else None})

    async def detokenize(self, request: Request) -> Response:
        """{"tokens": [ids]} -> {"prompt": TEXT}."""
        try:
            req = await self._parse(request, P.DetokenizeRequest)
            engine = self.frontend.engine_ref()
            vocab = engine.args.vocab_size
            bad = [t for t in req.tokens if t >= vocab]
            if bad:
                raise InvalidRequestError(f"token ids must be integers in [0, {vocab}), got {bad[:5]}", param="tokens")
        except ServingError as e:
            return error_response(e)
        return JSONResponse({"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)})

    async def tokenizer_info(self, request: Request) -> Response:
        """The tokenizer's configuration as vLLM reports it: its class, special tokens, chat template and length."""
        try:
            self.frontend.authorize(request)
        except ServingError as e:
            return error_response(e)
        engine = self.frontend.engine_ref()
        special = engine.chat_template.special_tokens
        eos = engine.tokenizer.id_to_token(engine.eos_token_id)
        return JSONResponse({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                             "bos_token": special.get("bos_token"), "pad_token": eos,
                             "chat_template": engine.chat_template.template, "model_max_length": engine.max_seq_len})

    async def _parse(self, request: Request, model_cls):
        self.frontend.authorize(request)
        req = P.parse_request(model_cls, await self.frontend.read_body(request))
        if req.model is not None:
            self.frontend.adapter_of(req.model.partition("@")[0])  # 404 for a model this server does not serve
        return req
