"""API keys at the edge and on the gRPC API: the same check, the same 401 body, keys never logged."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc, models_pb2
from chatwire_server.edge import stack
from conftest import MODEL, Stack, assert_valid, run_stack

PLAIN_KEY = "sk-plain-test-key-1"
FILE_KEY = "sk-hashed-test-key-2"
LIMITED_KEY = "sk-limited-test-key-3"
HELLO = [{"role": "user", "content": "Hi"}]


def keys_file_line(key: str) -> str:
    """The keys-file line for `key`, from the command the README gives operators."""
    return subprocess.run(
        [sys.executable, "-m", "chatwire_server.api.auth"],
        input=key,
        capture_output=True,
        text=True,
        env=stack.python_env(),
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    line = keys_file_line(FILE_KEY)
    assert line.startswith("sha256:") and FILE_KEY not in line
    limited = keys_file_line(LIMITED_KEY)
    keys_file.write_text(f"# team keys\n{line}\n{limited} models=some-other-model\n")
    env = {"CHATWIRE_API_KEYS": PLAIN_KEY, "CHATWIRE_API_KEYS_FILE": str(keys_file)}
    with run_stack(request, server_env=env) as running:
        yield running


def assert_invalid_api_key(reply: httpx.Response) -> None:
    assert reply.status_code == 401, reply.text
    body = reply.json()
    assert_valid(body, "ErrorResponse")
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": PLAIN_KEY}])
def test_http_without_a_valid_key_is_401(secured: Stack, headers: dict[str, str]) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    assert_invalid_api_key(httpx.post(f"{secured.base_url}/chat/completions", json=body, headers=headers, timeout=60))
    assert_invalid_api_key(
        httpx.post(f"{secured.base_url}/chat/completions", json={**body, "stream": True}, headers=headers, timeout=60)
    )
    assert_invalid_api_key(httpx.get(f"{secured.base_url}/models", headers=headers, timeout=60))


@pytest.mark.parametrize("key", [PLAIN_KEY, FILE_KEY])
def test_sdk_with_a_valid_key(secured: Stack, key: str) -> None:
    client = openai.OpenAI(base_url=secured.base_url, api_key=key, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices  # type: ignore[arg-type]
    assert [m.id for m in client.models.list()] == [MODEL]


def test_sdk_with_a_wrong_key_raises_authentication_error(secured: Stack) -> None:
    client = openai.OpenAI(base_url=secured.base_url, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_api_key"


def test_grpc_checks_the_same_keys(secured: Stack) -> None:
    request = json_format.ParseDict(
        {"model": MODEL, "messages": HELLO, "max_tokens": 2}, pb.CreateChatCompletionRequest()
    )
    with grpc.insecure_channel(secured.grpc_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer sk-wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateChatCompletion(request, metadata=metadata, timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            trailer = dict(caught.value.trailing_metadata())["x-chatwire-error"]  # type: ignore[attr-defined]
            assert json.loads(trailer)["error"]["code"] == "invalid_api_key"
            with pytest.raises(grpc.RpcError):
                list(stub.StreamChatCompletion(request, metadata=metadata, timeout=30))
        good = (("authorization", f"Bearer {FILE_KEY}"),)
        assert stub.CreateChatCompletion(request, metadata=good, timeout=60).choices
        assert stub.ListModels(models_pb2.ListModelsRequest(), metadata=good, timeout=10).data
        # Health stays open for probes.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_health_endpoint_needs_no_key(secured: Stack) -> None:
    assert httpx.get(f"http://127.0.0.1:{secured.ports.http}/health", timeout=10).status_code == 200


def test_keys_never_reach_the_logs(secured: Stack) -> None:
    logs = Path(secured.server_log).read_text() + Path(secured.envoy_log).read_text()
    assert "invalid_api_key" in logs or "UNAUTHENTICATED" in logs  # the checks above did run
    assert PLAIN_KEY not in logs and FILE_KEY not in logs and "sk-wrong" not in logs


def test_open_server_warns_loudly(chatwire: Stack) -> None:
    assert "AUTHENTICATION IS OFF" in Path(chatwire.server_log).read_text()


def test_a_key_limited_to_other_models_gets_403(secured: Stack) -> None:
    headers = {"authorization": f"Bearer {LIMITED_KEY}"}
    reply = httpx.post(
        f"{secured.base_url}/chat/completions", json={"model": MODEL, "messages": HELLO}, headers=headers, timeout=60
    )
    assert reply.status_code == 403
    assert_valid(reply.json(), "ErrorResponse")
    assert reply.json()["error"]["code"] == "model_not_allowed" and reply.json()["error"]["param"] == "model"
    assert httpx.get(f"{secured.base_url}/models", headers=headers, timeout=10).json()["data"] == []
    client = openai.OpenAI(base_url=secured.base_url, api_key=LIMITED_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.retrieve(MODEL)
