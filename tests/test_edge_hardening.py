"""The edge under hostile or unusual input (the "fuzz-proof edge" issue), through the real Envoy.

Each test reproduces a finding against a running stack: media types with parameters, lenient JSON, client
`grpc-*` headers, internal bindings reachable from outside, query strings, errors that were not OpenAI-shaped,
the edge's resource limits, and `make run` surviving a killed process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import http1
from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc, models_pb2
from chatwire_server.edge import stack
from conftest import (
    EDGE_REPLY_HEADERS,
    MODEL,
    Stack,
    assert_valid,
    free_ports,
    logged,
    make_run_env,
    parse_sse,
    run_envoy,
)

HELLO = [{"role": "user", "content": "Say hello."}]
CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 2}


def url(edge: Stack | stack.Ports, path: str) -> str:
    port = edge.ports.http if isinstance(edge, Stack) else edge.http
    return f"http://127.0.0.1:{port}{path}"


def error_of(reply: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error object of a reply, after checking status, content type and the spec's schema."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body = reply.json()
    assert_valid(body, "ErrorResponse")
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    expected_type = "invalid_request_error" if status < 500 else "server_error"
    assert body["error"]["type"] == expected_type, body
    error: dict[str, Any] = body["error"]
    return error


def post_chat(
    edge: Stack, body: str | dict[str, Any], path: str = "/v1/chat/completions", **headers: str
) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    all_headers = {"content-type": "application/json", **headers}
    return httpx.post(url(edge, path), content=content, headers=all_headers, timeout=60)


def assert_unary(reply: httpx.Response) -> None:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert_valid(reply.json(), "CreateChatCompletionResponse")


def assert_stream(reply: httpx.Response) -> None:
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/event-stream"), reply.headers
    events = parse_sse(reply.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    for event in events[:-1]:
        assert_valid(event, "CreateChatCompletionStreamResponse")


# 1. Media types are parsed, not compared: parameters and case do not turn streaming off.


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/Json", "APPLICATION/JSON ;charset=UTF-8", "text/plain"],
)
def test_stream_works_whatever_the_json_media_type_looks_like(chatwire: Stack, content_type: str) -> None:
    assert_stream(post_chat(chatwire, {**CHAT, "stream": True}, **{"content-type": content_type}))
    assert_unary(post_chat(chatwire, {**CHAT, "stream": False}, **{"content-type": content_type}))


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/Json"])
@pytest.mark.parametrize("value", ["yes", 1, "true", None])
def test_non_boolean_stream_is_400_with_any_media_type(chatwire: Stack, content_type: str, value: object) -> None:
    reply = post_chat(chatwire, {**CHAT, "stream": value}, **{"content-type": content_type})
    if value is None:  # null is "not given", as in OpenAI's API
        assert_unary(reply)
        return
    error = error_of(reply, 400)
    assert error["param"] == "stream" and error["code"] == "invalid_type"


def test_a_grpc_content_type_cannot_switch_the_transcoder_off(chatwire: Stack) -> None:
    assert_unary(post_chat(chatwire, CHAT, **{"content-type": "application/grpc"}))


# 2. The body must be strict JSON, as OpenAI's parser wants it.


@pytest.mark.parametrize(
    "body",
    [
        "{'model': 'smollm2-135m-instruct', 'max_tokens': 2, 'messages': [{'role': 'user', 'content': 'hi'}]}",
        '{"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],}',
        '{"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"},]}',
        '{model: "smollm2-135m-instruct", max_tokens: 2, messages: [{"role": "user", "content": "hi"}]}',
        '{"model": "smollm2-135m-instruct", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]} x',
        '{"model": "smollm2-135m-instruct", "max_tokens": NaN, "messages": [{"role": "user", "content": "hi"}]}',
        "{bad json",
    ],
    ids=["single quotes", "trailing comma", "trailing comma in array", "bare keys", "trailing text", "NaN", "bad"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_json_is_openais_400(chatwire: Stack, body: str, stream: bool) -> None:
    if stream:
        body = '{"stream": true, ' + body[1:]
    error = error_of(post_chat(chatwire, body), 400)
    assert str(error["message"]).startswith("We could not parse the JSON body of your request.")
    assert error["param"] is None and error["code"] is None


# 3. Headers that steer the gRPC call or the edge are never taken from clients.


def test_client_grpc_chatwire_and_envoy_headers_steer_nothing(chatwire: Stack) -> None:
    internal = {
        "grpc-timeout": "1n",  # was: the service's deadline, a 504 with a gRPC-shaped body
        "grpc-encoding": "gzip",
        "grpc-accept-encoding": "bogus",
        "grpc-status": "13",
        "grpc-message": "injected",
        "x-chatwire-sse": "1",  # would ask the service for the stream sentinel on a unary call
        "x-chatwire-error": '{"error": {"message": "injected"}}',
        "x-chatwire-anything": "x",
        "x-chatwire-affinity": "tenant",  # would pick the replica instead of the body's keys
        # Envoy ignores these from clients (none is internal): a 1 ms upstream timeout would be a 504.
        "x-envoy-upstream-rq-timeout-ms": "1",
        "x-envoy-retry-on": "5xx,reset",
    }
    assert_unary(post_chat(chatwire, CHAT, **internal))
    assert_stream(post_chat(chatwire, {**CHAT, "stream": True}, **internal))
    models = httpx.get(url(chatwire, "/v1/models"), headers=internal, timeout=10)
    assert models.status_code == 200 and models.json()["object"] == "list"


# 4. Only OpenAI's paths exist at the edge.


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/chat/completions:stream"),  # the internal binding of the streaming RPC
        ("POST", "/chatwire.v1.ChatService/CreateChatCompletion"),
        ("POST", "/chatwire.v1.ChatService/ListModels"),
        ("POST", "/grpc.health.v1.Health/Check"),
        ("GET", "/v1/models/"),
        ("GET", "/v1/models/a/b"),
        ("GET", "/v1/models/a%2Fb"),  # an escaped slash is a slash
        ("GET", "/v1"),
        ("GET", "/v1/chat/completions/x"),
        ("POST", "/v1/completions"),
        ("OPTIONS", "/v1/completions"),
    ],
)
def test_only_openais_paths_exist(chatwire: Stack, method: str, path: str) -> None:
    reply = httpx.request(
        method,
        url(chatwire, path),
        content=json.dumps(CHAT),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    error = error_of(reply, 404)
    assert error["code"] == "unknown_url" and method in str(error["message"])


def test_grpc_framed_calls_never_reach_the_service(chatwire: Stack) -> None:
    # A gRPC client aiming at the edge gets a gRPC-shaped refusal (Envoy answers gRPC requests in kind) that
    # carries the OpenAI error; nothing is forwarded.
    empty_message = b"\x00\x00\x00\x00\x00"
    with httpx.Client(http1=False, http2=True, timeout=30) as h2:
        for path in ("/chatwire.v1.ChatService/ListModels", "/v1/completions"):
            reply = h2.post(
                url(chatwire, path),
                content=empty_message,
                headers={"content-type": "application/grpc", "te": "trailers"},
            )
            assert reply.headers.get("grpc-status") == "12", reply.headers  # UNIMPLEMENTED: 404
            assert json.loads(reply.headers["grpc-message"])["error"]["code"] == "unknown_url"
            assert reply.content == b""
        # A known path with the wrong method: the 405 in gRPC's framing keeps its status, and nothing else leaks.
        reply = h2.post(
            url(chatwire, "/v1/models"), content=empty_message, headers={"content-type": "application/grpc"}
        )
        assert reply.headers.get("grpc-status") == "2", reply.headers  # UNKNOWN: Envoy's mapping of 405
        assert json.loads(reply.headers["grpc-message"])["error"]["code"] == "method_not_allowed"
        assert {n for n in reply.headers if not n.startswith("grpc-")} <= EDGE_REPLY_HEADERS, reply.headers


@pytest.mark.parametrize("model_id", ["ft:gpt-4o:org:custom:id", "ft:gpt-4o-mini:acme::abc123"])
def test_model_ids_may_hold_colons(chatwire: Stack, model_id: str) -> None:
    error = error_of(httpx.get(url(chatwire, f"/v1/models/{model_id}"), timeout=10), 404)
    assert error["code"] == "model_not_found" and model_id in str(error["message"])
    assert httpx.get(url(chatwire, f"/v1/models/{MODEL}"), timeout=10).json()["id"] == MODEL


def raw_get(edge: Stack, raw_path: str) -> int:
    """GET a path exactly as written (httpx would normalize it first)."""
    connection = http.client.HTTPConnection("127.0.0.1", edge.ports.http, timeout=10)
    try:
        connection.request("GET", raw_path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_paths_are_normalized_before_routing(chatwire: Stack) -> None:
    assert raw_get(chatwire, "//v1//models") == 200
    assert raw_get(chatwire, "/v1/x/../models") == 200
    assert raw_get(chatwire, "/v1/models/%2e%2e/models") == 200
    assert raw_get(chatwire, "/v1/chat/completions/../completions:stream") == 404


# 5. Query strings are ignored (Azure-style clients send ?api-version=) and never logged.


def test_unknown_query_parameters_are_ignored(chatwire: Stack) -> None:
    models = httpx.get(url(chatwire, "/v1/models?x=1&api-version=2024-01-01"), timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    # A query parameter naming an RPC field must not set it either.
    model = httpx.get(url(chatwire, f"/v1/models/{MODEL}?model=gpt-9"), timeout=10)
    assert model.status_code == 200 and model.json()["id"] == MODEL
    query = "?api-version=2024-01-01&model=gpt-9&stream=true"
    assert_unary(post_chat(chatwire, CHAT, path=f"/v1/chat/completions{query}"))
    assert_stream(post_chat(chatwire, {**CHAT, "stream": True}, path=f"/v1/chat/completions{query}"))
    assert httpx.get(url(chatwire, "/health?probe=1"), timeout=10).status_code == 200


def test_access_log_never_holds_the_query_string(chatwire: Stack) -> None:
    secret = "sk-query-secret-4f9a"
    replies = [
        post_chat(chatwire, CHAT, path=f"/v1/chat/completions?api_key={secret}"),
        httpx.get(url(chatwire, f"/v1/models?api_key={secret}"), timeout=10),
        httpx.get(url(chatwire, f"/v1/nothing?api_key={secret}"), timeout=10),
        httpx.get(url(chatwire, f"/health?api_key={secret}"), timeout=10),
        # Nor can a client choose the path logged.
        httpx.get(url(chatwire, "/v1/other"), headers={"x-envoy-original-path": "/v1/models"}, timeout=10),
    ]
    # Envoy flushes its access log every 10 s at worst.
    paths = [logged(chatwire.envoy_log, reply.headers["x-request-id"], timeout=20)["path"] for reply in replies]
    assert paths == ["/v1/chat/completions", "/v1/models", "/v1/nothing", "/health", "/v1/other"]
    assert secret not in chatwire.envoy_log.read_text(errors="replace")


# 6. Every error is OpenAI-shaped, whatever produced it underneath.


def test_oversized_headers_are_431_from_the_edge(chatwire: Stack) -> None:
    big = httpx.get(url(chatwire, "/v1/models"), headers={"x-big": "a" * (40 * 1024)}, timeout=10)
    assert error_of(big, 431)["code"] == "request_headers_too_large"
    was_429 = post_chat(chatwire, CHAT, **{"x-big": "a" * (60 * 1024)})  # was a gRPC-shaped 429
    assert error_of(was_429, 431)["code"] == "request_headers_too_large"
    # Under the edge's limit, the service takes it (its metadata limit is above the edge's).
    assert_unary(post_chat(chatwire, CHAT, **{"x-big": "a" * (24 * 1024)}))


def test_body_over_the_limit_is_413(chatwire: Stack) -> None:
    reply = post_chat(chatwire, json.dumps({**CHAT, "pad": "x" * (4 * 1024 * 1024)}))
    assert error_of(reply, 413)["code"] == "request_too_large"


STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def fake_message(model: str) -> str:
    return f'{model} failed: "quoted", \\ and\nnewline'


BIG_PIECE = "0123456789abcdef" * 1024  # 16 KiB


class FakeChatService(chat_service_pb2_grpc.ChatServiceServicer):
    """Fails each RPC with the gRPC status its request names (`model: "status-8"`), without the service's
    `x-chatwire-error` trailer: what the edge sees when gRPC itself, not the service, refuses a call. Model
    `big` answers 1 MiB (64 pieces of 16 KiB, streamed or not), without the engine's variable pace."""

    def _fail(self, model: str, context: grpc.ServicerContext) -> None:
        if model == "sleep":
            time.sleep(5)
        elif model == "crash":
            raise RuntimeError("boom")
        elif model != "big":
            context.abort(STATUS_CODES[int(model.removeprefix("status-"))], fake_message(model))

    def CreateChatCompletion(
        self, request: chat_completion_pb2.CreateChatCompletionRequest, context: grpc.ServicerContext
    ) -> chat_completion_pb2.CreateChatCompletionResponse:
        self._fail(request.model, context)
        message = {"role": "assistant", "content": BIG_PIECE * 64, "refusal": None}
        reply = {"id": "chatcmpl-big", "object": "chat.completion", "created": 1, "model": "big"}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return json_format.ParseDict({**reply, "choices": [choice]}, chat_completion_pb2.CreateChatCompletionResponse())

    def StreamChatCompletion(
        self, request: chat_completion_pb2.CreateChatCompletionRequest, context: grpc.ServicerContext
    ) -> Iterator[chat_completion_pb2.CreateChatCompletionStreamResponse]:
        self._fail(request.model, context)
        chunk = {"id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 1, "model": "big"}
        for _ in range(64):
            choice = {"index": 0, "delta": {"content": BIG_PIECE}, "finish_reason": None}
            yield json_format.ParseDict(
                {**chunk, "choices": [choice]}, chat_completion_pb2.CreateChatCompletionStreamResponse()
            )
        if ("x-chatwire-sse", "1") in context.invocation_metadata():  # the edge asks for the end sentinel
            sentinel = {"id": "", "object": "chatwire.stream.done"}
            yield json_format.ParseDict(sentinel, chat_completion_pb2.CreateChatCompletionStreamResponse())

    def GetModel(self, request: models_pb2.GetModelRequest, context: grpc.ServicerContext) -> models_pb2.Model:
        self._fail(request.model, context)
        return models_pb2.Model()


@pytest.fixture(scope="module")
def edge_over_fake_service() -> Iterator[stack.Ports]:
    """The real edge in front of FakeChatService."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    chat_service_pb2_grpc.add_ChatServiceServicer_to_server(FakeChatService(), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("chatwire.v1.ChatService", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ports = stack.Ports(http=stack.free_port(), grpc=grpc_port, admin=stack.free_port())
    try:
        log = Path(tempfile.mkdtemp(prefix="chatwire-fake-")) / "envoy.log"
        with run_envoy(ports, log):
            deadline = time.monotonic() + 30  # until the health check passed
            while httpx.get(url(ports, "/health"), timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "the fake service never became healthy"
                time.sleep(0.2)
            yield ports
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    "grpc_code, status",
    [(8, 429), (4, 504), (14, 503), (13, 500), (2, 500), (3, 400), (5, 404), (7, 403), (16, 401), (12, 501)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_grpc_errors_without_the_trailer_are_openai_shaped(
    edge_over_fake_service: stack.Ports, grpc_code: int, status: int, stream: bool
) -> None:
    body = {"model": f"status-{grpc_code}", "messages": HELLO, "stream": stream}
    reply = httpx.post(url(edge_over_fake_service, "/v1/chat/completions"), json=body, timeout=30)
    error = error_of(reply, status)
    assert error["message"] == fake_message(f"status-{grpc_code}")  # the gRPC status message, unescaped


def test_a_crash_in_the_service_is_a_500_server_error(edge_over_fake_service: stack.Ports) -> None:
    reply = httpx.get(url(edge_over_fake_service, "/v1/models/crash"), timeout=30)
    error_of(reply, 500)


@pytest.mark.parametrize("stream", [False, True])
def test_replies_far_larger_than_the_connection_buffer_pass(edge_over_fake_service: stack.Ports, stream: bool) -> None:
    body = {"model": "big", "messages": HELLO, "stream": stream}
    reply = httpx.post(url(edge_over_fake_service, "/v1/chat/completions"), json=body, timeout=30)
    if stream:
        assert_stream(reply)
        pieces = [event["choices"][0]["delta"]["content"] for event in parse_sse(reply.text)[:-1]]
    else:
        assert_unary(reply)
        pieces = [reply.json()["choices"][0]["message"]["content"]]
    assert "".join(pieces) == BIG_PIECE * 64  # 1 MiB through a 32 KiB connection buffer


def test_total_timeout_is_504(edge_over_fake_service: stack.Ports) -> None:
    ports = stack.Ports(http=stack.free_port(), grpc=edge_over_fake_service.grpc, admin=stack.free_port())
    log = Path(tempfile.mkdtemp(prefix="chatwire-timeout-")) / "envoy.log"
    with run_envoy(ports, log, CHATWIRE_REQUEST_TIMEOUT_S="1"):
        body = {"model": "sleep", "messages": HELLO}
        reply = httpx.post(url(ports, "/v1/chat/completions"), json=body, timeout=30)
        assert error_of(reply, 504)["code"] == "timeout"


@contextlib.contextmanager
def garbage_upstream() -> Iterator[int]:
    """A port whose listener answers anything with HTTP/1.1 (the edge speaks HTTP/2 to the service)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 3\r\n\r\nbad")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_502_and_503_from_envoy_are_openai_shaped() -> None:
    logs = Path(tempfile.mkdtemp(prefix="chatwire-5xx-"))
    with garbage_upstream() as port:
        ports = stack.Ports(http=stack.free_port(), grpc=port, admin=stack.free_port())
        with run_envoy(ports, logs / "garbage.log"):
            for stream in (False, True):
                body = {**CHAT, "stream": stream}
                error_of(httpx.post(url(ports, "/v1/chat/completions"), json=body, timeout=30), 502)
            error_of(httpx.get(url(ports, "/v1/models"), timeout=30), 502)
    nothing = stack.Ports(http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port())
    with run_envoy(nothing, logs / "down.log"):
        for stream in (False, True):
            reply = httpx.post(url(nothing, "/v1/chat/completions"), json={**CHAT, "stream": stream}, timeout=30)
            assert error_of(reply, 503)["code"] == "service_unavailable"
        assert error_of(httpx.get(url(nothing, "/health"), timeout=10), 503)["code"] == "service_unavailable"


# 7. Envoy's edge hardening: limits that hold, and what must keep working under them.


def test_the_tests_reply_headers_are_the_guards() -> None:
    """conftest.EDGE_REPLY_HEADERS is the guard's allow-list plus what Envoy adds after every filter."""
    block = re.search(r"ipairs\(\{(.*?)\}\) do PUBLIC_REPLY_HEADERS", stack.ENVOY_TEMPLATE.read_text(), re.S)
    assert block is not None
    guards = set(re.findall(r'"([^"]+)"', block.group(1))) - {":status"}
    assert EDGE_REPLY_HEADERS - guards == {"transfer-encoding", "connection", "date", "server"}
    assert guards <= EDGE_REPLY_HEADERS


def test_edge_config_follows_envoys_edge_guide() -> None:
    config = yaml.safe_load(stack.render_envoy_config(stack.Ports(http=8080, grpc=50051, admin=9901)))
    overload = config["overload_manager"]
    monitors = {m["name"] for m in overload["resource_monitors"]}
    assert monitors == {
        "envoy.resource_monitors.fixed_heap",
        "envoy.resource_monitors.global_downstream_max_connections",
    }
    actions = {a["name"] for a in overload["actions"]}
    assert {"envoy.overload_actions.shrink_heap", "envoy.overload_actions.stop_accepting_requests"} <= actions
    listener = config["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 32768
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["max_request_headers_kb"] == 64  # the guard refuses beyond 32 KiB, knowing the method
    assert hcm["request_headers_timeout"] == "10s"
    assert hcm["common_http_protocol_options"]["idle_timeout"] == "300s"
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"
    assert hcm["http2_protocol_options"] == {
        "max_concurrent_streams": 100,
        "initial_stream_window_size": 65536,
        "initial_connection_window_size": 1048576,
    }
    assert hcm["normalize_path"] and hcm["merge_slashes"]
    assert hcm["path_with_escaped_slashes_action"] == "UNESCAPE_AND_FORWARD"
    assert hcm["http_filters"][0]["name"] == "chatwire.edge_guard"


@contextlib.contextmanager
def edge_with(tmp_path: Path, **changes: str) -> Iterator[stack.Ports]:
    """An Envoy (with no service behind it) whose config has each `old=new` text of `changes` replaced."""
    ports = stack.Ports(http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port())
    config = stack.render_envoy_config(ports)
    for old, new in changes.items():
        assert old in config
        config = config.replace(old, new)
    config_path = tmp_path / "envoy.yaml"
    config_path.write_text(config)
    with (tmp_path / "envoy.log").open("wb") as log:
        envoy = stack.start_envoy(config_path, ports.admin * 10 + 9, log)
        try:
            stack.wait_for_envoy(ports.admin, envoy)
            yield ports
        finally:
            stack.stop(envoy)


def test_an_overloaded_edge_sheds_requests_with_openai_503(tmp_path: Path) -> None:
    # Envoy's heap is well over 4 MiB: past both thresholds at once.
    with edge_with(tmp_path, **{"max_heap_size_bytes: 1073741824": "max_heap_size_bytes: 4194304"}) as ports:
        deadline = time.monotonic() + 10  # the monitor is read every 0.25 s
        while "overloaded" not in (reply := httpx.get(url(ports, "/v1/models"), timeout=10)).text:
            assert time.monotonic() < deadline, reply.text
            time.sleep(0.25)
        assert error_of(reply, 503)["code"] == "service_unavailable"
        # Shed before any filter runs, yet framed right: HEAD gets no body, and the connection stays in step.
        head, get = http1.exchange(
            ports.http, [("HEAD", http1.request("HEAD", "/v1/models")), ("GET", http1.request("GET", "/v1/models"))]
        )
        assert (head.status, head.body, get.status) == (503, b"", 503) and b"overloaded" in get.body


def test_connections_beyond_the_global_limit_are_closed(tmp_path: Path) -> None:
    limit = {"max_active_downstream_connections: 10000": "max_active_downstream_connections: 1"}
    with edge_with(tmp_path, **limit) as ports, httpx.Client(timeout=10) as first:
        assert first.get(url(ports, "/v1/nothing")).status_code == 404  # and the connection stays open
        with pytest.raises(httpx.TransportError), httpx.Client(timeout=10) as second:
            second.get(url(ports, "/v1/nothing"))
        assert first.get(url(ports, "/v1/nothing")).status_code == 404


def test_bodies_up_to_the_limit_still_work(chatwire: Stack) -> None:
    # Valid JSON padded with whitespace to just under 4 MiB: past every smaller buffer on the way.
    compact = json.dumps(CHAT)
    body = compact[:-1] + " " * (4 * 1024 * 1024 - len(compact) - 64) + "}"
    assert_unary(post_chat(chatwire, body))
    streamed = json.dumps({**CHAT, "stream": True})
    assert_stream(post_chat(chatwire, streamed[:-1] + " " * (2 * 1024 * 1024) + "}"))


def test_http2_clients_stream(chatwire: Stack) -> None:
    with httpx.Client(http1=False, http2=True, timeout=60) as h2:
        reply = h2.post(url(chatwire, "/v1/chat/completions"), json={**CHAT, "max_tokens": 16, "stream": True})
        assert reply.http_version == "HTTP/2"
        assert_stream(reply)


def test_http2_streams_multiplex_within_the_windows(edge_over_fake_service: stack.Ports) -> None:
    # Eight 1 MiB streams at once on one connection whose window is 1 MiB (64 KiB per stream): flow control
    # paces them, nothing is cut.
    body = {"model": "big", "messages": HELLO, "stream": True}
    with httpx.Client(http1=False, http2=True, timeout=30) as h2, futures.ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda _: h2.post(url(edge_over_fake_service, "/v1/chat/completions"), json=body), range(8))
        )
    for reply in replies:
        assert reply.http_version == "HTTP/2"
        assert_stream(reply)
        assert (
            "".join(event["choices"][0]["delta"]["content"] for event in parse_sse(reply.text)[:-1]) == BIG_PIECE * 64
        )


def test_headers_with_underscores_are_dropped_not_fatal(chatwire: Stack) -> None:
    assert_unary(post_chat(chatwire, CHAT, **{"x_chatwire_sse": "1", "grpc_timeout": "1n"}))


# 8. `make run` supervises its processes.


def children_of(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited


def child_running(launcher: int, name: str, other_than: int = 0, timeout: float = 60) -> int:
    """The pid of the launcher's child whose command line holds `name` (a new one, if `other_than`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid in children_of(launcher) if name in command_line(pid) and pid != other_than]
        if found and alive(found[0]):
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {name} child of {launcher}")


def test_make_run_restarts_what_dies_and_stops_cleanly(tmp_path: Path) -> None:
    ports = free_ports()
    env = make_run_env(ports)
    models = f"http://127.0.0.1:{ports['HTTP']}/v1/models"
    log_path = tmp_path / "stack.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "chatwire_server.edge.stack"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    seen: set[int] = set()

    def until_serving(timeout: float, *, refused_ok: bool) -> int:
        """Poll until a 200 and count the replies before it: OpenAI-shaped 503s, or refused connections
        where `refused_ok`."""
        deadline = time.monotonic() + timeout
        down = 0
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(models, timeout=10)
            except httpx.TransportError:
                assert refused_ok, "the edge stopped answering"
            else:
                if reply.status_code == 200:
                    return down
                assert error_of(reply, 503)["code"] == "service_unavailable"
            down += 1
            assert launcher.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.2)
        raise AssertionError(f"not serving again after {timeout}s:\n{log_path.read_text(errors='replace')}")

    try:
        until_serving(120, refused_ok=True)
        server = child_running(launcher.pid, "chatwire_server")
        envoy = child_running(launcher.pid, "envoy")
        seen |= {server, envoy, *children_of(server)}

        os.kill(server, signal.SIGKILL)
        while alive(server):
            time.sleep(0.05)
        # Envoy stays up and answers 503 until the new server has loaded its model.
        assert until_serving(60, refused_ok=False) > 0
        assert child_running(launcher.pid, "envoy") == envoy
        new_server = child_running(launcher.pid, "chatwire_server", other_than=server)
        seen |= {new_server, *children_of(new_server)}
        chat = httpx.post(models.replace("/models", "/chat/completions"), json=CHAT, timeout=60)
        assert_unary(chat)

        os.kill(envoy, signal.SIGKILL)
        until_serving(60, refused_ok=True)
        assert child_running(launcher.pid, "chatwire_server") == new_server  # the model stayed loaded
        seen.add(child_running(launcher.pid, "envoy", other_than=envoy))
        text = log_path.read_text(errors="replace")
        assert "chatwire server (pid" in text and "was killed by SIGKILL" in text and "envoy restarted" in text

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(30) == 0
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in seen if alive(pid)], "processes of the stack outlived it"
        assert not (stack.REPO / "build" / "run" / f"envoy-{ports['HTTP']}.yaml").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in seen:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
