"""Errors the engine raises for a request, each knowing which HTTP status and OpenAI error fields it maps to."""

from __future__ import annotations


class ServingError(Exception):
    """Base class: `status`, `type`, `param` and `code` fill the OpenAI error object `{"error": {...}}`."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(ServingError, ValueError):
    """The client sent something the engine cannot serve (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class NotFoundError(InvalidRequestError):
    """What the request names (a model, an adapter) does not exist here (HTTP 404)."""

    status = 404


class ContextLengthError(InvalidRequestError):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context window."""

    def __init__(self, message: str, param: str | None = "prompt"):
        super().__init__(message, param=param, code="context_length_exceeded")


class EngineOverloadedError(ServingError):
    """The engine's waiting queue is full; the client should retry after `retry_after_s` (HTTP 429)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message, code="overloaded")
        self.retry_after_s = retry_after_s


class EngineUnavailableError(ServingError):
    """The engine stopped or failed; another replica (or a restart) must serve the request (HTTP 503)."""

    status = 503
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="engine_unavailable")


class RequestFailedError(ServingError):
    """The server failed while generating this request alone (HTTP 500); the engine serves the others on."""

    status = 500
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="request_failed")
