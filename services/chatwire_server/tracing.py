"""OpenTelemetry traces of every call, exported over OTLP where the standard OTEL_* variables say.

Off unless OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT is set (OTEL_SDK_DISABLED=true or
OTEL_TRACES_EXPORTER=none keep it off): then OpenTelemetry is not even imported and every hook here is a no-op.
When on, OTEL_EXPORTER_OTLP_PROTOCOL picks the exporter (`http/protobuf`, the specification's default, or `grpc`;
the edge reads these the same way, in `edge.envoy_tracing`), and the SDK reads the rest of the standard variables
itself: OTEL_SERVICE_NAME (default `chatwire`), OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT,
_CERTIFICATE, OTEL_BSP_*. OTEL_TRACES_SAMPLER(_ARG) gives the ratio of new traces, read as the edge reads it;
a caller's decision is always followed. Spans leave in the
background (a batch processor with a bounded queue): a collector that is down or slow loses spans, never delays a reply.

Each call is one tree, under the span of the edge (or of whoever sent `traceparent`):

    chatwire.v1.ChatService/<Method>   SERVER: rpc.*, the OpenAI error code as its status
    ├── admission                      API key, model access, budgets (the shared store's round trip)
    ├── validate                       the request checked and converted, grammars compiled
    └── chat <model>                   gen_ai.* attributes; a CLIENT span for a relayed model, whose
        ├── queue                      `traceparent` the upstream server receives
        ├── prefill                    an event per step of the prompt's evaluation
        └── decode                     first token to last

The engine's spans are made here from the `Timings` it reports with each choice's end: the worker process that
runs the engine sends times, not spans, so one process exports one service's spans. No prompt or reply text is
recorded unless OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true (GenAI instrumentations' setting).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from chatwire_server.domain import ChatRequest, Finished, TextDelta
from chatwire_server.edge import envoy_tracing
from chatwire_server.errors import ChatwireError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, Tracer

SERVICE = "chatwire.v1.ChatService"
CAPTURE_CONTENT_SETTING = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# How long a stopping server waits for its last spans to leave.
SHUTDOWN_TIMEOUT_MS = 2000


@dataclass
class _Tracing:
    """The SDK's pieces, once configured."""

    provider: TracerProvider
    tracer: Tracer
    capture_content: bool


_TRACING: _Tracing | None = None


@dataclass(frozen=True)
class _Call:
    """The traced RPC being served: its span's context (the parent of the spans below) and when it arrived."""

    context: Context
    started_ns: int


# The RPC being served (each RPC runs in a task of its own, so a context of its own).
_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("chatwire_trace", default=None)


def configure(environ: Mapping[str, str] = os.environ) -> bool:
    """Start exporting spans if the environment asks for it; whether it does."""
    global _TRACING
    if not envoy_tracing.exporting(environ):
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if envoy_tracing.protocol(environ) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": "chatwire"})
    provider = TracerProvider(resource=resource, sampler=_parent_based(environ))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    capture = environ.get(CAPTURE_CONTENT_SETTING, "").lower() == "true"
    _TRACING = _Tracing(provider, provider.get_tracer("chatwire_server"), capture)
    return True


def _parent_based(environ: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER's sampler, always deferring to a caller's decision (`traceidratio` becomes
    `parentbased_traceidratio`): the edge samples the traces it starts, so a server that decided again would
    leave halves of traces."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    percent = envoy_tracing.sampling_percent(environ)
    return ParentBased(root=TraceIdRatioBased(percent / 100))


def shutdown() -> None:
    """Send the spans still queued (for a bounded time) and stop exporting."""
    global _TRACING
    if _TRACING is not None:
        _TRACING.provider.force_flush(SHUTDOWN_TIMEOUT_MS)
        _TRACING.provider.shutdown()
        _TRACING = None


def _after_reply(finish: Callable[[], None]) -> None:
    """Run `finish` (ending spans, at the times already taken) once the reply is on its way: on the event loop's
    next turn, after gRPC has handed the reply to its transport, rather than in front of it."""
    try:
        asyncio.get_running_loop().call_soon(finish)
    except RuntimeError:  # no event loop (a unit test): now
        finish()


def _error(span: Span, code: str, message: str = "") -> None:
    """Error status described by `code`; the error's message too only where message content is recorded (it may
    quote the request, or an upstream's reply)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", code)
    capturing = _TRACING is not None and _TRACING.capture_content
    span.set_status(Status(StatusCode.ERROR, f"{code}: {message}" if message and capturing else code))


def _failed(span: Span, exc: BaseException) -> None:
    """Mark `span` with the failure that ends it: an OpenAI error's code, or the exception's type. A call the
    client gave up (cancelled, closed early) is not a failure: an event says so."""
    if isinstance(exc, ChatwireError):
        _error(span, exc.code or exc.error_type, exc.message)
    elif isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        span.add_event("cancelled")
    elif not isinstance(exc, grpc.aio.AbortError):
        _error(span, type(exc).__name__, str(exc))


@contextlib.contextmanager
def rpc_span(method: str, metadata: Mapping[str, str], record: dict[str, Any]) -> Iterator[None]:
    """The SERVER span of one RPC, continuing the caller's W3C `traceparent` (the edge's or a gRPC client's). The
    request's log `record` gains the trace id, and gives the span its outcome: `status` (a gRPC code's name) and
    `error_code` (OpenAI's), as `_request_record` fills them in."""
    if _TRACING is None:
        yield
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind, set_span_in_context

    started = time.time_ns()
    attributes = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method}
    if request_id := metadata.get("x-request-id"):
        attributes["chatwire.request_id"] = request_id
    span = _TRACING.tracer.start_span(
        f"{SERVICE}/{method}", extract(metadata), kind=SpanKind.SERVER, attributes=attributes, start_time=started
    )
    record["trace_id"] = format(span.get_span_context().trace_id, "032x")
    _CALL.set(_Call(set_span_in_context(span), started))
    try:
        yield
    finally:
        ended = time.time_ns()
        status = record.get("status", "OK")
        outcome = {f"chatwire.{name}": record[name] for name in ("key", "model", "peer") if name in record}
        outcome["rpc.grpc.status_code"] = grpc.StatusCode[status].value[0]
        error = record.get("error_code") or (status if status not in ("OK", "CANCELLED") else None)

        def finish() -> None:
            span.set_attributes(outcome)
            if error:
                _error(span, error)
            span.end(ended)

        _after_reply(finish)


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    """A step of the RPC being served (admission, validation), as a child of its span: timed now, recorded once the
    call is waiting on something else (making a span takes the SDK tens of microseconds)."""
    call = _CALL.get()
    if _TRACING is None or call is None:
        yield
        return
    started, failure = time.time_ns(), None
    try:
        yield
    except BaseException as exc:
        failure = exc
        raise
    finally:
        ended, tracer = time.time_ns(), _TRACING.tracer

        def record() -> None:
            child = tracer.start_span(name, call.context, start_time=started)
            if failure is not None:
                _failed(child, failure)
            child.end(ended)

        _after_reply(record)


class Generation:
    """The `chat <model>` span of one completion: what was asked (`gen_ai.request.*`), what came back
    (`gen_ai.response.*`, `gen_ai.usage.*`) and where the time went (vLLM's `gen_ai.latency.*`, in seconds, from
    the call's arrival at this server). Fed by the servicer as events arrive; `None` stands for it when the call
    is not traced, so the servicer's hooks are `if traced:` checks."""

    def __init__(self, opening: Callable[[], Span], call: _Call, capture_content: bool) -> None:
        # The span is made when it is first needed: for a relayed call, when its request leaves; otherwise when
        # the call ends, with the times taken meanwhile (off the path to the first token).
        self._opening: Callable[[], Span] | None = opening
        self._opened: Span | None = None
        self._call = call
        self._capture = capture_content
        # Set on the span in one go when it ends (each call to the SDK takes a lock).
        self._attributes: dict[str, Any] = {}
        self._first_token_ns = 0
        self._texts: dict[int, list[str]] = {}
        self._reasons: dict[int, str] = {}
        self._finished: list[Finished] = []

    def headers(self) -> dict[str, str]:
        """W3C trace context naming this span as the parent, for the request to a relayed model's server."""
        from opentelemetry.propagate import inject
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        inject(carrier, set_span_in_context(self._span()))
        return carrier

    def _span(self) -> Span:
        if self._opened is None:
            assert self._opening is not None
            self._opened, self._opening = self._opening(), None
        return self._opened

    def response(self, response_id: str, model: str | None = None) -> None:
        self._attributes["gen_ai.response.id"] = response_id
        if model:
            self._attributes["gen_ai.response.model"] = model

    def delta(self, event: TextDelta) -> None:
        """Generated text of one choice (the first marks the first token)."""
        self.output(event.index, event.text)

    def output(self, index: int, text: str) -> None:
        """Generated text of choice `index` (as an upstream sent it: only recorded, as text, when asked to)."""
        if not self._first_token_ns:
            self._first_token_ns = time.time_ns()
            self._latency("time_to_first_token", self._first_token_ns)
        if self._capture:
            self._texts.setdefault(index, []).append(str(text))

    def finished(self, event: Finished) -> None:
        """One choice's end, with the engine's counts and timings."""
        self._reasons[event.index] = event.finish_reason
        self._finished.append(event)

    def finish_reason(self, index: int, reason: str) -> None:
        self._reasons[index] = reason

    def usage(self, input_tokens: int, output_tokens: int, cached_tokens: int) -> None:
        self._attributes["gen_ai.usage.input_tokens"] = input_tokens
        self._attributes["gen_ai.usage.output_tokens"] = output_tokens
        self._attributes["gen_ai.usage.cache_read.input_tokens"] = cached_tokens

    def _latency(self, name: str, at_ns: int) -> None:
        self._attributes[f"gen_ai.latency.{name}"] = (at_ns - self._call.started_ns) / 1e9

    def end(self, exc: BaseException | None) -> None:
        ended = time.time_ns()
        _after_reply(lambda: self._finish(exc, ended))

    def _finish(self, exc: BaseException | None, ended: int) -> None:
        span = self._span()
        try:
            self._describe(span, exc, ended)
        finally:  # whatever the reply held, the span ends
            span.end(ended)

    def _describe(self, span: Span, exc: BaseException | None, ended: int) -> None:
        if self._first_token_ns:
            span.add_event("first_token", timestamp=self._first_token_ns)
        if self._reasons:
            reasons = [self._reasons[i] for i in sorted(self._reasons)]
            self._attributes["gen_ai.response.finish_reasons"] = reasons
        if self._finished:
            first = self._finished[0]
            self.usage(first.prompt_tokens, sum(f.completion_tokens for f in self._finished), first.cached_tokens)
            self._engine_spans()
        if self._capture and self._texts:
            output = [
                {"role": "assistant", "parts": [{"type": "text", "content": "".join(self._texts[i])}]}
                for i in sorted(self._texts)
            ]
            self._attributes["gen_ai.output.messages"] = json.dumps(output)
        self._latency("e2e", ended)
        span.set_attributes(self._attributes)
        if exc is not None:
            _failed(span, exc)

    def _engine_spans(self) -> None:
        """queue, prefill and decode, as the engine timed them (engines that do not time report nothing)."""
        timed = [f.timings for f in self._finished if f.timings is not None]
        if not timed or _TRACING is None:
            return
        from opentelemetry.trace import set_span_in_context

        first, last = timed[0], max(t.finished for t in timed)
        parent = set_span_in_context(self._span())
        tracer = _TRACING.tracer
        tracer.start_span("queue", parent, start_time=first.queued).end(first.scheduled)
        prefill = tracer.start_span("prefill", parent, start_time=first.scheduled)
        for started, ended, tokens in first.prefill_steps:
            attributes = {"gen_ai.prefill.tokens": tokens, "duration_s": (ended - started) / 1e9}
            prefill.add_event("prefill_step", attributes, timestamp=ended)
        prefill.end(first.prefilled)
        tracer.start_span("decode", parent, start_time=first.prefilled).end(last)
        self._attributes["gen_ai.latency.time_in_queue"] = (first.scheduled - first.queued) / 1e9
        self._attributes["gen_ai.latency.time_in_model_prefill"] = (first.prefilled - first.scheduled) / 1e9
        self._attributes["gen_ai.latency.time_in_model_decode"] = (last - first.prefilled) / 1e9


def _request_attributes(model: str, max_tokens: Any, temperature: Any, top_p: Any, seed: Any, n: Any) -> dict[str, Any]:
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": model}
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
        ("choice.count", n),
    ):
        if value is not None:
            attributes[f"gen_ai.request.{name}"] = value
    return attributes


@contextlib.contextmanager
def generation(chat: ChatRequest) -> Iterator[Generation | None]:
    """The span of a completion by an engine of this server."""
    sampling = chat.sampling
    with _generation(
        chat.model,
        lambda: _request_attributes(
            chat.model, sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed, chat.n
        ),
        lambda: [{"role": m.role, "parts": [{"type": "text", "content": m.content or ""}]} for m in chat.messages],
        relayed=False,
    ) as traced:
        yield traced


@contextlib.contextmanager
def relayed_generation(model: str, body: Mapping[str, Any]) -> Iterator[Generation | None]:
    """The span of a completion relayed to another server (`body`: the OpenAI JSON sent there)."""
    with _generation(
        model,
        lambda: _request_attributes(
            model,
            body.get("max_completion_tokens", body.get("max_tokens")),
            body.get("temperature"),
            body.get("top_p"),
            body.get("seed"),
            body.get("n"),
        ),
        lambda: body.get("messages", []),
        relayed=True,
    ) as traced:
        yield traced


@contextlib.contextmanager
def _generation(
    model: str, attributes: Callable[[], dict[str, Any]], messages: Callable[[], Any], *, relayed: bool
) -> Iterator[Generation | None]:
    """The `chat <model>` span around a completion; its request `attributes` and `messages` (recorded only when
    message content is) are read when the span is made."""
    call = _CALL.get()
    if _TRACING is None or call is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    kind = SpanKind.CLIENT if relayed else SpanKind.INTERNAL
    tracer, capture, started = _TRACING.tracer, _TRACING.capture_content, time.time_ns()

    def opening() -> Span:
        first = {**attributes(), "chatwire.relayed": relayed}
        if capture:
            first["gen_ai.input.messages"] = json.dumps(messages())
        return tracer.start_span(f"chat {model}", call.context, kind=kind, attributes=first, start_time=started)

    traced = Generation(opening, call, capture)
    try:
        yield traced
    except BaseException as exc:
        traced.end(exc)
        raise
    traced.end(None)
