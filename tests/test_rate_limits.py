"""Per-key rate limits through the edge and over gRPC: 429 with Retry-After and OpenAI's x-ratelimit headers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from conftest import EDGE_REPLY_HEADERS, MODEL, NO_END_BIAS, Stack, assert_valid, run_stack

KEYS = ("sk-limit-a", "sk-limit-b")
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def limited(request: pytest.FixtureRequest) -> Iterator[Stack]:
    env = {"CHATWIRE_API_KEYS": ",".join(KEYS), "CHATWIRE_RATE_LIMIT_RPM": "3", "CHATWIRE_RATE_LIMIT_TPM": "400"}
    with run_stack(request, server_env=env) as running:
        yield running


def post(stack: Stack, key: str, **body: object) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2, **body},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_request_limit_per_key_with_headers(limited: Stack) -> None:
    replies = [post(limited, KEYS[0]) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert replies[0].headers["x-ratelimit-limit-requests"] == "3"
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0"]
    assert replies[0].headers["x-ratelimit-limit-tokens"] == "400"
    limited_reply = post(limited, KEYS[0], stream=True)
    assert limited_reply.status_code == 429
    assert_valid(limited_reply.json(), "ErrorResponse")
    error = limited_reply.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert int(limited_reply.headers["retry-after"]) >= 1
    assert limited_reply.headers["x-ratelimit-remaining-requests"] == "0"
    assert set(limited_reply.headers) <= EDGE_REPLY_HEADERS and set(replies[0].headers) <= EDGE_REPLY_HEADERS
    # Another key has its own allowance.
    assert post(limited, KEYS[1]).status_code == 200


def test_sdk_raises_rate_limit_error(limited: Stack) -> None:
    client = openai.OpenAI(base_url=limited.base_url, api_key=KEYS[0], max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"]


def test_tokens_are_reserved_by_max_tokens_and_settled_to_real_usage(limited: Stack) -> None:
    key = KEYS[1]
    # Reserved at admission: the prompt's estimate (its bytes / 4) plus max_tokens, so the remaining tokens drop
    # by more than 300 before a token is generated.
    first = post(limited, key, max_tokens=300, logit_bias=NO_END_BIAS)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 300
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100
    # Settled to its real usage (~330): what is left does not cover another 100-token reply...
    second = post(limited, key, max_tokens=100)
    assert second.status_code == 429 and second.json()["error"]["type"] == "tokens"
    assert int(second.headers["retry-after"]) >= 1
    # ...but does a 2-token one.
    assert post(limited, key, max_tokens=2).status_code == 200


def test_grpc_callers_get_resource_exhausted(limited: Stack) -> None:
    request = json_format.ParseDict(
        {"model": MODEL, "messages": HELLO, "max_tokens": 2}, pb.CreateChatCompletionRequest()
    )
    with grpc.insecure_channel(limited.grpc_target) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateChatCompletion(request, metadata=(("authorization", f"Bearer {KEYS[0]}"),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert json.loads(trailers["x-chatwire-error"])["error"]["code"] == "rate_limit_exceeded"
    assert int(trailers["retry-after"]) >= 1
