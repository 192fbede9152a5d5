"""The generated TypeScript and Go clients (`make clients`, from buf.gen.yaml) against the live gRPC server and real
model. Each language's conformance program (clients/<language>) reads one call as JSON, makes it through the
language's generated stubs and chatwire helper, and prints what came back as OpenAI JSON; the assertions live here,
the same for every language."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest

from chatwire_server.edge import stack
from conftest import MODEL, NO_END_BIAS, _dump_logs, assert_valid, metric, run_server

ROOT = Path(__file__).resolve().parents[1]
CONFORMANCE = {
    "typescript": ["node", str(ROOT / "clients/typescript/dist/conformance.js")],
    "go": [str(ROOT / "build/clients/go/chatwire-conformance")],
}
API_KEY = "sk-polyglot-test"
HI = [{"role": "user", "content": "Hi"}]
# 2,000 tokens with the end token banned: about 20 s of decoding, far beyond any cancel or deadline below.
LONG = {"model": MODEL, "messages": HI, "max_tokens": 2000, "logit_bias": NO_END_BIAS}

pytestmark = pytest.mark.polyglot


class Server:
    """The gRPC server (API keys required) and its metrics endpoint."""

    def __init__(self, port: int, metrics_port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.metrics_port = metrics_port

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A counter or gauge summed over the series whose labels include `labels` (0 when none)."""
        return metric(self.metrics_port, name, labels) or 0.0

    def assert_freed_soon(self) -> None:
        """No sequence runs within 3 s: a call that ended early freed its sequence, and the LONG generation it asked
        for (about 20 s) did not go on without it."""
        deadline = time.monotonic() + 3
        while self.metric("chatwire_running_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.metric("chatwire_running_sequences") == 0


@pytest.fixture(scope="session")
def built_clients() -> None:
    """Builds (or finds up to date) both languages' clients, exactly as `make clients` does."""
    subprocess.run(["make", "--no-print-directory", "-s", "clients"], cwd=ROOT, check=True, timeout=900)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("polyglot") / "server.log"
    port, metrics_port = stack.free_port(), stack.free_port()
    try:
        with run_server(port, log, env={"CHATWIRE_API_KEYS": API_KEY}, metrics_port=metrics_port):
            yield Server(port, metrics_port)
    finally:
        if request.session.testsfailed:
            _dump_logs(log)


def call(language: str, server: Server, rpc: str, request: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Runs one call through `language`'s client; returns {"response"} | {"chunks", "error"?} | {"error"}."""
    payload = {"address": server.address, "api_key": API_KEY, "rpc": rpc, "request": request, **options}
    result = subprocess.run(
        CONFORMANCE[language], input=json.dumps(payload), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def error_of(result: dict[str, Any], code: grpc.StatusCode) -> dict[str, Any]:
    assert "error" in result and "response" not in result, result
    error = result["error"]
    assert error["code"] == code.value[0], error
    return error


def assert_openai_error(error: dict[str, Any], code: str, param: str | None) -> None:
    """The status details and the `x-chatwire-error` trailer, as decoded by the client, agree with each other."""
    assert error["reason"] == code.upper() and error["domain"] == "chatwire.dev", error
    assert_valid(error["openai"], "ErrorResponse")
    body = error["openai"]["error"]
    assert body["code"] == code and body["param"] == param and body["message"] == error["message"], error
    assert error["metadata"]["type"] == body["type"]
    if param is not None:
        assert error["field"] == param and error["metadata"]["param"] == param


LANGUAGES = pytest.mark.parametrize("language", sorted(CONFORMANCE))


@LANGUAGES
def test_unary_with_api_key(built_clients: None, server: Server, language: str) -> None:
    result = call(language, server, "unary", {"model": MODEL, "messages": HI, "max_tokens": 8})
    reply = result["response"]
    assert_valid(reply, "CreateChatCompletionResponse")
    assert reply["choices"][0]["message"]["content"] and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < reply["usage"]["completion_tokens"] <= 8


@LANGUAGES
def test_stream_with_usage(built_clients: None, server: Server, language: str) -> None:
    request = {"model": MODEL, "messages": HI, "max_tokens": 12, "stream_options": {"include_usage": True}}
    result = call(language, server, "stream", request)
    assert "error" not in result, result
    chunks = result["chunks"]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finished = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finished[:-1] == [None] * (len(finished) - 1) and finished[-1] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()
    assert chunks[-1]["choices"] == [] and 0 < chunks[-1]["usage"]["completion_tokens"] <= 12


CANCELLED_STREAMS = ("chatwire_requests_total", {"method": "StreamChatCompletion", "status": "CANCELLED"})


@LANGUAGES
def test_cancel_mid_stream_frees_the_sequence(built_clients: None, server: Server, language: str) -> None:
    cancelled = server.metric(*CANCELLED_STREAMS)
    result = call(language, server, "stream", LONG, cancel_after=3)
    assert len(result["chunks"]) == 3
    error_of(result, grpc.StatusCode.CANCELLED)
    server.assert_freed_soon()
    assert server.metric(*CANCELLED_STREAMS) == cancelled + 1


@LANGUAGES
def test_deadline_exceeded(built_clients: None, server: Server, language: str) -> None:
    result = call(language, server, "stream", LONG, timeout_ms=1500)
    assert result["chunks"], "the stream had started"
    error_of(result, grpc.StatusCode.DEADLINE_EXCEEDED)
    server.assert_freed_soon()


@LANGUAGES
@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_api_key_required(built_clients: None, server: Server, language: str, key: str | None) -> None:
    result = call(language, server, "unary", {"model": MODEL, "messages": HI, "max_tokens": 2}, api_key=key)
    assert_openai_error(error_of(result, grpc.StatusCode.UNAUTHENTICATED), "invalid_api_key", None)


@LANGUAGES
def test_not_found_with_error_info(built_clients: None, server: Server, language: str) -> None:
    result = call(language, server, "unary", {"model": "no-such-model", "messages": HI})
    assert_openai_error(error_of(result, grpc.StatusCode.NOT_FOUND), "model_not_found", "model")


@LANGUAGES
@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"temperature": 5}, "temperature", "invalid_value"),
        # A number where OpenAI takes a string or parts: fine for the Value field, refused by the server.
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ],
)
def test_invalid_argument_with_bad_request(
    built_clients: None, server: Server, language: str, change: dict[str, Any], param: str, code: str
) -> None:
    result = call(language, server, "stream", {"model": MODEL, "messages": HI, **change})
    assert result["chunks"] == []
    assert_openai_error(error_of(result, grpc.StatusCode.INVALID_ARGUMENT), code, param)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@LANGUAGES
def test_tool_call_with_struct_parameters(built_clients: None, server: Server, language: str) -> None:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 200,
    }
    reply = call(language, server, "unary", request)["response"]
    assert_valid(reply, "CreateChatCompletionResponse")
    (tool_call,) = reply["choices"][0]["message"]["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(tool_call["function"]["arguments"]), WEATHER["function"]["parameters"])


@LANGUAGES
def test_json_schema_response_format(built_clients: None, server: Server, language: str) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Invent a person."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}},
        "max_tokens": 100,
    }
    reply = call(language, server, "unary", request)["response"]
    assert_valid(reply, "CreateChatCompletionResponse")
    assert reply["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)


README = (ROOT / "README.md").read_text()
SHELL = [body for lang, body in re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S) if lang == "sh"]
EXAMPLE_PROGRAMS = ("clients/typescript/dist/example.js", "build/clients/go/chatwire-example")
POLYGLOT_EXAMPLES = [body for body in SHELL if any(program in body for program in EXAMPLE_PROGRAMS)]


def run_example(example: str, server: Server, key: str | None) -> subprocess.CompletedProcess[str]:
    """A README command, run as written but for the server's address, the key in CHATWIRE_API_KEY (or none)."""
    env = {name: value for name, value in os.environ.items() if name != "CHATWIRE_API_KEY"}
    if key:
        env["CHATWIRE_API_KEY"] = key
    command = example.replace("127.0.0.1:50051", server.address)
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


def test_readme_names_both_languages() -> None:
    assert len(POLYGLOT_EXAMPLES) == 2, POLYGLOT_EXAMPLES


@pytest.mark.parametrize("example", POLYGLOT_EXAMPLES, ids=["typescript", "go"])
def test_readme_examples(built_clients: None, server: Server, example: str) -> None:
    result = run_example(example, server, API_KEY)
    assert result.returncode == 0, result.stderr
    reply, streamed = result.stdout.strip().split("\n", 1)
    assert reply.strip() and streamed.strip()


def test_readme_example_reports_errors(built_clients: None, server: Server) -> None:
    """Without the key, each example exits 1 naming the status and the OpenAI code."""
    for example in POLYGLOT_EXAMPLES:
        result = run_example(example, server, None)
        assert result.returncode == 1 and "INVALID_API_KEY" in result.stderr, (example, result.stderr)
        assert re.search(r"Unauthenticated", result.stderr), result.stderr


def test_proto_bundle_is_self_contained(built_clients: None, tmp_path: Path) -> None:
    """The tarball alone (plus the well-known types every protoc has) generates a working client."""
    with tarfile.open(ROOT / "build/chatwire-proto.tar.gz") as bundle:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            bundle.extraction_filter = tarfile.data_filter
        bundle.extractall(tmp_path)
    root = tmp_path / "chatwire-proto"
    protos = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    assert {"chatwire/v1/chat_service.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"} <= set(
        protos
    )
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        check=True,
        capture_output=True,
        env={**stack.python_env(), "PYTHONPATH": ""},
    )
    imported = subprocess.run(
        [sys.executable, "-c", "from chatwire.v1 import chat_service_pb2_grpc; print('ok')"],
        cwd=out,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert imported.stdout.strip() == "ok", imported.stderr
