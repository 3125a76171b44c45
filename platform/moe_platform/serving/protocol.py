"""OpenAI request validation and response shapes (completions, chat completions, models, errors).

Requests are validated strictly: a wrong JSON type is a 400, never coerced (true is not 1, 1.0 is not 1), and a
parameter we cannot honour (penalties, min_p, logit_bias, tools, or any parameter this module does not know) is a
400 that names it instead of being silently ignored. The only parameters accepted without an effect are `user`
(an end-user id for the provider's abuse monitoring) and a chat message's `name` (a participant label our chat
templates do not render): neither changes what the model computes. Every number has a range (the table in
docs/operations.md, "Request limits"): NaN and infinities (also 1e400, which JSON parsers read as infinity) and
integers past it are refused before anything reaches the engine. Every failure becomes an `InvalidRequestError`
carrying the OpenAI `param` it is about.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moe_platform.serving.errors import InvalidRequestError
from moe_platform.serving.sampling import MAX_LOGPROBS, MAX_STOP_CHARS, SamplingParams

MAX_N = 16
MAX_STOP = 4
MAX_PROMPTS = 64
INT32_MAX = 2**31 - 1  # token counts, token ids and top_k above it are refused (top_k above the vocabulary is not)
MAX_LOGIT_BIAS = 1024

_Tokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
_TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Strict(BaseModel):
    # Unknown fields are refused by name (see the module's docstring); known ones must have exactly the right JSON
    # type, and no float is NaN or infinite.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class _SamplingFields(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    logit_bias: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")],
                               Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None
    ignore_eos: bool = False

    def _check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty", "min_p"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported by this server; omit it or send 0", param=name)
        if self.repetition_penalty not in (None, 1.0):
            raise InvalidRequestError("repetition_penalty is not supported by this server; omit it or send 1",
                                      param="repetition_penalty")
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported by this server", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(s == "" for s in stops):
            raise InvalidRequestError("stop strings must not be empty", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise InvalidRequestError(f"stop strings must be at most {MAX_STOP_CHARS} characters long", param="stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_tokens: int | None, choice: int) -> SamplingParams:
        """Engine parameters for choice `choice` (n > 1 with a seed gives each choice its own seed)."""
        seed = None if self.seed is None else (self.seed + choice) % 2**63
        return _sampling_params(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=self.top_k or 0,
            seed=seed,
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or []),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs_requested,
            prompt_logprobs=self.prompt_logprobs_requested,
        )

    @property
    def logprobs_requested(self) -> int | None:
        """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
        return None

    @property
    def prompt_logprobs_requested(self) -> int | None:
        """How many alternatives each prompt token's log-probability comes with (None: the prompt is not scored)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[_TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0, le=INT32_MAX)] | None = 16  # 0: with echo, the prompt alone
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # vLLM's extension
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    suffix: str | None = None

    @property
    def logprobs_requested(self) -> int | None:
        return self.logprobs

    @property
    def prompt_only(self) -> bool:
        """max_tokens 0 with echo: the answer is the prompt (with its log-probabilities), nothing generated."""
        return self.max_tokens == 0

    @property
    def prompt_logprobs_requested(self) -> int | None:
        """How many alternatives each prompt token's log-probability comes with: `prompt_logprobs`, and with echo
        the `logprobs` of the echoed prompt (None: the prompt is not scored)."""
        wanted = [n for n in (self.prompt_logprobs, self.logprobs if self.echo else None) if n is not None]
        return max(wanted) if wanted else None

    def sampling_params(self, max_tokens: int | None, choice: int) -> SamplingParams:
        # The prompt alone still runs the prompt's last position, which samples one token: it is not returned.
        return super().sampling_params(1 if self.prompt_only else max_tokens, choice)

    def check(self) -> CompletionRequest:
        self._check_unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens 0 returns the prompt alone and needs echo: true; otherwise ask for "
                                      "at least 1 token", param="max_tokens")
        if self.best_of not in (None, 1):
            raise InvalidRequestError("best_of > 1 is not supported by this server", param="best_of")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server", param="suffix")
        if len(self.prompts()) * self.n > MAX_PROMPTS:
            raise InvalidRequestError(f"at most {MAX_PROMPTS} completions per request (prompts x n)", param="n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # Our chat template knows system/user/assistant; OpenAI's newer "developer" role is a system message.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: _Tokens | None = None
    max_completion_tokens: _Tokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def check(self) -> ChatCompletionRequest:
        self._check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server", param="tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None and \
                self.max_tokens != self.max_completion_tokens:
            raise InvalidRequestError("max_tokens and max_completion_tokens disagree; send one of them",
                                      param="max_completion_tokens")
        return self

    @property
    def logprobs_requested(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [m.as_template_message() for m in self.messages]


class TokenizeRequest(_Strict):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered with the model's chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template has them)
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("send either prompt (text) or messages (a chat), not both and not neither",
                                      param="prompt" if self.prompt is None else "messages")
        return self


class DetokenizeRequest(_Strict):
    """vLLM's POST /detokenize: token ids -> text."""

    model: str | None = None
    tokens: list[_TokenId]

    def check(self) -> DetokenizeRequest:
        return self


def _sampling_params(**values) -> SamplingParams:
    """SamplingParams from validated fields; anything it still refuses is the client's 400, never a 500."""
    try:
        return SamplingParams(**values)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


def parse_json_body(body: bytes) -> Any:
    """Bytes -> JSON value; malformed JSON is a 400, and so are NaN and Infinity (which JSON does not have) and a
    string holding a lone surrogate (an unpaired "\\ud800".."\\udfff" escape, not Unicode text), each naming the
    parameter it is in."""
    try:
        data = json.loads(body, parse_constant=_Constant)
    except (ValueError, RecursionError) as e:
        msg = str(e) if isinstance(e, ValueError) else "JSON nested too deeply"
        raise InvalidRequestError(f"the request body is not valid JSON: {msg}", code="invalid_json") from None
    found = _first_bad(data, "")
    if found is not None:
        where, msg, code = found
        raise InvalidRequestError(f"'{where or 'body'}' {msg}", param=where or None, code=code)
    return data


class _Constant:
    """NaN, Infinity or -Infinity in a body: kept by the parser only to be refused naming its parameter."""

    def __init__(self, name: str):
        self.name = name


_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_bad(value: Any, path: str) -> tuple[str, str, str] | None:
    """(the parameter path, what is wrong, the error code) of the first value in `value` that is no JSON text or
    number: a NaN/Infinity, or a string holding a surrogate (json joins escaped pairs into one character, so any
    surrogate left is a lone one); else None."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return None if m is None else (path, f"holds a lone surrogate U+{ord(m.group()):04X}, which is not Unicode "
                                             f"text; send valid UTF-8 (escape characters outside the BMP as a pair)",
                                       "invalid_unicode")
    if isinstance(value, _Constant):
        return path, f"is {value.name}, which is not a JSON number", "invalid_json"
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            found = _first_bad(key, child) or _first_bad(item, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_bad(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def parse_request(model_cls: type[_Strict], body: bytes):
    """Validate a JSON body as `model_cls`; the first failures become one InvalidRequestError naming the param."""
    data = parse_json_body(body)
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data).check()
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> InvalidRequestError:
    errors = e.errors(include_url=False)
    first = errors[0]
    param = _loc_to_param(first["loc"])
    if first["type"] == "missing":
        return InvalidRequestError(f"missing required parameter: '{param}'", param=param, code="missing_required")
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(f"unknown parameter '{param}': this server does not support it (it would be "
                                   f"ignored, so it is refused); remove it", param=param, code="unknown_parameter")
    # A union reports one error per branch: group them by parameter ("a valid string or a valid list").
    by_param: dict[str, list[str]] = {}
    for err in errors:
        msgs = by_param.setdefault(_loc_to_param(err["loc"]), [])
        if err["msg"] not in msgs:
            msgs.append(err["msg"])
    details = "; ".join(f"'{p}': {' or '.join(msgs)}" for p, msgs in list(by_param.items())[:3])
    return InvalidRequestError(f"invalid request: {details}", param=param, code="invalid_value")


# Union branches appear in error locations as type names ("str", "list[int]", "function-after[...]"): not fields.
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "nullable", "json-or-python"}


def _loc_to_param(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_NAMES or not part.isidentifier():
            continue
        else:
            out = f"{out}.{part}" if out else part
    return out


# -- responses -------------------------------------------------------------------------------------------------------
# One random process prefix plus a counter: unique across replicas, and no os.urandom per request (slow in some VMs).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


MIN_LOGPROB = -9999.0  # what JSON carries for a log-probability of -inf (JSON has no infinity; vLLM's value)


def logprob_value(value: float) -> float:
    return max(value, MIN_LOGPROB)


def completion_logprobs(pieces: list[str], values: list[float | None], tops: list[dict[str, float] | None],
                        offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: token strings, their log-probabilities (None for an echoed
    prompt's first token, which nothing before it predicts), each token's own entry and its most likely
    alternatives (token string -> log-probability, see `top_entry`) and where each token starts in the text."""
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": pieces, "token_logprobs": [None if v is None else logprob_value(v) for v in values],
            "top_logprobs": tops, "text_offset": offsets}


def top_entry(piece: str, value: float, names: list[str], values: list[float]) -> dict[str, float]:
    """One token's `top_logprobs` entry: the token itself and the most likely alternatives (as vLLM answers, so a
    greedy check can compare the token's value with the largest one); where two tokens have the same text, the
    larger value stays."""
    out = {piece: logprob_value(value)}
    for name, v in zip(names, values, strict=True):
        if name not in out or v > out[name]:
            out[name] = logprob_value(v)
    return out


def prompt_logprobs_field(prompt_ids: list[int], entries: list, pieces: list[str], top_pieces: list[list[str]],
                          top: int) -> list:
    """vLLM's `prompt_logprobs` of a completion choice: None for the first prompt token, then per token
    {token id: {"logprob", "rank", "decoded_token"}} for the token itself and its `top` most likely alternatives."""
    out: list = [None]
    for token, piece, entry, names in zip(prompt_ids[1:], pieces[1:], entries[1:], top_pieces[1:], strict=True):
        value, rank, alternatives = entry
        item = {str(token): {"logprob": logprob_value(value), "rank": rank, "decoded_token": piece}}
        for k, ((tid, v), name) in enumerate(zip(alternatives[:top], names, strict=False)):
            item.setdefault(str(tid), {"logprob": logprob_value(v), "rank": k + 1, "decoded_token": name})
        out.append(item)
    return out


def chat_logprobs(pieces: list[str], entries: list, top_pieces: list[list[str]]) -> dict:
    """The chat `logprobs` object: per token its string, log-probability, UTF-8 bytes and top alternatives."""
    def item(piece: str, lp: float) -> dict:
        return {"token": piece, "logprob": logprob_value(lp), "bytes": list(piece.encode("utf-8", "surrogatepass"))}

    return {"content": [{**item(piece, lp), "top_logprobs": [item(n, v) for n, (_, v) in zip(names, top,
                                                                                                strict=True)]}
                        for piece, (lp, top), names in zip(pieces, entries, top_pieces, strict=True)]}


def chat_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(rid: str, obj: str, model: str, created: int, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if use is not None:
        out["usage"] = use
    return out


def models_response(model: str, created: int, adapters: list[dict] = ()) -> dict:
    """The base model, then each loaded adapter as 'BASE:NAME' with the base as its parent (vLLM's shape)."""
    data = [{"id": model, "object": "model", "created": created, "owned_by": "moe-platform", "root": model,
             "parent": None}]
    # An adapter's root is its name, never where the server read it from (a path on the server is not the API's).
    data += [{"id": f"{model}:{a['name']}", "object": "model", "created": created, "owned_by": "moe-platform",
              "root": a["name"], "parent": model} for a in adapters]
    return {"object": "list", "data": data}


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def now_s() -> int:
    return int(time.time())
