"""OpenTelemetry traces, received by a real OTLP receiver (tests/otlp.py: OpenTelemetry's own TraceService over
gRPC, and OTLP/HTTP): Envoy's spans and the servers' continue one trace, from the client's `traceparent` through
the edge, the RPC, admission, validation and the engine's queue, prefill and decode, with the reply's figures as
attributes; to a relayed model's upstream server too. Errors and cancellations end their spans with their status,
the sampler's ratio holds, and a collector that is slow or down never delays a reply."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from chatwire_server import tracing
from chatwire_server.api import relayed
from chatwire_server.edge import envoy_tracing, stack
from conftest import (
    MODEL,
    NO_END_BIAS,
    Stack,
    engine_workers,
    free_ports,
    logged,
    make_run,
    make_run_env,
    run_stack,
)
from otlp import Listening, Receiver, Span, tree

pytestmark = pytest.mark.tracing

HELLO = [{"role": "user", "content": "Say hello in three words."}]
RPC = "chatwire.v1.ChatService/"
CHAT = f"chat {MODEL}"
RELAYED = "relayed-smollm2"


def traceparent() -> tuple[str, str, str]:
    """A client's W3C `traceparent` (sampled), with its trace and span ids."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def exporting(listening: Listening | str, protocol: str, **more: str) -> dict[str, str]:
    """OTEL_* settings exporting to `listening` (or an endpoint URL) over `protocol`, batches sent within 100 ms."""
    endpoint = listening if isinstance(listening, str) else listening.endpoint(protocol)
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **more,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[Listening]:
    listening = Listening(Receiver(), stack.free_port(), stack.free_port())
    yield listening
    listening.stop()


@contextlib.contextmanager
def traced_stack(
    request: pytest.FixtureRequest,
    listening: Listening | str,
    edge: str,
    server: str,
    config: Path | None = None,
    **more: str,
) -> Iterator[Stack]:
    """A stack whose edge exports over `edge` and whose server exports over `server` (protocols)."""
    with run_stack(
        request,
        config or stack.DEFAULT_CONFIG,
        server_env=exporting(listening, server, **more),
        **exporting(listening, edge, **more),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def upstream(request: pytest.FixtureRequest, receiver: Listening) -> Iterator[Stack]:
    """A second chatwire that traces too (the edge over HTTP, the server over gRPC), recording message content."""
    more = {"OTEL_SERVICE_NAME": "upstream", "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}
    with traced_stack(request, receiver, "http/protobuf", "grpc", **more) as running:
        yield running


@pytest.fixture(scope="module")
def traced(
    request: pytest.FixtureRequest, receiver: Listening, upstream: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The stack under test: the edge exports over gRPC, the server over HTTP; one model relays to `upstream`."""
    config = tmp_path_factory.mktemp("traced") / "models.toml"
    relay = f'\n[[models]]\nid = "{RELAYED}"\nengine = "openai"\n[models.settings]\n'
    relay += f'base_urls = ["{upstream.base_url}"]\nmodel = "{MODEL}"\n'
    config.write_text(stack.DEFAULT_CONFIG.read_text() + relay)
    with traced_stack(request, receiver, "grpc", "http/protobuf", config) as running:
        yield running


def chat(running: Stack, header: str, **body: object) -> httpx.Response:
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 8, **body}
    return httpx.post(
        f"{running.base_url}/chat/completions", json=request, headers={"traceparent": header}, timeout=120
    )


def child(spans: dict[str, Span], name: str, parent: Span) -> Span:
    span = spans[name]
    assert span.parent_id == parent.span_id, f"{name} is not a child of {parent.name}"
    assert parent.start_ns <= span.start_ns <= span.end_ns <= parent.end_ns + 1_000_000, name
    return span


def test_an_http_request_is_one_trace_from_the_client_to_the_engine(traced: Stack, receiver: Listening) -> None:
    header, trace_id, client_span = traceparent()
    reply = chat(traced, header)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    names = ("POST /v1/chat/completions", "router chatwire_grpc egress", f"{RPC}CreateChatCompletion")
    spans = receiver.receiver.wait_for_trace(
        trace_id, *names, "admission", "validate", CHAT, "queue", "prefill", "decode"
    )
    print(tree(list(spans.values()), details=True))

    edge = spans["POST /v1/chat/completions"]
    assert edge.parent_id == client_span and edge.kind == "server" and edge.service == "chatwire-edge"
    assert edge.protocol == "grpc" and edge.attributes["http.status_code"] == "200"
    attempt = child(spans, "router chatwire_grpc egress", edge)
    rpc = child(spans, f"{RPC}CreateChatCompletion", attempt)
    assert rpc.kind == "server" and rpc.service == "chatwire" and rpc.protocol == "http/protobuf"
    assert rpc.attributes["rpc.grpc.status_code"] == 0 and rpc.status == "unset"
    assert rpc.attributes["chatwire.request_id"] == reply.headers["x-request-id"]
    admission, validate = child(spans, "admission", rpc), child(spans, "validate", rpc)
    generation = child(spans, CHAT, rpc)
    assert admission.end_ns <= validate.start_ns and validate.end_ns <= generation.start_ns
    queue, prefill, decode = (child(spans, name, generation) for name in ("queue", "prefill", "decode"))
    assert queue.end_ns <= prefill.start_ns and prefill.end_ns <= decode.start_ns

    # The reply's own figures.
    attributes = generation.attributes
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.response.id"] == body["id"]
    assert attributes["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    usage = body["usage"]
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    # The engine's timings (vLLM's attributes, seconds from the call's arrival), each prefill step an event.
    latency = {name.removeprefix("gen_ai.latency."): v for name, v in attributes.items() if "latency" in name}
    assert 0 <= latency["time_in_queue"] < latency["time_to_first_token"] <= latency["e2e"] <= rpc.duration_ms / 1e3
    assert latency["time_in_model_prefill"] == pytest.approx(prefill.duration_ms / 1e3, abs=1e-3)
    steps = [event for event in prefill.events if event[0] == "prefill_step"]
    assert (
        sum(e[2]["gen_ai.prefill.tokens"] for e in steps)
        == usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
    )
    assert generation.event("first_token") is not None
    # No prompt or reply text unless asked for.
    assert not any("messages" in name for name in attributes)

    # The logs name the trace beside the request id.
    assert logged(traced.envoy_log, reply.headers["x-request-id"])["trace_id"] == trace_id
    assert logged(traced.server_log, reply.headers["x-request-id"], msg="request")["trace_id"] == trace_id


def test_a_stream_through_the_sdk(traced: Stack, receiver: Listening) -> None:
    header, trace_id, _ = traceparent()
    client = openai.OpenAI(base_url=traced.base_url, api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=6,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"traceparent": header},
        )
    )
    spans = receiver.receiver.wait_for_trace(trace_id, f"{RPC}StreamChatCompletion", CHAT, "decode")
    generation = spans[CHAT]
    reasons = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    }
    assert generation.attributes["gen_ai.response.finish_reasons"] == [reasons[0], reasons[1]]
    assert generation.attributes["gen_ai.response.id"] == chunks[0].id
    assert generation.attributes["gen_ai.request.choice.count"] == 2
    usage = chunks[-1].usage
    assert usage is not None and generation.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert spans[f"{RPC}StreamChatCompletion"].attributes["rpc.grpc.status_code"] == 0


@pytest.mark.parametrize("through_edge", [False, True], ids=["replica", "grpc-edge"])
def test_a_grpc_call_continues_its_callers_trace(traced: Stack, receiver: Listening, through_edge: bool) -> None:
    header, trace_id, caller_span = traceparent()
    target = traced.grpc_edge_target if through_edge else traced.grpc_target
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4}
    request = json_format.ParseDict(body, pb.CreateChatCompletionRequest())
    with grpc.insecure_channel(target) as channel:
        reply = chat_service_pb2_grpc.ChatServiceStub(channel).CreateChatCompletion(
            request, metadata=[("traceparent", header)], timeout=60
        )
    edge_names = ("grpc chatwire.v1.ChatService", "router chatwire_grpc egress") if through_edge else ()
    spans = receiver.receiver.wait_for_trace(trace_id, f"{RPC}CreateChatCompletion", CHAT, *edge_names)
    rpc = spans[f"{RPC}CreateChatCompletion"]
    assert spans[CHAT].attributes["gen_ai.response.id"] == reply.id
    if through_edge:  # the internal listener's span, then its try at a replica
        edge = spans["grpc chatwire.v1.ChatService"]
        assert edge.parent_id == caller_span and edge.service == "chatwire-edge"
        assert spans["router chatwire_grpc egress"].parent_id == edge.span_id
        assert rpc.parent_id == spans["router chatwire_grpc egress"].span_id
    else:
        assert rpc.parent_id == caller_span


def test_a_bad_request_sets_error_status_with_the_openai_code(traced: Stack, receiver: Listening) -> None:
    header, trace_id, _ = traceparent()
    reply = chat(traced, header, temperature=5)
    assert reply.status_code == 400
    code = reply.json()["error"]["code"]
    spans = receiver.receiver.wait_for_trace(
        trace_id, "POST /v1/chat/completions", f"{RPC}CreateChatCompletion", "validate"
    )
    for name in (f"{RPC}CreateChatCompletion", "validate"):
        span = spans[name]
        # The code alone: an error's message may quote the request, recorded only with message content.
        assert span.status == "error" and span.status_message == code, span
        assert span.attributes["error.type"] == code
    assert (
        spans[f"{RPC}CreateChatCompletion"].attributes["rpc.grpc.status_code"]
        == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    assert spans["POST /v1/chat/completions"].attributes["http.status_code"] == "400"
    assert CHAT not in spans  # nothing reached the engine


@contextlib.contextmanager
def long_stream(running: Stack, header: str) -> Iterator[Iterator[str]]:
    """A stream of a long reply, traced under `header`, whose lines the test reads (and leaves) as it likes."""
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 400, "logit_bias": NO_END_BIAS, "stream": True}
    url = f"{running.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, headers={"traceparent": header}, timeout=60) as reply:
        lines = reply.iter_lines()
        for _ in range(6):  # the stream is under way
            next(lines)
        yield lines


@pytest.mark.parametrize("path", ["/v1/models", "/v1/unknown"])
def test_no_query_string_reaches_a_span(traced: Stack, receiver: Listening, path: str) -> None:
    # Clients put API keys in query strings; the edge's span, like its access log, never holds one.
    header, trace_id, _ = traceparent()
    url = f"http://127.0.0.1:{traced.ports.http}{path}?api_key=sk-secret-in-the-query"
    httpx.get(url, headers={"traceparent": header}, timeout=30)
    spans = receiver.receiver.wait_for(lambda all: any(s.trace_id == trace_id and s.kind == "server" for s in all))
    edge = [s for s in spans if s.trace_id == trace_id]
    assert edge and all("sk-secret" not in json.dumps(s.attributes) for s in edge), edge


def test_a_cancelled_stream_ends_its_spans(traced: Stack, receiver: Listening) -> None:
    header, trace_id, _ = traceparent()
    with long_stream(traced, header):
        pass  # the client goes away
    spans = receiver.receiver.wait_for_trace(trace_id, f"{RPC}StreamChatCompletion", CHAT)
    rpc, generation = spans[f"{RPC}StreamChatCompletion"], spans[CHAT]
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0] and rpc.status == "unset"
    assert generation.event("cancelled") is not None and generation.status == "unset"
    assert generation.end_ns <= rpc.end_ns


def test_an_engine_failure_sets_error_status(traced: Stack, receiver: Listening) -> None:
    header, trace_id, _ = traceparent()
    with long_stream(traced, header) as lines:
        [worker] = engine_workers(traced.server_pid)
        os.kill(worker, signal.SIGKILL)  # as the OOM killer would
        rest = list(lines)
    assert any('"engine_failed"' in line for line in rest)
    spans = receiver.receiver.wait_for_trace(trace_id, f"{RPC}StreamChatCompletion", CHAT)
    for name in (f"{RPC}StreamChatCompletion", CHAT):
        assert spans[name].status == "error" and spans[name].attributes["error.type"] == "engine_failed", name
    _wait_until_served(traced)


def _wait_until_served(running: Stack) -> None:
    deadline = time.monotonic() + 60
    while chat(running, traceparent()[0]).status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.2)


def test_a_relayed_request_continues_the_trace_on_the_upstream_server(
    traced: Stack, upstream: Stack, receiver: Listening
) -> None:
    header, trace_id, _ = traceparent()
    reply = chat(traced, header, model=RELAYED, max_tokens=5)
    assert reply.status_code == 200, reply.text
    relayed_chat = f"chat {RELAYED}"
    spans = [
        s
        for s in receiver.receiver.wait_for(
            lambda all: (
                sum(s.trace_id == trace_id and s.name.startswith("chat ") for s in all) == 2
                and sum(s.trace_id == trace_id and s.service == "upstream-edge" for s in all) == 2
            )
        )
        if s.trace_id == trace_id
    ]
    print(tree(spans))
    by = {(s.service, s.name): s for s in spans}
    front = by[("chatwire", relayed_chat)]
    assert front.kind == "client" and front.attributes["chatwire.relayed"] is True
    # The upstream's edge continues from the front's span of the relayed call: one trace spans both.
    upstream_edge = by[("upstream-edge", "POST /v1/chat/completions")]
    assert upstream_edge.parent_id == front.span_id and upstream_edge.protocol == "http/protobuf"
    upstream_rpc = by[("upstream", f"{RPC}CreateChatCompletion")]
    assert upstream_rpc.protocol == "grpc"
    upstream_chat = by[("upstream", CHAT)]
    assert upstream_chat.parent_id == upstream_rpc.span_id
    # The front reports what the upstream answered.
    body = reply.json()
    assert front.attributes["gen_ai.response.id"] == body["id"] == upstream_chat.attributes["gen_ai.response.id"]
    assert front.attributes["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert front.attributes["gen_ai.response.finish_reasons"] == [body["choices"][0]["finish_reason"]]
    # The upstream was asked to record message content; the front was not.
    reply_text = body["choices"][0]["message"]["content"]
    assert json.loads(upstream_chat.attributes["gen_ai.output.messages"])[0]["parts"][0]["content"] == reply_text
    assert "Say hello" in upstream_chat.attributes["gen_ai.input.messages"]
    assert "gen_ai.input.messages" not in front.attributes


@pytest.fixture
def sampled_stack(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, Receiver]]:
    listening = Listening(Receiver(), stack.free_port(), stack.free_port())
    ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    try:
        with traced_stack(request, listening, "grpc", "grpc", **ratio) as running:
            yield running, listening.receiver
    finally:
        listening.stop()


def test_the_sampler_ratio_holds_over_200_requests(sampled_stack: tuple[Stack, Receiver]) -> None:
    running, receiver = sampled_stack
    with httpx.Client(timeout=30) as client:
        for _ in range(200):
            assert client.get(f"{running.base_url}/models").status_code == 200
    time.sleep(3)  # the last batches
    spans = receiver.received()
    edge = {s.trace_id for s in spans if s.service == "chatwire-edge" and s.kind == "server"}
    server = {s.trace_id for s in spans if s.name == f"{RPC}ListModels"}
    # 200 draws at 0.25: 50 expected, 30..70 is more than 3 standard deviations (6.1) each way.
    assert 30 <= len(edge) <= 70, len(edge)
    assert server == edge  # the servers follow the edge's decision: whole traces, never halves


@pytest.mark.parametrize("collector", ["slow", "down"])
def test_a_slow_or_missing_collector_never_delays_a_reply(request: pytest.FixtureRequest, collector: str) -> None:
    listening = Listening(Receiver(delay_s=5.0), stack.free_port(), stack.free_port())
    # Down: nothing listens where the spans go.
    where: Listening | str = listening if collector == "slow" else f"http://127.0.0.1:{stack.free_port()}"
    try:
        with traced_stack(request, where, "grpc", "grpc") as running:
            slowest = 0.0
            for _ in range(12):
                started = time.monotonic()
                assert chat(running, traceparent()[0], max_tokens=2).status_code == 200
                slowest = max(slowest, time.monotonic() - started)
            # A reply takes a fraction of a second. One that waited on an export would take 5 s (the collector)
            # or 2 s (the edge's export timeout).
            assert slowest < 1.9, slowest
            if collector == "slow":  # and the spans do get there, later
                assert listening.receiver.wait_for(lambda spans: len(spans) > 0, timeout=30)
    finally:
        listening.stop()


def test_the_readmes_make_run_sends_traces(receiver: Listening, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [block] = [b for b in re.findall(r"```sh\n(.*?)```", readme, flags=re.S) if "OTEL_EXPORTER_OTLP_ENDPOINT" in b]
    [line] = [line for line in block.splitlines() if line.endswith("make run")]
    settings = dict(word.split("=", 1) for word in shlex.split(line)[:-2])
    # The collector's port swapped for the test receiver's (HTTP, the default protocol).
    settings = {name: value.replace(":4318", f":{receiver.http_port}") for name, value in settings.items()}
    ports = free_ports()
    with make_run(make_run_env(ports, **settings), tmp_path / "make-run.log") as launcher:
        assert "Traces           http://127.0.0.1" in (tmp_path / "make-run.log").read_text()
        header, trace_id, _ = traceparent()
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
        url = f"http://127.0.0.1:{ports['HTTP']}/v1/chat/completions"
        assert httpx.post(url, json=body, headers={"traceparent": header}, timeout=60).status_code == 200
        spans = receiver.receiver.wait_for_trace(trace_id, "POST /v1/chat/completions", f"{RPC}CreateChatCompletion")
        assert spans["POST /v1/chat/completions"].service == "chatwire-edge"
        assert spans[f"{RPC}CreateChatCompletion"].service == "chatwire"
        assert launcher.poll() is None


def test_without_otel_settings_nothing_of_opentelemetry_is_loaded() -> None:
    code = (
        "import sys\n"
        "from chatwire_server import server, tracing\n"
        "assert not tracing.configure({})\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in stack.python_env().items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("sampler", ["traceidratio", "parentbased_traceidratio", "always_on", "always_off"])
def test_the_servers_always_follow_the_callers_sampling_decision(sampler: str) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    environment = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    chosen = tracing._parent_based(environment)
    assert isinstance(chosen, ParentBased)
    root = chosen._root
    assert isinstance(root, TraceIdRatioBased)
    # The ratio of the traces a server starts is the edge's.
    assert root.rate == envoy_tracing.sampling_percent(environment) / 100


def test_a_relayed_reply_of_unexpected_shapes_never_fails_the_call() -> None:
    class Spy(tracing.Generation):
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple[object, ...]]] = []

        def response(self, *args: object) -> None:  # type: ignore[override]
            self.calls.append(("response", args))

        def output(self, *args: object) -> None:  # type: ignore[override]
            self.calls.append(("output", args))

        def finish_reason(self, *args: object) -> None:  # type: ignore[override]
            self.calls.append(("finish_reason", args))

        def usage(self, *args: object) -> None:  # type: ignore[override]
            self.calls.append(("usage", args))

    spy = Spy()
    odd = {
        "id": 7,
        "choices": [None, {"index": "0", "delta": {"content": "x"}}, {"index": 1, "message": {"content": ["a"]}}],
        "usage": {"prompt_tokens": "3", "prompt_tokens_details": "none", "completion_tokens": 2},
    }
    relayed.trace_relayed(spy, odd)
    assert spy.calls == [("response", ("7", "")), ("output", (1, ["a"])), ("usage", (0, 2, 0))]


def test_edge_settings_follow_the_standard_variables() -> None:
    off = envoy_tracing.placeholders({})
    assert off["CHATWIRE_TRACING"] == "null"
    for disabled in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        assert envoy_tracing.placeholders({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", **disabled}) == off
    http = envoy_tracing.placeholders(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.observability:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=a%20b,x-team=ml",
            "OTEL_SERVICE_NAME": "llm",
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
    )
    tracing = json.loads(http["CHATWIRE_TRACING"])
    config = tracing["provider"]["typed_config"]
    assert config["http_service"]["http_uri"]["uri"] == "http://collector.observability:4318/v1/traces"
    assert [h["header"] for h in config["http_service"]["request_headers_to_add"]] == [
        {"key": "x-api-key", "value": "a b"},
        {"key": "x-team", "value": "ml"},
    ]
    assert config["service_name"] == "llm-edge" and tracing["random_sampling"] == {"value": 10.0}
    address = json.loads(http["CHATWIRE_OTLP_CLUSTER"])["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert address["endpoint"]["address"]["socket_address"] == {
        "address": "collector.observability",
        "port_value": 4318,
    }
    grpc_tls = envoy_tracing.placeholders(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otlp.example.com",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/otel/ca.pem",
        }
    )
    cluster = json.loads(grpc_tls["CHATWIRE_OTLP_CLUSTER"])
    assert cluster["transport_socket"]["typed_config"]["sni"] == "otlp.example.com"
    assert cluster["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"] == {
        "trusted_ca": {"filename": "/etc/otel/ca.pem"}
    }
    assert "http2_protocol_options" in json.dumps(cluster)
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        envoy_tracing.placeholders(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )
