"""Errors in OpenAI's shape, and their gRPC status codes: the one place where both are decided."""

from __future__ import annotations

import json
from typing import Any

import grpc

# Error bodies travel as gRPC trailing metadata (and in logs): a client's value echoed whole could push them past
# gRPC's metadata limits and fail the reply. Echoed values are quoted short, and messages are capped.
MAX_ECHO_CHARS = 80
MAX_MESSAGE_CHARS = 2000
MAX_PARAM_CHARS = 200


def quote(value: Any, limit: int = MAX_ECHO_CHARS) -> str:
    """A client's value for an error message, cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _capped(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "..."


class ChatwireError(Exception):
    """An error the client should see: OpenAI's `message`, `type`, `param`, `code`, plus a gRPC status."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        metadata: list[tuple[str, str]] | None = None,
    ) -> None:
        message = _capped(message, MAX_MESSAGE_CHARS) or ""
        super().__init__(message)
        self.message = message
        self.param = _capped(param, MAX_PARAM_CHARS)
        self.code = code
        if error_type is not None:
            self.error_type = error_type
        # Extra trailing metadata, which the edge returns as HTTP headers (e.g. `retry-after`).
        self.metadata = metadata or []

    def to_openai_json(self) -> str:
        """The OpenAI error body. ASCII-only, so it can travel as gRPC metadata."""
        body = {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }
        return json.dumps(body, ensure_ascii=True, separators=(",", ":"))


class InvalidRequestError(ChatwireError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class AuthenticationError(ChatwireError):
    """No API key, or a wrong one (HTTP 401)."""

    status = grpc.StatusCode.UNAUTHENTICATED
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class PermissionDeniedError(ChatwireError):
    """A valid key that may not do this (HTTP 403)."""

    status = grpc.StatusCode.PERMISSION_DENIED
    error_type = "invalid_request_error"


class ModelNotFoundError(ChatwireError):
    """No model has the requested id (HTTP 404)."""

    status = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{quote(model)}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )


class RateLimitError(ChatwireError):
    """The server is at capacity (HTTP 429); the client should retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"


class ServiceUnavailableError(ChatwireError):
    """The engine cannot serve right now (HTTP 503)."""

    status = grpc.StatusCode.UNAVAILABLE
    error_type = "server_error"


class UpstreamError(ChatwireError):
    """The server a model is forwarded to (engine `openai`) failed, could not be reached, or timed out: HTTP 502,
    503 or 504 (the edge sets the HTTP status from `HTTP_STATUS_METADATA_KEY`), gRPC UNAVAILABLE."""

    status = grpc.StatusCode.UNAVAILABLE
    error_type = "server_error"

    def __init__(self, message: str, *, http_status: int = 502) -> None:
        super().__init__(message, code="upstream_error", metadata=[(HTTP_STATUS_METADATA_KEY, str(http_status))])
        self.http_status = http_status


class InternalError(ChatwireError):
    """A fault in the server (HTTP 500). The message never carries internals."""

    status = grpc.StatusCode.INTERNAL
    error_type = "server_error"


# Trailing metadata key carrying the OpenAI error body; the Envoy edge turns it into the HTTP body.
ERROR_METADATA_KEY = "x-chatwire-error"
# The HTTP status the edge answers for an error whose gRPC status alone would say otherwise (UNAVAILABLE is 503;
# an upstream's failure is 502 and its time-out 504).
HTTP_STATUS_METADATA_KEY = "x-chatwire-http-status"
# On errors where this replica cannot take the request now but another may (its queue is full, its engine is
# restarting), before any work: the edge retries the request once on another replica.
TRY_ANOTHER_REPLICA = ("x-chatwire-retry-elsewhere", "1")
