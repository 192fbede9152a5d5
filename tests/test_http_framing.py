"""HTTP done right at the edge, through the real Envoy: every method on every route framed so that the next
request on the connection is answered right (no body on HEAD, 204 or any refusal of a request whose method the
edge never learnt), OpenAI's 405 answer with `Allow`, and only public headers on any reply."""

from __future__ import annotations

import json
import socket
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

import http1
from conftest import EDGE_REPLY_HEADERS, MODEL, Stack, assert_valid, parse_sse

# The routes that exist outside, each with its one method; HEAD and OPTIONS come with them (README, "HTTP").
ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET", f"/v1/models/{MODEL}": "GET", "/health": "GET"}
UNKNOWN = ["/v1/nothing", "/", "/v1/chat/completions:stream", "/chatwire.v1.ChatService/ListModels"]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
ALLOW = {"GET": "GET, HEAD, OPTIONS", "POST": "POST, OPTIONS"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1}
# Sent right behind each case on the same connection: it must come back whole, as if alone.
PROBE = ("GET", http1.request("GET", "/v1/models"))
# Headers that differ between two replies to the same request.
PER_REPLY = {"date", "x-request-id", "openai-processing-ms"}


def assert_models_list(reply: http1.Reply) -> None:
    assert reply.status == 200, reply
    assert json.loads(reply.body)["object"] == "list"


def assert_public(headers: Any) -> None:
    """Only headers the edge may send, and none a shared cache may store by."""
    names = {name.lower() for name in headers}
    assert names <= EDGE_REPLY_HEADERS, f"internal headers on a public reply: {sorted(names - EDGE_REPLY_HEADERS)}"
    assert headers["cache-control"] == "no-store"
    assert "x-request-id" in names or headers.get("connection") == "close"


def error_code(reply: http1.Reply) -> str:
    body = json.loads(reply.body)
    assert_valid(body, "ErrorResponse")
    return str(body["error"]["code"])


@pytest.mark.parametrize("path", [*ROUTES, *UNKNOWN])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_route_leaves_the_connection_in_step(chatwire: Stack, method: str, path: str) -> None:
    body = json.dumps(CHAT).encode() if method in ("POST", "PUT", "PATCH") else b""
    headers = [("Content-Type", "application/json")] if body else []
    case = (method, http1.request(method, path, headers, body))
    replies = http1.exchange(chatwire.ports.http, [case, PROBE], pipelined=True)
    reply = replies[0]
    assert_public(reply.headers)
    # A request refused before its body was read closes its connection (saying so): Envoy will not read on.
    refused_unread = body and reply.status in (404, 405)
    assert len(replies) == 2 or (refused_unread and reply.closes), f"the edge closed the connection after {reply}"
    allowed = ROUTES.get(path)
    if method == "HEAD":
        assert reply.body == b""
    if allowed is None:
        assert reply.status == 404
        assert method == "HEAD" or error_code(reply) == "unknown_url"
    elif method == allowed or (method == "HEAD" and allowed == "GET"):
        assert reply.status == 200, reply
    elif method == "OPTIONS":
        assert (reply.status, reply.headers["allow"], reply.body) == (204, ALLOW[allowed], b"")
    else:
        assert (reply.status, reply.headers["allow"]) == (405, ALLOW[allowed]), reply
        if method != "HEAD":
            assert error_code(reply) == "method_not_allowed"
            assert f"{method} " in json.loads(reply.body)["error"]["message"]
    if len(replies) == 2:
        assert_models_list(replies[1])


@pytest.mark.parametrize("path", [path for path, method in ROUTES.items() if method == "GET"] + ["/v1/models/nope"])
def test_head_is_the_get_without_its_body(chatwire: Stack, path: str) -> None:
    get, head, probe = http1.exchange(
        chatwire.ports.http, [("GET", http1.request("GET", path)), ("HEAD", http1.request("HEAD", path)), PROBE]
    )
    assert head.status == get.status and head.body == b""
    same = {k: v for k, v in get.headers.items() if k not in PER_REPLY}
    assert {k: v for k, v in head.headers.items() if k not in PER_REPLY} == same
    assert_models_list(probe)


def test_refusals_of_requests_the_edge_cannot_read_have_no_body_for_head(chatwire: Stack) -> None:
    """What the edge answers before it knows a request's method (malformed headers, too many of them) cannot carry
    a body: if the request was HEAD, that body would be read as the next reply. The connection closes after it."""
    cases = {
        "a space in a header name": [("Bad Header", "x")],
        "more than 64 KiB of headers": [("X-Big", "x" * 70_000)],
        "more than 100 headers": [(f"X-H{i}", "1") for i in range(120)],
    }
    for method in ("HEAD", "GET"):
        for name, headers in cases.items():
            (reply,) = http1.exchange(
                chatwire.ports.http, [(method, http1.request(method, "/v1/models", headers)), PROBE]
            )
            assert reply.status in (400, 431) and reply.body == b"" and reply.closes, (method, name, reply)
            assert reply.headers["content-length"] == "0"


def test_oversized_headers_refused_by_the_guard_keep_the_connection(chatwire: Stack) -> None:
    """Between 32 and 64 KiB of headers the guard answers 431: OpenAI-shaped for GET, bodiless for HEAD, and the
    connection is still in step for the next request."""
    big = [("X-Big", "x" * 40_000)]
    get, head, probe = http1.exchange(
        chatwire.ports.http,
        [("GET", http1.request("GET", "/v1/models", big)), ("HEAD", http1.request("HEAD", "/v1/models", big)), PROBE],
    )
    assert get.status == head.status == 431 and head.body == b""
    assert error_code(get) == "request_headers_too_large"
    assert_models_list(probe)


def test_every_kind_of_reply_carries_public_headers_only(chatwire: Stack) -> None:
    base, root = chatwire.base_url, f"http://127.0.0.1:{chatwire.ports.http}"
    with httpx.Client(timeout=60) as client:
        replies = {
            "unary": client.post(f"{base}/chat/completions", json=CHAT),
            "stream": client.post(f"{base}/chat/completions", json={**CHAT, "stream": True}),
            "service's 400": client.post(f"{base}/chat/completions", json={**CHAT, "temperature": 5}),
            "edge's 400": client.post(f"{base}/chat/completions", content=b"{bad"),
            "transcoder's 400": client.post(f"{base}/chat/completions", json={**CHAT, "n": "two"}),
            "service's 404": client.get(f"{base}/models/nope"),
            "edge's 404": client.get(f"{root}/v1/nothing"),
            "405": client.get(f"{base}/chat/completions"),
            "413": client.post(f"{base}/chat/completions", content=b" " * (5 * 1024 * 1024)),
            "models": client.get(f"{base}/models"),
            "health": client.get(f"{root}/health"),
            "head": client.head(f"{base}/models"),
            "options": client.options(f"{base}/models"),
        }
    for kind, reply in replies.items():
        assert reply.status_code < 500, (kind, reply.text)
        try:
            assert_public(reply.headers)
        except AssertionError as error:
            raise AssertionError(f"{kind}: {error}") from None
    assert parse_sse(replies["stream"].text)[-1] == "[DONE]"
    # Whatever reached the service says how long it took there, as OpenAI's API does.
    for kind in ("unary", "stream", "service's 400", "service's 404", "models"):
        assert int(replies[kind].headers["openai-processing-ms"]) >= 0, kind
    assert "openai-processing-ms" not in replies["edge's 404"].headers


def test_http2_replies_carry_public_headers_and_no_trailers(chatwire: Stack) -> None:
    """HTTP/2 carries trailers, where the stream's gRPC status and trailing metadata would follow the body."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.create_connection(("127.0.0.1", chatwire.ports.http), timeout=60) as sock:
        connection.initiate_connection()
        requests = {
            "stream": ("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}).encode()),
            "unary": ("POST", "/v1/chat/completions", json.dumps(CHAT).encode()),
            "service's 400": ("POST", "/v1/chat/completions", json.dumps({**CHAT, "temperature": 5}).encode()),
            "models": ("GET", "/v1/models", b""),
        }
        for kind, (method, path, body) in requests.items():
            stream_id = connection.get_next_available_stream_id()
            headers = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
            connection.send_headers(stream_id, [*headers, ("content-type", "application/json")], end_stream=not body)
            if body:
                connection.send_data(stream_id, body, end_stream=True)
            sock.sendall(connection.data_to_send())
            reply_headers: dict[str, str] = {}
            trailers: dict[str, str] = {}
            ended = False
            while not ended:
                for event in connection.receive_data(sock.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        reply_headers = dict(event.headers)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                        ended = True
                sock.sendall(connection.data_to_send())
            names = set(reply_headers) - {":status"}
            assert names <= EDGE_REPLY_HEADERS, (kind, sorted(names - EDGE_REPLY_HEADERS))
            assert trailers == {}, (kind, trailers)
