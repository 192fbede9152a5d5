"""The generated TypeScript and Go clients (`make clients`, from buf.gen.yaml) against the live gRPC server and real
model. Each language's conformance program (clients/<language>) reads one call as JSON, makes it through the
language's generated stubs and chatwire helper, and prints what came back as OpenAI JSON; the assertions live here,
the same for every language. The affinity tests run them, and the Python helper (clients/python), against a scripted
server instead."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jsonschema
import pytest
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2, chat_service_pb2_grpc
from chatwire_server.edge import stack
from chatwire_server.edge.certs import CLIENT_SPIFFE_ID, Authority
from conftest import CONFORMANCE, MODEL, NO_END_BIAS, _dump_logs, assert_valid, metric, run_server

ROOT = Path(__file__).resolve().parents[1]
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


def call(language: str, server: Server | Scripted, rpc: str, request: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Runs one call through `language`'s client; returns {"response"} | {"chunks", "error"?} | {"error"}, each with
    "replica"."""
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


AFFINITY = "x-chatwire-affinity"
REPLICA = "scripted-1"
MISSING = "missing"  # the scripted server's NOT_FOUND model
REPLY = {
    "id": "chatcmpl-scripted",
    "object": "chat.completion",
    "created": 1,
    "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
CHUNK = {
    "id": "chatcmpl-scripted",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": MODEL,
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
}


class Scripted(chat_service_pb2_grpc.ChatServiceServicer):
    """A ChatService that records the x-chatwire-affinity values of each call (by its request's `model`, which the
    test makes unique) and answers REPLY, or one CHUNK, naming REPLICA in its headers, as chatwire's replicas do; a
    model starting with MISSING gets NOT_FOUND, naming REPLICA in the trailers of a trailers-only reply."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: dict[str, list[str]] = {}

    def _answer(self, request: chat_completion_pb2.CreateChatCompletionRequest, context: grpc.ServicerContext) -> None:
        self.calls[request.model] = [value for name, value in context.invocation_metadata() if name == AFFINITY]
        if request.model.startswith(MISSING):
            context.set_trailing_metadata([("x-chatwire-replica", REPLICA)])
            context.abort(grpc.StatusCode.NOT_FOUND, f"The model `{request.model}` does not exist.")
        context.send_initial_metadata([("x-chatwire-replica", REPLICA)])

    def CreateChatCompletion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._answer(request, context)
        return json_format.ParseDict(REPLY, chat_completion_pb2.CreateChatCompletionResponse())

    def StreamChatCompletion(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._answer(request, context)
        yield json_format.ParseDict(CHUNK, chat_completion_pb2.CreateChatCompletionStreamResponse())


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    servicer = Scripted(f"127.0.0.1:{port}")
    chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    server.start()
    yield servicer
    server.stop(grace=None)


@pytest.fixture(scope="module")
def python_helper() -> ModuleType:
    """clients/python/chatwire_client.py, as a caller imports it (with clients/python on its path)."""
    return importlib.import_module("chatwire_client")


def python_call(
    helper: ModuleType,
    address: str,
    rpc: str,
    request: dict[str, Any],
    metadata: dict[str, str],
    tls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One call through the Python helper's channel (TLS with `tls`, the conformance programs' "tls" object, whose keys
    are the helper's arguments), reported as the conformance programs report theirs."""
    message = json_format.ParseDict(request, chat_completion_pb2.CreateChatCompletionRequest())
    with helper.channel(address, **(tls or {})) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        options: dict[str, Any] = {"metadata": list(metadata.items()), "timeout": 30}
        try:
            if rpc == "unary":
                reply, outcome = stub.CreateChatCompletion.with_call(message, **options)
                result: dict[str, Any] = {
                    "response": json_format.MessageToDict(reply, preserving_proto_field_name=True)
                }
            else:
                outcome = stub.StreamChatCompletion(message, **options)
                result = {"chunks": [json_format.MessageToDict(chunk) for chunk in outcome]}
        except grpc.RpcError as error:
            outcome, result = error, {"error": {"code": error.code().value[0]}}
        return {**result, "replica": helper.replica(outcome)}


def scripted_call(
    client: str,
    scripted: Scripted,
    helper: ModuleType,
    rpc: str,
    fields: dict[str, Any],
    metadata: dict[str, str],
    model: str = "scripted",
    tls: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[str] | None]:
    """A call from `client` to the scripted server (over TLS with `tls`): what it reported, and the
    x-chatwire-affinity values it sent (None if the call never reached the servicer)."""
    model = f"{model}-{uuid.uuid4().hex}"
    request = {"model": model, "messages": HI, **fields}
    if client == "python":
        result = python_call(helper, scripted.address, rpc, request, metadata, tls)
    else:
        result = call(client, scripted, rpc, request, api_key=None, metadata=metadata, tls=tls)
    return result, scripted.calls.get(model)


CLIENTS = pytest.mark.parametrize("client", [*sorted(CONFORMANCE), "python"])
RPCS = pytest.mark.parametrize("rpc", ["unary", "stream"])
LONG_KEY = "k" * 300
P = pytest.param


@CLIENTS
@RPCS
@pytest.mark.parametrize(
    ("fields", "metadata", "sent"),
    [
        # The most specific key first; an empty one is no key.
        P({"prompt_cache_key": "conv-1", "safety_identifier": "tenant-1", "user": "alice"}, {}, ["conv-1"], id="cache"),
        P({"safety_identifier": "tenant-1", "user": "alice"}, {}, ["tenant-1"], id="safety"),
        P({"prompt_cache_key": "", "user": "alice"}, {}, ["alice"], id="user"),
        P({}, {}, [], id="none"),
        P({"prompt_cache_key": LONG_KEY}, {}, [LONG_KEY[:256]], id="truncated"),
        # A value metadata cannot carry keys nothing, and the next key is tried (the whole value is checked).
        P({"user": "a\nb"}, {}, [], id="newline"),
        P({"user": "a\x7fb"}, {}, [], id="delete"),
        P({"prompt_cache_key": LONG_KEY + "\t", "user": "alice"}, {}, ["alice"], id="control-next"),
        P({"prompt_cache_key": "café", "user": "alice"}, {}, ["alice"], id="non-ascii-next"),
        # The caller's own key wins.
        P({"user": "alice"}, {AFFINITY: "mine"}, ["mine"], id="explicit"),
    ],
)
def test_affinity_metadata(
    built_clients: None,
    scripted: Scripted,
    python_helper: ModuleType,
    client: str,
    rpc: str,
    fields: dict[str, Any],
    metadata: dict[str, str],
    sent: list[str],
) -> None:
    result, received = scripted_call(client, scripted, python_helper, rpc, fields, metadata)
    assert received == sent
    assert "error" not in result and result["replica"] == REPLICA, result
    assert len(result["chunks"]) == 1 if rpc == "stream" else result["response"]["id"] == REPLY["id"], result


@CLIENTS
@RPCS
def test_replica_of_an_error(
    built_clients: None, scripted: Scripted, python_helper: ModuleType, client: str, rpc: str
) -> None:
    result, received = scripted_call(client, scripted, python_helper, rpc, {"user": "alice"}, {}, model=MISSING)
    assert received == ["alice"]
    error_of(result, grpc.StatusCode.NOT_FOUND)
    assert result["replica"] == REPLICA


class Pki:
    """Certificates for the TLS tests, as files: chatwire's CA and another, a server certificate from chatwire's CA,
    and client certificates from both."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory  # ca.pem, client.pem and client-key.pem, as `make certs` names them
        ours, other = Authority(), Authority("another CA")
        self.ca, _ = ours.pem.write(directory, "ca")
        self.other_ca, _ = other.pem.write(directory, "other-ca")
        self.server = ours.issue("localhost", hosts=("localhost", "127.0.0.1"), client=False)
        self.client = ours.issue("chatwire-client", uris=(CLIENT_SPIFFE_ID,), server=False).write(directory, "client")
        self.stranger = other.issue("chatwire-client", uris=(CLIENT_SPIFFE_ID,), server=False).write(
            directory, "stranger"
        )
        self.ca_pem = self.ca.read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def scripted_tls(pki: Pki) -> Iterator[Scripted]:
    """The scripted server over mutual TLS: a client certificate from chatwire's CA is required."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key, pki.server.cert)], root_certificates=pki.ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    servicer = Scripted(f"127.0.0.1:{port}")
    chat_service_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
    server.start()
    yield servicer
    server.stop(grace=None)


@CLIENTS
@RPCS
@pytest.mark.parametrize(
    ("ca", "client_cert", "served"),
    [
        P("ca", "client", True, id="mutual"),
        P("ca", None, False, id="no-client-cert"),
        P("ca", "stranger", False, id="client-cert-of-another-ca"),
        P("other_ca", "client", False, id="server-cert-of-another-ca"),
    ],
)
def test_mutual_tls(
    built_clients: None,
    pki: Pki,
    scripted_tls: Scripted,
    python_helper: ModuleType,
    client: str,
    rpc: str,
    ca: str,
    client_cert: str | None,
    served: bool,
) -> None:
    """Served only when each side's certificate chains to the CA the other trusts; otherwise the handshake fails and
    the call is UNAVAILABLE without reaching the server."""
    tls = {"ca_file": str(getattr(pki, ca))}
    if client_cert:
        cert_file, key_file = getattr(pki, client_cert)
        tls |= {"cert_file": str(cert_file), "key_file": str(key_file)}
    result, received = scripted_call(client, scripted_tls, python_helper, rpc, {"user": "alice"}, {}, tls=tls)
    if served:
        assert received == ["alice"] and "error" not in result and result["replica"] == REPLICA, result
        assert len(result["chunks"]) == 1 if rpc == "stream" else result["response"]["id"] == REPLY["id"], result
    else:
        assert received is None
        error_of(result, grpc.StatusCode.UNAVAILABLE)
        assert result["replica"] is None


README = (ROOT / "README.md").read_text()
SHELL = [body for lang, body in re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S) if lang == "sh"]
EXAMPLE_PROGRAMS = ("clients/typescript/dist/example.js", "build/clients/go/chatwire-example")
CERTS = "build/certs/"  # where `make certs` writes; the TLS examples name it
POLYGLOT_EXAMPLES = [body for body in SHELL if any(program in body for program in EXAMPLE_PROGRAMS)]
PLAIN_EXAMPLES = [body for body in POLYGLOT_EXAMPLES if CERTS not in body]
TLS_EXAMPLES = [body for body in POLYGLOT_EXAMPLES if CERTS in body]


def example_language(example: str) -> str:
    return "typescript" if EXAMPLE_PROGRAMS[0] in example else "go"


def run_example(
    example: str, server: Server | Scripted, key: str | None, certs: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """A README command, run as written but for the server's address, the key in CHATWIRE_API_KEY (or none), and
    the certificates in `certs` for those in build/certs/."""
    env = {name: value for name, value in os.environ.items() if name != "CHATWIRE_API_KEY"}
    if key:
        env["CHATWIRE_API_KEY"] = key
    command = example.replace("127.0.0.1:50050", server.address)
    if certs:
        command = command.replace(CERTS, f"{certs}/")
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


def test_readme_names_both_languages() -> None:
    assert sorted(map(example_language, PLAIN_EXAMPLES)) == ["go", "typescript"], PLAIN_EXAMPLES
    assert sorted(map(example_language, TLS_EXAMPLES)) == ["go", "typescript"], TLS_EXAMPLES


@pytest.mark.parametrize("example", PLAIN_EXAMPLES, ids=example_language)
def test_readme_examples(built_clients: None, server: Server, example: str) -> None:
    result = run_example(example, server, API_KEY)
    assert result.returncode == 0, result.stderr
    reply, streamed = result.stdout.strip().split("\n", 1)
    assert reply.strip() and streamed.strip()


def test_readme_example_reports_errors(built_clients: None, server: Server) -> None:
    """Without the key, each example exits 1 naming the status and the OpenAI code."""
    for example in PLAIN_EXAMPLES:
        result = run_example(example, server, None)
        assert result.returncode == 1 and "INVALID_API_KEY" in result.stderr, (example, result.stderr)
        assert re.search(r"Unauthenticated", result.stderr), result.stderr


@pytest.mark.parametrize("example", TLS_EXAMPLES, ids=example_language)
def test_readme_tls_examples(built_clients: None, pki: Pki, scripted_tls: Scripted, example: str) -> None:
    """The README's mutual-TLS commands, with the tests' certificates in place of `make certs`' own: both calls are
    served (the scripted server answers "Hi")."""
    result = run_example(example, scripted_tls, None, pki.directory)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Hi", "Hi"], result.stdout


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
