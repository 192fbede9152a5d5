"""The production edge: request ids, access logs, health, body limit, timeouts, CORS, through the real Envoy."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from conftest import MODEL, NO_END, Stack, assert_valid, logged, parse_sse, run_stack

HELLO = [{"role": "user", "content": "Say hello."}]
# Long replies: SmolLM2's end-of-turn token (id 2) is banned.


def test_request_id_is_returned_logged_and_passed_to_the_service(chatwire: Stack) -> None:
    replies = [
        httpx.post(
            f"{chatwire.base_url}/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
            headers={"x-request-id": "client-chosen", "authorization": "Bearer sk-secret-value"},
            timeout=60,
        )
        for _ in range(2)
    ]
    ids = [r.headers["x-request-id"] for r in replies]
    assert len(set(ids)) == 2 and "client-chosen" not in ids  # the edge does not trust clients' ids
    models = httpx.get(f"{chatwire.base_url}/models", timeout=10)
    assert logged(chatwire.envoy_log, models.headers["x-request-id"])["method"] == "GET"
    for request_id in ids:
        assert logged(chatwire.envoy_log, request_id)["method"] == "POST"
        assert logged(chatwire.envoy_log, request_id)["path"] == "/v1/chat/completions"
        assert logged(chatwire.envoy_log, request_id)["status"] == 200
        assert logged(chatwire.server_log, request_id, msg="request")["method"] == "CreateChatCompletion"
        assert logged(chatwire.server_log, request_id, msg="request")["status"] == "OK"
    assert "sk-secret-value" not in open(chatwire.envoy_log).read() + open(chatwire.server_log).read()


def test_error_replies_carry_the_request_id_too(chatwire: Stack) -> None:
    reply = httpx.post(f"{chatwire.base_url}/chat/completions", json={"model": "nope", "messages": HELLO}, timeout=60)
    assert reply.status_code == 404 and reply.headers["x-request-id"]
    record = logged(chatwire.server_log, reply.headers["x-request-id"], msg="request")
    assert record["status"] == "NOT_FOUND" and record["error_code"] == "model_not_found"


def test_health_endpoint(chatwire: Stack) -> None:
    reply = httpx.get(f"http://127.0.0.1:{chatwire.ports.http}/health", timeout=10)
    assert reply.status_code == 200


def test_body_too_large_is_413(chatwire: Stack) -> None:
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    reply = httpx.post(f"{chatwire.base_url}/chat/completions", json=huge, timeout=60)
    assert reply.status_code == 413
    assert_valid(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["code"] == "request_too_large"


def test_cors_is_off_by_default(chatwire: Stack) -> None:
    reply = httpx.options(
        f"{chatwire.base_url}/chat/completions",
        headers={"origin": "https://app.example.com", "access-control-request-method": "POST"},
        timeout=10,
    )
    assert "access-control-allow-origin" not in reply.headers


@pytest.fixture(scope="module")
def tuned_edge(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """An edge with a 2-second idle timeout and CORS for one origin."""
    with run_stack(
        request, CHATWIRE_IDLE_TIMEOUT_S="2", CHATWIRE_CORS_ORIGIN_REGEX=r"^https://app\.example\.com$"
    ) as edge:
        yield edge


def test_idle_timeout_is_504_for_a_silent_request(tuned_edge: Stack) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1000, **NO_END}  # unary: silent for >2 s
    reply = httpx.post(f"{tuned_edge.base_url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 504
    assert_valid(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["code"] == "timeout"


def test_idle_timeout_never_cuts_a_healthy_stream(tuned_edge: Stack) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 300, "stream": True, **NO_END}
    reply = httpx.post(f"{tuned_edge.base_url}/chat/completions", json=body, timeout=120)
    events = parse_sse(reply.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"  # ran well past the 2 s idle timeout


def test_cors_for_a_configured_origin(tuned_edge: Stack) -> None:
    url = f"{tuned_edge.base_url}/chat/completions"
    preflight = httpx.options(
        url, headers={"origin": "https://app.example.com", "access-control-request-method": "POST"}, timeout=10
    )
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "authorization" in preflight.headers["access-control-allow-headers"]
    other = httpx.options(
        url, headers={"origin": "https://evil.example", "access-control-request-method": "POST"}, timeout=10
    )
    assert "access-control-allow-origin" not in other.headers
    models = httpx.get(f"{tuned_edge.base_url}/models", headers={"origin": "https://app.example.com"}, timeout=10)
    assert models.headers["access-control-allow-origin"] == "https://app.example.com"
