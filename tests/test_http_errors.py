"""Bad input and failures through the real Envoy: OpenAI's error shape, the right status, never a 500."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from chatwire_server.edge import stack
from conftest import MODEL, Stack, assert_valid, run_envoy

USER = [{"role": "user", "content": "Hi"}]


def post(chatwire: Stack, body: str | dict[str, object], **headers: str) -> httpx.Response:
    url = f"{chatwire.base_url}/chat/completions"
    if isinstance(body, str):
        return httpx.post(url, content=body, headers={"content-type": "application/json", **headers}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


def error_of(reply: httpx.Response, status: int) -> dict[str, object]:
    """The OpenAI error object of a reply, after checking status, content type and schema."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert_valid(body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    "body",
    [
        "{bad json",
        '{"model": "x", "messages": [}',
        "[1, 2, 3]",
        '"just a string"',
    ],
)
def test_malformed_json_is_400(chatwire: Stack, body: str) -> None:
    error = error_of(post(chatwire, body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", "abc"),
        ("temperature", "hot"),
        ("messages", "hello"),
        ("max_tokens", 1.5),
        ("stream", "yes"),
        ("seed", 1e30),
    ],
)
def test_wrong_types_are_400_naming_the_field(chatwire: Stack, field: str, value: object) -> None:
    body: dict[str, object] = {"model": MODEL, "messages": USER, field: value}
    error = error_of(post(chatwire, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field and error["code"] == "invalid_type"
    assert field in str(error["message"])


def test_nested_wrong_type_names_the_nested_field(chatwire: Stack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": 1, "content": "y"}]}
    assert error_of(post(chatwire, body), 400)["param"] == "messages[1].role"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": USER}, "model"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ],
            },
            "messages[0].content[0]",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    USER[0],
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hear this"},
                            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                        ],
                    },
                ],
            },
            "messages[1].content[1]",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f-1"}}]}]},
            "messages[0].content[0]",
        ),
        ({"model": MODEL, "messages": USER, "temperature": 3}, "temperature"),
        ({"model": MODEL, "messages": USER, "top_p": 1.5}, "top_p"),
        ({"model": MODEL, "messages": USER, "n": 0}, "n"),
        ({"model": MODEL, "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": MODEL, "messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ({"model": MODEL, "messages": USER, "stream": True, "temperature": -1}, "temperature"),
        ({"model": MODEL, "messages": USER, "n": 16}, "n"),  # 16 x the context's room: over the budget
        ({"model": MODEL, "messages": USER, "n": 128, "max_tokens": 1000}, "n"),
    ],
)
def test_invalid_fields_name_the_param(chatwire: Stack, body: dict[str, object], param: str) -> None:
    error = error_of(post(chatwire, body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_prompt_longer_than_context_is_context_length_exceeded(chatwire: Stack) -> None:
    long_text = "hello " * 9000  # well over the 8192-token window
    error = error_of(post(chatwire, {"model": MODEL, "messages": [{"role": "user", "content": long_text}]}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"


def test_unknown_model_is_404_model_not_found(chatwire: Stack, client: openai.OpenAI) -> None:
    error = error_of(post(chatwire, {"model": "gpt-9", "messages": USER}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    stream_error = error_of(post(chatwire, {"model": "gpt-9", "messages": USER, "stream": True}), 404)
    assert stream_error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=USER)  # type: ignore[arg-type]


def test_sdk_raises_bad_request_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, temperature=5)  # type: ignore[arg-type]
    assert caught.value.param == "temperature"


@pytest.mark.parametrize("method, path", [("GET", "/v1/nothing"), ("POST", "/v2/chat/completions"), ("GET", "/")])
def test_unknown_path_is_404(chatwire: Stack, method: str, path: str) -> None:
    reply = httpx.request(method, f"http://127.0.0.1:{chatwire.ports.http}{path}", timeout=10)
    error = error_of(reply, 404)
    assert error["code"] == "unknown_url"


@pytest.fixture(scope="module")
def edge_without_service() -> Iterator[stack.Ports]:
    """An Envoy whose gRPC upstream port has nothing listening."""
    ports = stack.Ports(http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port())
    with run_envoy(ports, Path(tempfile.mkdtemp(prefix="chatwire-down-")) / "envoy.log"):
        yield ports


@pytest.mark.parametrize("stream", [False, True])
def test_service_down_is_503(edge_without_service: stack.Ports, stream: bool) -> None:
    reply = httpx.post(
        f"http://127.0.0.1:{edge_without_service.http}/v1/chat/completions",
        json={"model": MODEL, "messages": USER, "stream": stream},
        timeout=30,
    )
    error = error_of(reply, 503)
    assert error["type"] == "server_error"


def test_health_says_503_when_the_service_is_down(edge_without_service: stack.Ports) -> None:
    reply = httpx.get(f"http://127.0.0.1:{edge_without_service.http}/health", timeout=10)
    error_of(reply, 503)


def test_service_down_sdk_raises_status_error(edge_without_service: stack.Ports) -> None:
    down = openai.OpenAI(base_url=f"http://127.0.0.1:{edge_without_service.http}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        down.models.list()
    assert caught.value.status_code == 503
