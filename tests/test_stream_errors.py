"""Errors after a stream has started: OpenAI's clients get a last `data: {"error": ...}` event and `[DONE]`;
gRPC callers get the status code. The scripted engine fails on cue; the real model serves beside it. The real
model's engine worker is also killed mid-stream (SIGKILL, as the OOM killer would): its streams end with an
error event, and the worker comes back."""

from __future__ import annotations

import json
import os
import signal
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
from chatwire_server.edge import stack
from conftest import (
    MODEL,
    NO_END_BIAS,
    Stack,
    assert_valid,
    engine_workers,
    parse_sse,
    run_envoy,
    run_server,
    run_stack,
)

FAILING = "scripted-failing"
BUGGY = "scripted-buggy"
HELLO = [{"role": "user", "content": "Hi"}]
# A reply that outlasts the test: 400 tokens with the end-of-turn token banned.
LONG_REPLY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count from 1 to 500."}],
    "max_tokens": 400,
    "logit_bias": NO_END_BIAS,
}


@pytest.fixture(scope="module")
def with_failing_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    config = tmp_path_factory.mktemp("config") / "models.toml"
    scripted = (
        f'\n[[models]]\nid = "{FAILING}"\nengine = "scripted"\n\n[models.settings]\n'
        'reply = "one two three four five"\nfail_after = 3\n'
        f'\n[[models]]\nid = "{BUGGY}"\nengine = "scripted"\n\n[models.settings]\nfail_after = 0\nfailure = "bug"\n'
    )
    config.write_text(stack.DEFAULT_CONFIG.read_text() + scripted)
    with run_stack(request, Path(config)) as running:
        yield running


def test_sse_stream_ends_with_an_error_event_then_done(with_failing_model: Stack) -> None:
    reply = httpx.post(
        f"{with_failing_model.base_url}/chat/completions",
        json={"model": FAILING, "messages": HELLO, "stream": True},
        timeout=60,
    )
    assert reply.status_code == 200  # the status went out with the first chunk
    events = parse_sse(reply.text)
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert_valid(error, "ErrorResponse")
    assert error["error"]["type"] == "server_error" and "failed mid-reply" in error["error"]["message"]
    chunks = events[:-2]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "one two three"


def test_sdk_raises_on_the_error_event(with_failing_model: Stack) -> None:
    client = openai.OpenAI(base_url=with_failing_model.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(model=FAILING, messages=HELLO, stream=True):  # type: ignore[arg-type]
            pass
    assert "failed mid-reply" in str(caught.value)


def test_unary_failure_is_503(with_failing_model: Stack) -> None:
    reply = httpx.post(
        f"{with_failing_model.base_url}/chat/completions", json={"model": FAILING, "messages": HELLO}, timeout=60
    )
    assert reply.status_code == 503 and reply.json()["error"]["type"] == "server_error"


def test_a_bug_is_500_without_internals(with_failing_model: Stack) -> None:
    for stream in (False, True):
        reply = httpx.post(
            f"{with_failing_model.base_url}/chat/completions",
            json={"model": BUGGY, "messages": HELLO, "stream": stream},
            timeout=60,
        )
        assert reply.status_code == 500
        assert_valid(reply.json(), "ErrorResponse")
        assert reply.json()["error"]["type"] == "server_error" and "internal details" not in reply.text
    assert "scripted bug" in Path(with_failing_model.server_log).read_text()  # logged for the operator


def test_grpc_stream_fails_with_a_status(with_failing_model: Stack) -> None:
    request = json_format.ParseDict({"model": FAILING, "messages": HELLO}, pb.CreateChatCompletionRequest())
    received = []
    with grpc.insecure_channel(with_failing_model.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            for chunk in chat_service_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(request, timeout=60):
                received.append(chunk)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert json.loads(dict(caught.value.trailing_metadata())["x-chatwire-error"])["error"]["type"] == "server_error"  # type: ignore[attr-defined]
    assert len(received) == 4 and all(c.object == "chat.completion.chunk" for c in received)


def test_the_real_model_still_serves_beside_it(with_failing_model: Stack) -> None:
    client = openai.OpenAI(base_url=with_failing_model.base_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL, FAILING, BUGGY]
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices  # type: ignore[arg-type]


def test_after_the_service_is_killed_the_edge_answers_503(tmp_path: Path) -> None:
    ports = stack.Ports(
        http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port(), metrics=stack.free_port()
    )
    logs = tmp_path
    with (
        run_server(ports.grpc, logs / "server.log", metrics_port=ports.metrics) as server,
        run_envoy(ports, logs / "envoy.log"),
    ):
        base = f"http://127.0.0.1:{ports.http}"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        workers = engine_workers(server.pid)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health", timeout=10).status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.5)  # Envoy's health checks notice within a few seconds
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503
        reply = httpx.post(f"{base}/v1/chat/completions", json={"model": MODEL, "messages": HELLO}, timeout=30)
        assert reply.status_code == 503
        assert_valid(reply.json(), "ErrorResponse")
        assert reply.json()["error"]["code"] == "service_unavailable"
        # Its engine worker saw the server's end of their socket close, and exited: no model left behind.
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers and not any(_running(pid) for pid in workers)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # an exited process waiting to be reaped is not running


@pytest.fixture(scope="module")
def breakable(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack of its own with the real model, whose engine worker these tests kill."""
    with run_stack(request) as running:
        yield running


def _kill_the_engine(running: Stack) -> int:
    [worker] = engine_workers(running.server_pid)
    os.kill(worker, signal.SIGKILL)
    return worker


def _wait_until_served_again(running: Stack) -> None:
    """Meanwhile the model answers 503 `engine_restarting` with Retry-After; then it serves again."""
    deadline = time.monotonic() + 60
    while True:
        reply = httpx.post(
            f"{running.base_url}/chat/completions",
            json={"model": MODEL, "messages": HELLO, "max_tokens": 2},
            timeout=60,
        )
        if reply.status_code == 200:
            return
        assert reply.status_code == 503, reply.text
        assert_valid(reply.json(), "ErrorResponse")
        assert reply.json()["error"]["code"] == "engine_restarting" and reply.headers["retry-after"]
        assert time.monotonic() < deadline, "the engine worker did not come back"
        time.sleep(0.2)


def _restarts(running: Stack) -> float:
    scrape = httpx.get(f"http://127.0.0.1:{running.ports.metrics}/metrics", timeout=10).text
    line = f'chatwire_engine_restarts_total{{model="{MODEL}"}} '
    return sum(float(row[len(line) :]) for row in scrape.splitlines() if row.startswith(line))


def test_a_stream_cut_by_a_killed_engine_ends_with_an_error_event(breakable: Stack) -> None:
    restarts = _restarts(breakable)
    events: list[object] = []
    with httpx.stream(
        "POST", f"{breakable.base_url}/chat/completions", json={**LONG_REPLY, "stream": True}, timeout=60
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line:
                events.extend(parse_sse(line))
                if len(events) == 5:
                    killed = _kill_the_engine(breakable)
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert_valid(error, "ErrorResponse")
    assert isinstance(error, dict) and error["error"]["code"] == "engine_failed"
    assert error["error"]["type"] == "server_error" and "killed by signal 9" in error["error"]["message"]
    chunks = events[:-2]
    assert len(chunks) >= 5
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert not any(c["choices"][0]["finish_reason"] for c in chunks if isinstance(c, dict)), "the reply was cut"

    _wait_until_served_again(breakable)
    assert engine_workers(breakable.server_pid) != [killed]
    assert _restarts(breakable) == restarts + 1


def test_sdk_raises_when_the_engine_dies_mid_stream(breakable: Stack) -> None:
    client = openai.OpenAI(base_url=breakable.base_url, api_key="unused", max_retries=0, timeout=60)
    received = 0
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(**LONG_REPLY, stream=True):  # type: ignore[call-overload]
            received += 1
            if received == 3:
                _kill_the_engine(breakable)
    assert "stopped unexpectedly" in str(caught.value)
    _wait_until_served_again(breakable)


def test_grpc_stream_cut_by_a_killed_engine_is_unavailable(breakable: Stack) -> None:
    request = json_format.ParseDict(LONG_REPLY, pb.CreateChatCompletionRequest())
    received = 0
    with grpc.insecure_channel(breakable.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in chat_service_pb2_grpc.ChatServiceStub(channel).StreamChatCompletion(request, timeout=60):
                received += 1
                if received == 3:
                    _kill_the_engine(breakable)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    body = json.loads(dict(caught.value.trailing_metadata())["x-chatwire-error"])  # type: ignore[attr-defined]
    assert body["error"]["code"] == "engine_failed"
    _wait_until_served_again(breakable)
