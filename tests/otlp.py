"""A real OTLP trace receiver for the tests: OpenTelemetry's own TraceService over gRPC, and the OTLP/HTTP
endpoint (`POST /v1/traces`, protobuf), decoding what Envoy and the servers export into plain records.

Run alone, it prints each trace as a tree once its spans stop arriving (how the README's trace was made):
    PYTHONPATH=services:build/gen/python .venv/bin/python tests/otlp.py --grpc-port 4317 --http-port 4318
With --count it only counts spans, printing the total each second (bench/tracing_cost.py's collector).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {kind: name.removeprefix("SPAN_KIND_").lower() for name, kind in trace_pb2.Span.SpanKind.items()}


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


@dataclass
class Span:
    """One received span."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    status: str  # "unset", "ok" or "error"
    status_message: str
    # How it arrived: "grpc" or "http/protobuf".
    protocol: str = ""

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def event(self, name: str) -> tuple[str, int, dict[str, Any]] | None:
        return next((e for e in self.events if e[0] == name), None)


def decode(request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> list[Span]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    Span(
                        service=str(resource.get("service.name", "")),
                        name=s.name,
                        kind=KINDS[s.kind],
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        events=[
                            (e.name, e.time_unix_nano, {kv.key: _value(kv.value) for kv in e.attributes})
                            for e in s.events
                        ],
                        status=("unset", "ok", "error")[s.status.code],
                        status_message=s.status.message,
                        protocol=protocol,
                    )
                )
    return spans


@dataclass
class Receiver:
    """Collects every span exported to it; `delay_s` makes it a slow collector (each export waits that long);
    `keep` false only counts them (a collector on another machine, for the benchmark: little work here)."""

    delay_s: float = 0.0
    keep: bool = True
    spans: list[Span] = field(default_factory=list)
    counted: int = 0
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def export(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if not self.keep:
            with self._lock:
                self.counted += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            return
        spans = decode(request, protocol)
        with self._lock:
            self.spans.extend(spans)
            self.counted += len(spans)
            self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def received(self) -> list[Span]:
        """Every span received so far."""
        with self._lock:
            return list(self.spans)

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.received() if s.trace_id == trace_id]

    def wait_for(self, found: Callable[[list[Span]], bool], timeout: float = 20) -> list[Span]:
        """Every span received, once `found` holds for them (or the timeout ends: the caller's asserts tell)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not found(self.spans) and time.monotonic() < deadline:
                self._lock.wait(0.2)
            return list(self.spans)

    def wait_for_trace(self, trace_id: str, *names: str, timeout: float = 20) -> dict[str, Span]:
        """The trace's spans by name (the last of a name), once every one of `names` arrived."""

        def complete(spans: list[Span]) -> bool:
            return set(names) <= {s.name for s in spans if s.trace_id == trace_id}

        spans = [s for s in self.wait_for(complete, timeout) if s.trace_id == trace_id]
        received = {s.name: s for s in spans}
        assert set(names) <= set(received), f"missing {set(names) - set(received)}; got:\n{tree(spans)}"
        return received


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.export(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self._body()
            if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                self.send_response(404 if self.path != "/v1/traces" else 415)
                self.end_headers()
                return
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            receiver.export(request, "http/protobuf")
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() != "chunked":  # Envoy sends chunks
                return self.rfile.read(int(self.headers.get("content-length", 0)))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


class Listening:
    """The receiver's gRPC and HTTP endpoints, serving until `stop`."""

    def __init__(self, receiver: Receiver, grpc_port: int, http_port: int) -> None:
        self.receiver = receiver
        self.grpc_port, self.http_port = grpc_port, http_port
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(receiver), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{grpc_port}")
        self._grpc.start()
        self._http = ThreadingHTTPServer(("127.0.0.1", http_port), _http_handler(receiver))
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def endpoint(self, protocol: str) -> str:
        """OTEL_EXPORTER_OTLP_ENDPOINT for `protocol`."""
        port = self.grpc_port if protocol == "grpc" else self.http_port
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()


def tree(spans: list[Span], *, details: bool = False) -> str:
    """The spans as indented trees, children in start order (a parent not received is shown as a root)."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[Span]] = {}
    for s in spans:
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)

    def lines(parent: str, depth: int, origin: int) -> Iterator[str]:
        for s in sorted(children.get(parent, []), key=lambda s: s.start_ns):
            offset = (s.start_ns - origin) / 1e6
            line = f"{'  ' * depth}{s.name}  [{s.service}, {s.kind}]  +{offset:.1f} ms, {s.duration_ms:.1f} ms"
            if s.status == "error":
                line += f"  ERROR {s.status_message}"
            yield line
            if details:
                for key, value in sorted(s.attributes.items()):
                    if key.startswith(("gen_ai.", "rpc.grpc", "chatwire.request_id", "http.status", "error")):
                        yield f"{'  ' * depth}    {key} = {value}"
            yield from lines(s.span_id, depth + 1, origin)

    out = []
    for root in sorted(children.get("", []), key=lambda s: s.start_ns):
        out.append(f"{root.name}  [{root.service}, {root.kind}]  {root.duration_ms:.1f} ms  trace {root.trace_id}")
        out.extend(lines(root.span_id, 1, root.start_ns))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="print received OTLP traces as trees")
    parser.add_argument("--grpc-port", type=int, default=4317)
    parser.add_argument("--http-port", type=int, default=4318)
    parser.add_argument("--count", action="store_true", help="only count the spans received")
    args = parser.parse_args()
    # Held here: a gRPC server that is garbage-collected stops serving.
    listening = Listening(Receiver(keep=not args.count), args.grpc_port, args.http_port)
    receiver, printed = listening.receiver, 0
    while True:
        time.sleep(1)
        if args.count:
            print(f"spans {receiver.counted}", flush=True)
            continue
        spans = receiver.received()
        if len(spans) > printed and time.time_ns() - max(s.end_ns for s in spans) > 2e9:
            print(tree(spans[printed:], details=True), flush=True)
            printed = len(spans)


if __name__ == "__main__":
    main()
