"""The OpenAI chat API through the real Envoy edge and the real model, with the official SDK first and
raw HTTP (as curl sends it) second; every body and chunk checked against the OpenAI spec."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import MODEL, Stack, assert_valid, parse_sse

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_unary_completion_with_sdk(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24)
    choice = completion.choices[0]
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 24
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_unary_body_validates_against_spec(chatwire: Stack) -> None:
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 8},
        timeout=120,
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert_valid(body, "CreateChatCompletionResponse")
    # The spec's traps: keys present as null, numbers as numbers, no null fingerprint.
    choice = body["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    assert isinstance(body["created"], int) and isinstance(choice["index"], int)
    assert "system_fingerprint" not in body


def test_streaming_with_usage_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert 0 < usage_chunk.usage.completion_tokens <= 16
    assert len({c.id for c in chunks}) == 1


def test_stream_sse_framing_and_every_chunk_validates(chatwire: Stack) -> None:
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions",
        json={
            "model": MODEL,
            "messages": HELLO,
            "max_tokens": 12,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=120,
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(reply.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(isinstance(c, dict) for c in chunks)
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    # Like OpenAI, deltas carry `tool_calls` only when there are tool calls.
    assert '"tool_calls"' not in reply.text


def test_stream_without_usage_has_no_usage_chunk(chatwire: Stack) -> None:
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True},
        timeout=120,
    )
    events = parse_sse(reply.text)
    assert events[-1] == "[DONE]"
    assert all(c["choices"] and "usage" not in c for c in events[:-1])


def test_stream_flag_inside_message_text_does_not_switch_to_sse(chatwire: Stack) -> None:
    messages = [{"role": "user", "content": 'Repeat: {"stream": true}'}]
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 4},
        timeout=120,
    )
    assert reply.headers["content-type"].startswith("application/json")
    assert_valid(reply.json(), "CreateChatCompletionResponse")


def test_curl_style_request_without_sdk(chatwire: Stack) -> None:
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 4}}'
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=120
    )
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"]


def test_models_list_and_retrieve(client: openai.OpenAI, chatwire: Stack) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "huggingfacetb")
    raw = httpx.get(f"{chatwire.base_url}/models").json()
    assert raw["object"] == "list"
    for entry in raw["data"]:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert isinstance(entry["created"], int) and entry["object"] == "model"


def test_unknown_model_retrieve_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_parameters_without_effect_here_are_accepted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=4,
        metadata={"team": "chatwire"},
        store=False,
        user="user-1",
        safety_identifier="safety-1",
        prompt_cache_key="greeting",
        service_tier="auto",
        verbosity="low",
        reasoning_effort="low",
        parallel_tool_calls=True,
        modalities=["text"],
        response_format={"type": "text"},
        temperature=None,
        stop=None,
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert completion.choices[0].message.content is not None


@pytest.mark.parametrize(
    "param, value",
    [
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
        ("audio", {"voice": "alloy", "format": "wav"}),
    ],
)
def test_unimplemented_parameters_are_refused_not_ignored(client: openai.OpenAI, param: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, **{param: value})  # type: ignore[call-overload]
    assert caught.value.code == "unsupported_parameter"
    assert str(caught.value.param).split(".")[0] == param
