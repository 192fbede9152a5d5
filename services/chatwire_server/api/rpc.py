"""The RPC boundary of ChatService, in one place: every call is authenticated and rate limited, logged with
the edge's request id, counted in the metrics, and every failure becomes a gRPC status with the OpenAI error
body in the `x-chatwire-error` trailer (which the Envoy edge turns into the HTTP body)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from functools import wraps
from typing import Any, Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire_server import metrics, tls, tracing
from chatwire_server.errors import (
    ERROR_METADATA_KEY,
    TRY_ANOTHER_REPLICA,
    ChatwireError,
    InternalError,
    InvalidRequestError,
)
from chatwire_server.limits import Admission

log = logging.getLogger(__name__)

# Request metadata the Envoy edge sets on streams it frames as SSE: end them with a sentinel chunk,
# which the edge rewrites to `data: [DONE]`.
SSE_METADATA_KEY = "x-chatwire-sse"
# Which replica served a call: on every reply, and in the edge's access log.
REPLICA_METADATA_KEY = "x-chatwire-replica"
SSE_DONE_SENTINEL = pb.CreateChatCompletionStreamResponse(object="chatwire.stream.done")
# A chunk whose `id` holds the OpenAI error body of a stream that failed after it started (edge only).
SSE_ERROR_OBJECT = "chatwire.stream.error"


def wants_sse(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller is the SSE edge, which wants the stream sentinels."""
    return dict(context.invocation_metadata() or ()).get(SSE_METADATA_KEY) == "1"


class Undecodable:
    """Stands in for a request whose bytes did not parse, so that its handler answers INVALID_ARGUMENT with the
    usual details and OpenAI body (gRPC itself would answer UNKNOWN, which the edge cannot shape)."""

    def __init__(self, error: Exception) -> None:
        text = str(error)
        if "Depth" in text:
            self.reason = "it nests messages or JSON values more than 100 levels deep"
        elif "UTF-8" in text:
            self.reason = "a string field is not valid UTF-8"
        else:
            self.reason = "its bytes are not a valid message of this method's request type"

    def error(self) -> InvalidRequestError:
        return InvalidRequestError(f"The request could not be decoded: {self.reason}.", code="invalid_request")


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:
            return Undecodable(exc)

    return parse


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer` as the generated `add_..._to_server` does, with request decoding that never fails the
    RPC by itself: an undecodable request reaches its handler as `Undecodable`."""
    captured: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # rebuilt below from the registered handlers

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            captured[service] = handlers

    add_to_server(servicer, Capture())
    for service, handlers in captured.items():
        lenient = {
            name: handler._replace(request_deserializer=_lenient(handler.request_deserializer))
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, lenient),))
        server.add_registered_method_handlers(service, lenient)


Response = TypeVar("Response")
# The RPC being served's admission: its caller's key id and its charge, which the handler reports usage to (each
# RPC runs in its own task, so its own context).
ADMISSION: contextvars.ContextVar[Admission] = contextvars.ContextVar("chatwire_admission")


class Service(Protocol):
    """What the boundary needs from the servicer."""

    # This replica's name, returned with every reply (success or error) as `x-chatwire-replica` metadata.
    replica: str

    async def admit(self, context: grpc.aio.ServicerContext, request: Any) -> Admission: ...

    def settle(self, admission: Admission) -> None: ...

    def model_label(self, request: Any) -> str: ...


async def _abort(context: grpc.aio.ServicerContext, error: ChatwireError, replica: str) -> None:
    """Fail the RPC with the error's status code, `google.rpc` details (ErrorInfo; BadRequest naming the field)
    for gRPC clients, and the OpenAI body as trailing metadata for the edge."""
    info = error_details_pb2.ErrorInfo(reason=(error.code or error.error_type).upper(), domain="chatwire.dev")
    info.metadata["type"] = error.error_type
    if error.param:
        info.metadata["param"] = error.param
    details = [info]
    if error.param:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.param, description=error.message)
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    status = status_pb2.Status(code=error.status.value[0], message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    rich = rpc_status.to_status(status)
    trailers = (
        *rich.trailing_metadata,
        (ERROR_METADATA_KEY, error.to_openai_json()),
        (REPLICA_METADATA_KEY, replica),
        *error.metadata,
    )
    await context.abort(rich.code, rich.details, trailing_metadata=trailers)


def _classify(exc: Exception, record: dict[str, Any]) -> ChatwireError:
    """The client-facing error for a failure, noted in the request's record."""
    if isinstance(exc, ChatwireError):
        error = exc
    else:
        log.exception("unexpected error", extra={"method": record["method"]})
        error = InternalError("The server had an error while processing your request.")
    record.update(status=error.status.name, error_code=error.code)
    return error


@contextlib.contextmanager
def _request_record(method: str, model: str, context: grpc.aio.ServicerContext) -> Iterator[dict[str, Any]]:
    """One log line, the request metrics and a trace span per RPC, with the edge's request id (and the trace's),
    outcome and duration."""
    metadata = dict(context.invocation_metadata() or ())
    record: dict[str, Any] = {"method": method, "request_id": metadata.get("x-request-id", ""), "status": "OK"}
    if model:
        record["model"] = model
    if peer := tls.peer_identity(context):  # the caller's certificate, with mutual TLS
        record["peer"] = peer
    started = time.monotonic()
    try:
        with tracing.rpc_span(method, metadata, record):
            try:
                yield record
            except asyncio.CancelledError:
                record["status"] = "CANCELLED"
                raise
    finally:
        duration = time.monotonic() - started
        record["duration_ms"] = round(duration * 1000, 1)
        log.info("request", extra=record)
        metrics.REQUESTS.labels(method, model, record["status"]).inc()
        metrics.REQUEST_SECONDS.labels(method, model).observe(duration)


@contextlib.asynccontextmanager
async def _admitted(
    service: Service, context: grpc.aio.ServicerContext, request: Any, record: dict[str, Any]
) -> AsyncGenerator[Admission, None]:
    """The call admitted by its key and budgets, for the handler's duration; settled when it ends, however."""
    with tracing.span("admission"):
        admission = await service.admit(context, request)
    record["key"] = admission.key
    ADMISSION.set(admission)
    try:
        yield admission
    except ChatwireError as error:
        admission.passed_on = TRY_ANOTHER_REPLICA in error.metadata
        raise
    finally:
        service.settle(admission)


def unary_errors(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Log a unary handler's calls and map every failure to a gRPC status with an OpenAI error body."""

    @wraps(handler)
    async def wrapper(self: Service, request: Any, context: grpc.aio.ServicerContext) -> Response:
        with _request_record(handler.__name__, self.model_label(request), context) as record:
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                async with _admitted(self, context, request, record) as admission:
                    response = await handler(self, request, context)
                    # Only with a success: an error must stay a trailers-only reply, whose metadata the edge reads.
                    await context.send_initial_metadata([(REPLICA_METADATA_KEY, self.replica), *admission.headers])
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, _classify(exc, record), self.replica)
                raise AssertionError("unreachable: abort raises") from exc

    return wrapper


def stream_errors(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext], AsyncGenerator[Response, None]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], AsyncGenerator[Response, None]]:
    """Log a streaming handler's calls and map every failure to a gRPC status with an OpenAI error body."""

    @wraps(handler)
    async def wrapper(self: Service, request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Response, None]:
        with _request_record(handler.__name__, self.model_label(request), context) as record:
            started = False
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                async with _admitted(self, context, request, record) as admission:
                    # Closed on the way out whatever happens, so that the engine stops at once (not when collected).
                    async with contextlib.aclosing(handler(self, request, context)) as responses:
                        async for response in responses:
                            if not started:  # with the first chunk (see the unary wrapper)
                                metadata = [(REPLICA_METADATA_KEY, self.replica), *admission.headers]
                                await context.send_initial_metadata(metadata)
                            started = True
                            yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                if started and wants_sse(context):
                    # The HTTP status is long sent: the edge turns these sentinels into a last
                    # `data: {"error": ...}` event and `data: [DONE]`, as OpenAI ends a failed stream.
                    error = _classify(exc, record)
                    yield pb.CreateChatCompletionStreamResponse(id=error.to_openai_json(), object=SSE_ERROR_OBJECT)
                    yield SSE_DONE_SENTINEL
                else:
                    await _abort(context, _classify(exc, record), self.replica)

    return wrapper
