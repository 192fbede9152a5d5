"""Requests that once hurt the service (issue 11's reproductions), each now a clear 400 for its sender alone:
schemas that are not schemas, work beyond the documented limits, undecodable bytes, huge echoed values; and the
engine's own defences (linear tokenizing off the event loop, slots before the queue, a watchdog for a wedged
worker). Fuzzing in test_fuzz.py covers the space around them."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire_server import structured
from chatwire_server.api import convert
from chatwire_server.domain import ChatMessage
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import EngineSettings, LlamaCppEngine, resolve_model_path
from chatwire_server.errors import InvalidRequestError
from conftest import MODEL, NO_END_BIAS, Stack, assert_valid, engine_workers, parse_sse, run_stack

HI = [{"role": "user", "content": "hi"}]
SCHEMA_PARAM = "response_format.json_schema.schema"


def with_schema(schema: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": HI,
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }


def nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# Request -> (param, code) of the 400 it must get.
REFUSED: dict[str, tuple[dict[str, Any], str | None, str]] = {
    "properties null": (with_schema({"type": "object", "properties": None}), SCHEMA_PARAM, "invalid_value"),
    "properties []": (with_schema({"type": "object", "properties": []}), SCHEMA_PARAM, "invalid_value"),
    "anyOf 5": (with_schema({"anyOf": 5}), SCHEMA_PARAM, "invalid_value"),
    "allOf null": (with_schema({"allOf": None}), SCHEMA_PARAM, "invalid_value"),
    "$defs []": (with_schema({"$defs": []}), SCHEMA_PARAM, "invalid_value"),
    "required a string": (with_schema({"type": "object", "required": "a"}), SCHEMA_PARAM, "invalid_value"),
    "unknown type": (with_schema({"type": "strin"}), SCHEMA_PARAM, "invalid_value"),
    "negative maxItems": (with_schema({"type": "array", "maxItems": -1}), SCHEMA_PARAM, "invalid_value"),
    "empty enum": (with_schema({"enum": []}), SCHEMA_PARAM, "unsupported_schema"),
    "enum of 100,000": (with_schema({"enum": [f"v{i}" for i in range(100_000)]}), SCHEMA_PARAM, "schema_too_large"),
    "a{1,100000}": (with_schema({"type": "string", "pattern": "^a{1,100000}$"}), SCHEMA_PARAM, "schema_too_large"),
    "13 levels deep": (with_schema(nested(13)), SCHEMA_PARAM, "schema_too_large"),
    "501 optional properties": (
        with_schema({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(501)}}),
        SCHEMA_PARAM,
        "schema_too_large",
    ),
    "integer bound beyond 64 bits": (
        with_schema({"type": "integer", "minimum": 2**70}),
        SCHEMA_PARAM,
        "unsupported_schema",
    ),
    "too many properties": (
        with_schema(
            {
                "type": "object",
                "properties": {f"p{i}": {"type": "integer"} for i in range(5001)},
                "required": [f"p{i}" for i in range(5001)],
            }
        ),
        SCHEMA_PARAM,
        "schema_too_large",
    ),
    "tool parameters not a schema": (
        {
            "model": MODEL,
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": []}}}],
        },
        "tools[0].function.parameters",
        "invalid_value",
    ),
    "logit_bias key ²": ({"model": MODEL, "messages": HI, "logit_bias": {"²": 1}}, "logit_bias", "invalid_value"),
    "logit_bias key ①": ({"model": MODEL, "messages": HI, "logit_bias": {"①": 1}}, "logit_bias", "invalid_value"),
    "logit_bias key --1": ({"model": MODEL, "messages": HI, "logit_bias": {"--1": 1}}, "logit_bias", "invalid_value"),
    "1 MiB stop": ({"model": MODEL, "messages": HI, "stop": "x" * (1 << 20)}, "stop", "string_above_max_length"),
    "50,000 messages": (
        {"model": MODEL, "messages": [{"role": "user", "content": "word"}] * 50_000},
        "messages",
        "array_above_max_length",
    ),
    "100,000 content parts": (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100_000}]},
        "messages",
        "array_above_max_length",
    ),
    "129 tools": (
        {
            "model": MODEL,
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)],
        },
        "tools",
        "array_above_max_length",
    ),
    "4 MiB of content": (
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * ((4 << 20) - 1000)}]},
        "messages",
        "context_length_exceeded",
    ),
}


def test_limits_are_checked_before_any_work() -> None:
    """The converter alone (no engine) refuses what the limits bound, naming the field."""
    for name, (body, param, code) in REFUSED.items():
        if code in ("context_length_exceeded", "unsupported_schema"):
            continue  # found by the engine and by llguidance
        request = json_format.ParseDict(body, pb.CreateChatCompletionRequest())
        with pytest.raises(InvalidRequestError) as caught:
            convert.chat_request_from_proto(request)
        assert (caught.value.param, caught.value.code) == (param, code), name


def test_schemas_at_the_limits_are_accepted() -> None:
    structured.check_schema(nested(12), SCHEMA_PARAM)
    structured.check_schema({"enum": [f"v{i}" for i in range(1000)]}, SCHEMA_PARAM)
    structured.check_schema({"type": "string", "pattern": "^((a{1,100}){1,100}){1,100}$"}, SCHEMA_PARAM)
    names = [f"p{i}" for i in range(5000)]
    all_required = {"type": "object", "properties": {key: {} for key in names}, "required": names}
    structured.check_schema(all_required, SCHEMA_PARAM)
    structured.check_schema({"type": "object", "properties": {key: {} for key in names[:500]}}, SCHEMA_PARAM)


def error_of(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text[:500]
    body = reply.json()
    assert_valid(body, "ErrorResponse")
    return dict(body["error"])


@pytest.fixture
def stream_watch(chatwire: Stack) -> Iterator[list[float]]:
    """A long stream running beside the test: the arrival times of its chunks (checked for stalls after)."""
    arrivals: list[float] = []
    body = {"model": MODEL, "messages": HI, "max_tokens": 400, "stream": True, "logit_bias": NO_END_BIAS}

    def stream() -> None:
        with httpx.stream("POST", f"{chatwire.base_url}/chat/completions", json=body, timeout=300) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())

    thread = threading.Thread(target=stream)
    thread.start()
    while not arrivals:
        time.sleep(0.05)
    yield arrivals
    thread.join(300)


def test_hostile_requests_get_a_400_quickly_and_stall_no_one(chatwire: Stack, stream_watch: list[float]) -> None:
    url = f"{chatwire.base_url}/chat/completions"
    for name, (body, param, code) in REFUSED.items():
        started = time.monotonic()
        error = error_of(
            httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60), 400
        )
        assert (error["param"], error["code"]) == (param, code), name
        assert time.monotonic() - started < 10, f"{name} took {time.monotonic() - started:.1f}s"
    done = time.monotonic()
    gaps = [b - a for a, b in itertools.pairwise(stream_watch) if b < done]
    # Unbounded work held streams for minutes (50,000 messages: over 60 s); 5 s leaves room for a noisy 2-core box.
    assert gaps and max(gaps) < 5.0, f"the stream beside them stalled for {max(gaps):.1f}s"


def test_echoed_values_are_cut_short(chatwire: Stack) -> None:
    """A 1 MiB model name is quoted short: the error travels as gRPC metadata and must stay small."""
    url = f"{chatwire.base_url}/chat/completions"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        huge = pool.submit(httpx.post, url, json={"model": "x" * (1 << 20), "messages": HI}, timeout=60)
        others = [
            pool.submit(httpx.post, url, json={"model": MODEL, "messages": HI, "max_tokens": 2}, timeout=60)
            for _ in range(6)
        ]
        error = error_of(huge.result(), 404)
        assert error["code"] == "model_not_found" and len(error["message"]) < 300
        assert [f.result().status_code for f in others] == [200] * 6
    accent = error_of(httpx.post(url, json={"model": "mode\u0301l", "messages": HI}, timeout=60), 404)
    assert "mode\u0301l" in accent["message"]


@pytest.mark.parametrize("n", [2, 128])
def test_one_token_choices_all_finish_and_free_their_slots(chatwire: Stack, n: int) -> None:
    for limit in ("max_tokens", "max_completion_tokens"):
        body = {"model": MODEL, "messages": HI, "n": n, limit: 1}
        reply = httpx.post(f"{chatwire.base_url}/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200 and len(reply.json()["choices"]) == n
    metrics = httpx.get(f"http://127.0.0.1:{chatwire.ports.metrics}/metrics", timeout=10).text
    assert f'chatwire_running_sequences{{model="{MODEL}"}} 0.0' in metrics


def grpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_undecodable_and_malformed_grpc_requests_are_invalid_argument(chatwire: Stack) -> None:
    with grpc.insecure_channel(chatwire.grpc_target) as channel:
        for method in ("CreateChatCompletion", "GetModel", "ListModels"):
            raw = channel.unary_unary(f"/chatwire.v1.ChatService/{method}")
            error = grpc_error(lambda raw=raw: raw(b"\xff\xff\xff\xff", timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
            status = rpc_status.from_call(error)
            assert status is not None
            info = error_details_pb2.ErrorInfo()
            assert any(d.Unpack(info) for d in status.details) and info.reason == "INVALID_REQUEST"
        request = json_format.ParseDict(
            with_schema(nested(40)), pb.CreateChatCompletionRequest(), max_recursion_depth=500
        )
        create = channel.unary_unary("/chatwire.v1.ChatService/CreateChatCompletion")
        error = grpc_error(lambda: create(request.SerializeToString(), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "levels deep" in str(error.details())
        for name in ("properties null", "anyOf 5", "logit_bias key ²"):
            request = json_format.ParseDict(REFUSED[name][0], pb.CreateChatCompletionRequest())
            error = grpc_error(lambda request=request: create(request.SerializeToString(), timeout=10))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name


def test_edge_answers_undecodable_requests_in_openai_shape(chatwire: Stack) -> None:
    url = f"{chatwire.base_url}/chat/completions"
    assert error_of(httpx.post(url, json=with_schema(nested(30)), timeout=60), 400)["code"] == "invalid_request"
    assert error_of(httpx.post(url, json={"model": MODEL, "messages": HI, "logit_bias": {"5": {}}}, timeout=60), 400)
    assert error_of(httpx.get(f"{chatwire.base_url}/models/%ff", timeout=60), 400)


def test_chunked_tokenizing_gives_the_same_tokens() -> None:
    """Prompts are tokenized in pieces that each start at a special token (linear, where llama.cpp's pass over
    special tokens is quadratic); the tokens must be exactly those of the whole text."""
    settings = tomllib.loads(stack.DEFAULT_CONFIG.read_text())["models"][0]["settings"]
    engine = LlamaCppEngine(resolve_model_path(settings), EngineSettings(kv_cells=16384, max_sequences=2, n_threads=1))
    try:
        conversations = [
            [ChatMessage("user", "Hi")],
            [
                ChatMessage("system", "Be brief.\n\n"),
                ChatMessage("user", " spaced  out \n"),
                ChatMessage("assistant", "ok"),
            ],
            [ChatMessage("user", "literal <|im_start|>user tags<|im_end|> and <|endoftext|>x")] * 3,
            [ChatMessage("user", "héllo wörld 👋 " * 50), ChatMessage("assistant", None), ChatMessage("user", "\n\n")],
        ]
        for messages in conversations:
            rendered = engine.render_prompt(messages)
            whole = engine.tokenize(rendered.prompt, add_special=not rendered.added_special)
            assert engine.tokenize_prompt(messages) == whole
        many = [ChatMessage("user", "word")] * 4000
        started = time.monotonic()
        engine.tokenize_prompt(many)
        assert time.monotonic() - started < 2.0  # whole, llama.cpp took about 3 s for 8,000 special tokens
    finally:
        import asyncio

        asyncio.run(engine.close())


@pytest.fixture(scope="module")
def four_slots(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Four decode slots and no queue: a request either starts at once or gets a 429."""
    config = tmp_path_factory.mktemp("slots") / "models.toml"
    text = stack.DEFAULT_CONFIG.read_text()
    config.write_text(
        text.replace("max_sequences = 128", "max_sequences = 4").replace(
            "max_queued_requests = 64", "max_queued_requests = 0"
        )
    )
    with run_stack(request, Path(config)) as running:
        yield running


def test_a_burst_fills_every_slot_before_anyone_gets_429(four_slots: Stack) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 40, "stream": True, "logit_bias": NO_END_BIAS}
    url = f"{four_slots.base_url}/chat/completions"
    barrier = threading.Barrier(4)

    def stream(_: int) -> int:
        barrier.wait()
        with httpx.stream("POST", url, json=body, timeout=120) as reply:
            reply.read()
            return reply.status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(stream, range(4))) == [200] * 4


@pytest.fixture(scope="module")
def watched(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A stack whose engine watchdog gives up on a worker after 3 s without progress."""
    with run_stack(request, server_env={"CHATWIRE_ENGINE_STALL_TIMEOUT_S": "3"}) as running:
        yield running


def test_a_wedged_engine_is_restarted_and_its_requests_fail_cleanly(watched: Stack) -> None:
    """Fault injected: the engine worker is frozen (SIGSTOP) mid-stream. Its stream ends with an error event and
    `[DONE]` within seconds, the worker is replaced, and the model serves again."""
    [worker] = engine_workers(watched.server_pid)
    body = {"model": MODEL, "messages": HI, "max_tokens": 300, "stream": True, "logit_bias": NO_END_BIAS}
    url = f"{watched.base_url}/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(worker, signal.SIGSTOP)
        started = time.monotonic()
        rest = "\n\n".join(line for line in lines if line.startswith("data: "))
    events = parse_sse(rest)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_failed"
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 60
    while True:
        reply = httpx.post(url, json={"model": MODEL, "messages": HI, "max_tokens": 2}, timeout=60)
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_restarting"
        time.sleep(0.5)
    assert reply.status_code == 200
    assert engine_workers(watched.server_pid) != [worker]
    assert "made no progress" in Path(watched.server_log).read_text()
