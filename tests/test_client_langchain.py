"""LangChain's ChatOpenAI (langchain-openai) against the real stack: the requests a LangChain app sends, through
the real Envoy edge to the real model, and what LangChain makes of the replies."""

from __future__ import annotations

import functools
import operator
from typing import Any, Literal

import pydantic
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from conftest import MODEL, Stack

pytestmark = pytest.mark.clients

ASK_WEATHER = "What is the weather in Paris?"


def chat(chatwire: Stack, **settings: Any) -> ChatOpenAI:
    return ChatOpenAI(base_url=chatwire.base_url, api_key="unused", model=MODEL, max_retries=0, timeout=120, **settings)


class WeatherArgs(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30, description="The city")
    unit: Literal["c", "f"]


class TimeArgs(pydantic.BaseModel):
    timezone: str = pydantic.Field(max_length=30, description="An IANA timezone")


@tool(args_schema=WeatherArgs)
def get_weather(city: str, unit: str) -> str:
    """The current weather in a city."""
    return f"Sunny, 21 degrees {unit.upper()} in {city}"


@tool(args_schema=TimeArgs)
def get_time(timezone: str) -> str:
    """The current time in a timezone."""
    return f"12:00 in {timezone}"


ARGS = {"get_weather": WeatherArgs, "get_time": TimeArgs}


def check_tool_calls(reply: AIMessage, allowed: set[str]) -> None:
    """Every call names an allowed tool with arguments that satisfy its schema; none is malformed."""
    assert reply.tool_calls, f"no tool call: {reply!r}"
    assert not reply.invalid_tool_calls, reply.invalid_tool_calls
    for call in reply.tool_calls:
        assert call["name"] in allowed, call
        assert call["id"] and call["id"].startswith("call_"), call
        ARGS[call["name"]].model_validate(call["args"])
    assert len({call["id"] for call in reply.tool_calls}) == len(reply.tool_calls)


def test_invoke_returns_text_and_usage(chatwire: Stack) -> None:
    reply = chat(chatwire, max_tokens=24).invoke("Say hello in one short sentence.")
    assert isinstance(reply, AIMessage)
    assert isinstance(reply.content, str) and reply.content.strip()
    assert not reply.tool_calls
    assert reply.response_metadata["id"].startswith("chatcmpl-")
    assert reply.response_metadata["model_name"] == MODEL
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    usage = reply.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 24
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_stream_concatenates_and_ends_with_usage(chatwire: Stack) -> None:
    chunks = list(chat(chatwire, max_tokens=16, stream_usage=True).stream("Count to five."))
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert len(chunks) > 2, "a 16-token reply should arrive in several chunks"
    text = "".join(chunk.text for chunk in chunks)
    assert text.strip()
    message = functools.reduce(operator.add, chunks)
    assert message.text == text
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.response_metadata["model_name"] == MODEL
    with_usage = [i for i, chunk in enumerate(chunks) if chunk.usage_metadata]
    assert len(with_usage) == 1 and not "".join(chunk.text for chunk in chunks[with_usage[0] :]), "usage comes last"
    usage = message.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0 and 0 < usage["output_tokens"] <= 16
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


class Basket(pydantic.BaseModel):
    fruit: Literal["apple", "pear", "plum"]
    count: int = pydantic.Field(ge=1, le=5)
    label: str = pydantic.Field(max_length=20)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_structured_output_json_schema_keeps_bounds(chatwire: Stack, seed: int) -> None:
    # temperature 1 samples freely: only the server's constrained decoding keeps `count` within 1..5.
    structured = chat(chatwire, max_tokens=80, temperature=1, seed=seed).with_structured_output(
        Basket, method="json_schema", include_raw=True
    )
    result = structured.invoke("Describe a basket of fruit.")
    assert result["parsing_error"] is None, result["parsing_error"]
    basket = result["parsed"]
    assert isinstance(basket, Basket)
    assert 1 <= basket.count <= 5 and len(basket.label) <= 20
    assert result["raw"].response_metadata["finish_reason"] == "stop"


def test_named_tool_choice_makes_exactly_one_call(chatwire: Stack) -> None:
    for seed in (1, 2):
        bound = chat(chatwire, max_tokens=120, seed=seed).bind_tools([get_weather, get_time], tool_choice="get_weather")
        reply = bound.invoke(ASK_WEATHER)
        check_tool_calls(reply, {"get_weather"})
        assert len(reply.tool_calls) == 1, f"seed {seed}: {reply.tool_calls}"


@pytest.mark.parametrize("tool_choice", ["required", "any"])
def test_required_tool_choice_calls_known_tools(chatwire: Stack, tool_choice: str) -> None:
    bound = chat(chatwire, max_tokens=200, seed=1).bind_tools([get_weather, get_time], tool_choice=tool_choice)
    reply = bound.invoke(ASK_WEATHER)
    check_tool_calls(reply, {"get_weather", "get_time"})
    assert reply.response_metadata["finish_reason"] == "tool_calls"


def test_tool_round_trip_ends_in_text(chatwire: Stack) -> None:
    question = HumanMessage(ASK_WEATHER)
    first = chat(chatwire, max_tokens=120, seed=1).bind_tools([get_weather], tool_choice="required").invoke([question])
    check_tool_calls(first, {"get_weather"})
    results = [get_weather.invoke(call) for call in first.tool_calls]  # a ToolCall in, a ToolMessage out
    assert all(isinstance(result, ToolMessage) for result in results)
    conversation = [question, first, *results]
    answer = chat(chatwire, max_tokens=30, seed=1).bind_tools([get_weather], tool_choice="none").invoke(conversation)
    assert not answer.tool_calls and not answer.invalid_tool_calls
    assert isinstance(answer.content, str) and answer.content.strip() and "<tool_call>" not in answer.content
    # With `auto` the model may answer or call again; either way the reply is well formed.
    again = chat(chatwire, max_tokens=60, seed=1).bind_tools([get_weather], tool_choice="auto").invoke(conversation)
    if again.tool_calls and again.response_metadata["finish_reason"] == "tool_calls":
        check_tool_calls(again, {"get_weather"})
    elif again.response_metadata["finish_reason"] == "stop":
        assert isinstance(again.content, str) and again.content.strip() and "<tool_call>" not in again.content


def test_batch_answers_every_prompt(chatwire: Stack) -> None:
    prompts = ["Name a colour.", "Name a fruit.", "Name an animal."]
    replies = chat(chatwire, max_tokens=12).batch(prompts, config={"max_concurrency": 3})
    assert len(replies) == 3
    for reply in replies:
        assert isinstance(reply, AIMessage) and isinstance(reply.content, str) and reply.content.strip()
        assert reply.usage_metadata and reply.usage_metadata["output_tokens"] > 0
    assert len({reply.response_metadata["id"] for reply in replies}) == 3
