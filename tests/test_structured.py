"""Structured outputs and tool calls on the real model, through the Envoy edge with the official SDK and over
gRPC. Every guarantee is checked over many sampled replies (several seeds, `n` choices each)."""

from __future__ import annotations

import json
from typing import Any, Literal

import grpc
import httpx
import jsonschema
import openai
import pydantic
import pytest
from google.protobuf import json_format

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc
from conftest import MODEL, Stack, assert_valid, parse_sse

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON."}]

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def weather_turns(call_id: str, city: str, weather: str) -> list[dict[str, Any]]:
    """A user question, the assistant's get_weather call, the tool's answer and the assistant's reply."""
    arguments = json.dumps({"city": city, "unit": "c"})
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": weather},
        {"role": "assistant", "content": f"It is {weather.lower()} in {city}."},
    ]


# A conversation that shows the model how it called tools before, so that with `auto` it often calls again.
FEW_SHOT = [
    *weather_turns("call_1", "Rome", "Sunny"),
    *weather_turns("call_2", "Paris", "Rainy"),
    {"role": "user", "content": "Weather in Berlin?"},
]
SEEDS = (1, 2)
N = 6


def post(chatwire: Stack, **body: Any) -> dict[str, Any]:
    reply = httpx.post(f"{chatwire.base_url}/chat/completions", json={"model": MODEL, **body}, timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def stream(chatwire: Stack, **body: Any) -> list[dict[str, Any]]:
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions", json={"model": MODEL, "stream": True, **body}, timeout=300
    )
    assert reply.status_code == 200, reply.text
    events = parse_sse(reply.text)
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        assert_valid(chunk, "CreateChatCompletionStreamResponse")
    return events[:-1]


def texts_and_reasons(chatwire: Stack, streaming: bool, **body: Any) -> list[tuple[str, str]]:
    """Each choice's text and finish_reason, from a stream (deltas accumulated) or a unary reply (validated)."""
    if streaming:
        return [(c["content"], c["finish_reason"]) for c in streamed_choices(stream(chatwire, **body)).values()]
    reply = post(chatwire, **body)
    assert_valid(reply, "CreateChatCompletionResponse")
    return [(c["message"]["content"], c["finish_reason"]) for c in reply["choices"]]


def streamed_choices(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Accumulate stream deltas per choice the way OpenAI's clients do."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            state = choices.setdefault(choice["index"], {"content": "", "tool_calls": {}, "finish_reason": None})
            delta = choice["delta"]
            state["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                if "id" in call:  # the first delta of a call carries everything but the arguments
                    assert call["index"] not in state["tool_calls"]
                    assert call["type"] == "function" and call["function"]["arguments"] == ""
                    state["tool_calls"][call["index"]] = {
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "arguments": "",
                    }
                else:
                    assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                state["tool_calls"][call["index"]]["arguments"] += call["function"]["arguments"]
            state["finish_reason"] = choice["finish_reason"] or state["finish_reason"]
    return choices


# --- response_format -----------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_json_object_always_parses(chatwire: Stack, streaming: bool) -> None:
    body = {
        "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
        "n": N,
        "max_tokens": 200,
        "response_format": {"type": "json_object"},
    }
    finished = []
    for seed in SEEDS:
        for text, reason in texts_and_reasons(chatwire, streaming, seed=seed, **body):
            assert reason in ("stop", "length")
            if reason == "stop":
                assert isinstance(json.loads(text), dict)
                finished.append(text)
    assert len(finished) >= N // 2, "too few replies ended on their own to prove anything"


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_json_schema_always_validates(chatwire: Stack, streaming: bool) -> None:
    body = {"messages": ASK_PERSON, "n": N, "max_tokens": 80, "response_format": PERSON_FORMAT}
    valid = 0
    for seed in SEEDS:
        for text, reason in texts_and_reasons(chatwire, streaming, seed=seed, **body):
            if reason == "stop":
                jsonschema.validate(json.loads(text), PERSON_SCHEMA)
                valid += 1
    assert valid >= len(SEEDS) * N * 3 // 4


def test_cut_off_structured_reply_ends_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, max_tokens=3, response_format=PERSON_FORMAT
    )  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    species: Literal["cat", "dog", "fish"]
    legs: int


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    pets: list[Pet] = pydantic.Field(max_length=2)


def test_sdk_parse_returns_populated_models(client: openai.OpenAI) -> None:
    parsed = 0
    for seed in (1, 2, 3, 4):
        try:
            completion = client.chat.completions.parse(
                model=MODEL,
                messages=[{"role": "user", "content": "Describe a pet owner."}],
                response_format=Owner,
                max_tokens=300,
                seed=seed,
            )
        except openai.LengthFinishReasonError:  # the SDK refuses to parse a cut reply; that is not a failure
            continue
        assert isinstance(completion.choices[0].message.parsed, Owner)
        parsed += 1
    assert parsed >= 2


def test_sdk_stream_helper_with_response_format(client: openai.OpenAI) -> None:
    parsed = []
    for seed in (4, 5, 6):
        with client.chat.completions.stream(
            model=MODEL,
            messages=[{"role": "user", "content": "A pet, please."}],
            response_format=Pet,
            max_tokens=80,
            seed=seed,
        ) as events:
            kinds = {event.type for event in events}
            final = events.get_final_completion()
        assert "content.delta" in kinds
        if final.choices[0].finish_reason == "stop":
            parsed.append(final.choices[0].message.parsed)
    assert parsed and all(isinstance(p, Pet) for p in parsed)


# --- OpenAI's strict subset: numeric bounds, formats, references -----------------------------------------

BOUNDED = {
    "type": "object",
    "properties": {
        "small": {"type": "integer", "minimum": 3, "maximum": 7},
        "below": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 5},
        "negative": {"type": "integer", "minimum": -20, "maximum": -10},
        "step": {"type": "number", "multipleOf": 0.25, "minimum": 0, "maximum": 2},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        # What zod 4 emits for every z.number().int().
        "safe": {"type": "integer", "minimum": -9007199254740991, "maximum": 9007199254740991},
    },
    "required": ["small", "below", "negative", "step", "ratio", "safe"],
    "additionalProperties": False,
}
# Hot sampling, so that replies wander to the edges of every range.
HOT = {"temperature": 1.5, "top_p": 1.0}


# (seed, streamed): every seed both ways where replies are short, alternating where they are long.
BOTH_WAYS = [(seed, streaming) for seed in (1, 2, 3) for streaming in (False, True)]
ALTERNATING = [(1, False), (2, True), (3, False)]


def sampled_objects(
    chatwire: Stack, schema: dict[str, Any], prompt: str, runs: list[tuple[int, bool]], **body: Any
) -> list[Any]:
    """Every reply that ended with `stop`, `n` choices per (seed, streamed) run; each is validated against
    `schema`. Replies cut by `max_tokens` prove nothing and are left out."""
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": prompt}]
    objects = []
    for seed, streaming in runs:
        for text, reason in texts_and_reasons(
            chatwire, streaming, messages=messages, response_format=response_format, n=N, seed=seed, **body
        ):
            if reason == "stop":
                value = json.loads(text)
                jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
                objects.append(value)
    assert len(objects) >= len(runs) * N * 2 // 3, "too few replies ended on their own to prove anything"
    return objects


def test_numeric_bounds_hold_at_every_edge(chatwire: Stack) -> None:
    objects = sampled_objects(chatwire, BOUNDED, "Give me some numbers as JSON.", BOTH_WAYS, max_tokens=120, **HOT)
    for key, allowed in (("small", range(3, 8)), ("below", range(-2, 5)), ("negative", range(-20, -9))):
        seen = {o[key] for o in objects}
        assert seen <= set(allowed), f"{key}: {sorted(seen)}"
        assert all(isinstance(o[key], int) for o in objects)
    assert all(0 <= o["step"] <= 2 and float(o["step"] * 4).is_integer() for o in objects)
    assert all(0 < o["ratio"] < 1 for o in objects)


FORMATS = {
    "type": "object",
    "properties": {
        "email": {"type": "string", "format": "email", "maxLength": 40},
        "ipv4": {"type": "string", "format": "ipv4"},
        "uuid": {"type": "string", "format": "uuid"},
        "date": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    },
    "required": ["email", "ipv4", "uuid", "date", "code"],
    "additionalProperties": False,
}


def test_string_formats_and_patterns_hold(chatwire: Stack) -> None:
    # FormatChecker checks email, ipv4, uuid and date with the standard library alone; test_grammars.py
    # checks every format's grammar.
    objects = sampled_objects(
        chatwire, FORMATS, "Give me a contact record as JSON.", ALTERNATING, max_tokens=150, **HOT
    )
    assert all(len(o["uuid"]) == 36 for o in objects)


TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "label": {"type": "string", "enum": ["a", "b", "c"]},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1},
            },
            "required": ["label", "children"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "root": {"$ref": "#/$defs/node"},
        "size": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
    },
    "required": ["root", "size", "tags"],
    "additionalProperties": False,
}


def test_recursive_refs_anyof_and_array_bounds_hold(chatwire: Stack) -> None:
    objects = sampled_objects(chatwire, TREE, "Give me a small tree as JSON.", ALTERNATING, max_tokens=200, **HOT)
    assert all(1 <= len(o["tags"]) <= 3 for o in objects)


class Review(pydantic.BaseModel):
    stars: int = pydantic.Field(ge=1, le=5)
    score: float = pydantic.Field(gt=0, lt=10)
    votes: int = pydantic.Field(ge=-3, le=-1)
    verdict: Literal["good", "bad"]


def test_sdk_parse_round_trips_pydantic_bounds(client: openai.OpenAI) -> None:
    """The SDK sends `Field(ge=…, le=…)` as minimum/maximum (gt/lt as exclusive bounds) and validates the
    reply with pydantic, which raises on any value out of range."""
    parsed = []
    for seed in (1, 2, 3):
        completion = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Review a film."}],
            response_format=Review,
            max_tokens=100,
            n=N,
            seed=seed,
            **HOT,
        )
        parsed += [c.message.parsed for c in completion.choices]
    assert len(parsed) == 3 * N and all(isinstance(p, Review) for p in parsed)


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "object", "properties": {"age": {"type": "integer", "not": {"const": 3}}}}, "not"),
        ({"type": "object", "properties": {"mail": {"type": "string", "format": "phone"}}}, "phone"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "https://example.com/s.json"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ],
)
def test_unenforceable_schema_is_400_naming_the_feature(
    client: openai.OpenAI, schema: dict[str, Any], keyword: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK_PERSON,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},  # type: ignore[typeddict-item]
        )
    assert caught.value.param == "response_format.json_schema.schema"
    assert keyword in caught.value.message


# --- tools ---------------------------------------------------------------------------------------------


def check_calls(calls: list[dict[str, Any]], allowed: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["id"].startswith("call_")
        assert call["name"] in allowed
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def unary_calls(choice: dict[str, Any]) -> list[dict[str, Any]]:
    message = choice["message"]
    assert all(c["type"] == "function" for c in message["tool_calls"])
    return [{"id": c["id"], **c["function"]} for c in message["tool_calls"]]


@pytest.mark.parametrize(
    "tool_choice, allowed",
    [("required", {"get_weather", "get_time"}), ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})],
    ids=["required", "named"],
)
def test_forced_tool_calls_always_validate(chatwire: Stack, tool_choice: Any, allowed: set[str]) -> None:
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": tool_choice, "n": N, "max_tokens": 200}
    ids, ended = [], 0
    for seed in SEEDS:
        reply = post(chatwire, seed=seed, **body)
        assert_valid(reply, "CreateChatCompletionResponse")
        for choice in reply["choices"]:
            calls = unary_calls(choice)
            assert choice["message"]["content"] is None
            if done := completed_calls(calls, choice["finish_reason"]):
                check_calls(done, allowed)
            assert_no_repeated_call(calls)
            ended += choice["finish_reason"] == "tool_calls"
            ids += [c["id"] for c in calls]
    assert len(ids) >= len(SEEDS) * N and len(set(ids)) == len(ids)
    assert ended >= len(SEEDS) * N * 2 // 3, "replies should end after their calls, not at max_tokens"


def completed_calls(calls: list[dict[str, Any]], finish_reason: str) -> list[dict[str, Any]]:
    """The calls a choice finished: all of them, or all but the last when `max_tokens` cut the reply (several
    different calls, each allowed, can still fill it)."""
    assert finish_reason in ("tool_calls", "length")
    return calls if finish_reason == "tool_calls" else calls[:-1]


def assert_no_repeated_call(calls: list[dict[str, Any]]) -> None:
    assert len({(c["name"], c["arguments"]) for c in calls}) == len(calls), "a repeated call ends the reply"


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "stream"])
def test_named_tool_choice_makes_exactly_one_call(chatwire: Stack, streaming: bool) -> None:
    """A named function means one call to it, however eagerly the model would call it again."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": named, "n": N, "max_tokens": 200, **HOT}
    for seed in SEEDS:
        if streaming:
            choices = [
                (list(s["tool_calls"].values()), s["finish_reason"])
                for s in streamed_choices(stream(chatwire, seed=seed, **body)).values()
            ]
        else:
            choices = [(unary_calls(c), c["finish_reason"]) for c in post(chatwire, seed=seed, **body)["choices"]]
        for calls, reason in choices:
            assert reason == "tool_calls" and len(calls) == 1
            check_calls(calls, {"get_weather"})


def test_a_repeated_call_ends_the_reply(chatwire: Stack) -> None:
    """Greedy decoding makes this model write the same call until max_tokens; the reply ends at the repeat."""
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 300, "temperature": 0}
    for streaming in (False, True):
        if streaming:
            state = streamed_choices(stream(chatwire, **body))[0]
            calls, reason = list(state["tool_calls"].values()), state["finish_reason"]
        else:
            choice = post(chatwire, **body)["choices"][0]
            calls, reason = unary_calls(choice), choice["finish_reason"]
        assert reason == "tool_calls"
        check_calls(calls, set(SCHEMAS))
        assert_no_repeated_call(calls)


def test_forced_tool_calls_stream_like_openai(chatwire: Stack) -> None:
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required", "n": N, "max_tokens": 200}
    checked = 0
    for seed in SEEDS:
        for state in streamed_choices(stream(chatwire, seed=seed, **body)).values():
            assert state["content"] == "" and state["tool_calls"]
            calls = list(state["tool_calls"].values())
            if done := completed_calls(calls, state["finish_reason"]):
                check_calls(done, set(SCHEMAS))
            assert_no_repeated_call(calls)
            checked += len(done)
    assert checked >= len(SEEDS) * N


def test_stream_and_unary_rebuild_the_same_calls(chatwire: Stack) -> None:
    body = {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required", "max_tokens": 120, "temperature": 0}
    unary = [{k: c[k] for k in ("name", "arguments")} for c in unary_calls(post(chatwire, **body)["choices"][0])]
    streamed = [
        {k: c[k] for k in ("name", "arguments")}
        for c in streamed_choices(stream(chatwire, **body))[0]["tool_calls"].values()
    ]
    assert streamed == unary and unary


def test_parallel_tool_calls_false_makes_one_call(chatwire: Stack) -> None:
    body = {
        "messages": ASK_WEATHER,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "n": N,
        "max_tokens": 120,
        "seed": 9,
    }
    for choice in post(chatwire, **body)["choices"]:
        if choice["finish_reason"] == "tool_calls":
            assert len(choice["message"]["tool_calls"]) == 1


def test_auto_answers_in_text_or_valid_calls(chatwire: Stack) -> None:
    body = {"messages": FEW_SHOT, "tools": TOOLS, "tool_choice": "auto", "n": N, "max_tokens": 120}
    called = texts = 0
    for seed in SEEDS:
        for choice in post(chatwire, seed=seed, **body)["choices"]:
            if choice["message"]["tool_calls"] and choice["finish_reason"] == "tool_calls":
                check_calls(unary_calls(choice), set(SCHEMAS))
                called += 1
            elif not choice["message"]["tool_calls"]:
                assert "<tool_call>" not in (choice["message"]["content"] or "")
                texts += choice["finish_reason"] == "stop"
    assert called >= 2, "the few-shot conversation should lead the model to call a tool"


def test_sdk_stream_helper_rebuilds_tool_calls(client: openai.OpenAI) -> None:
    class GetWeather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=30)
        unit: Literal["c", "f"]

    with client.chat.completions.stream(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[openai.pydantic_function_tool(GetWeather)],  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        seed=2,
    ) as events:
        done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
        final = events.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls" and calls
    assert isinstance(calls[0].function.parsed_arguments, GetWeather)
    assert [d.arguments for d in done] == [c.function.arguments for c in calls]


def test_tool_round_trip_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        seed=1,  # type: ignore[arg-type]
    )
    calls = first.choices[0].message.tool_calls or []
    assert calls
    follow_up = [
        *ASK_WEATHER,
        first.choices[0].message.model_dump(exclude_none=True),
        *({"role": "tool", "tool_call_id": c.id, "content": "Sunny, 21 degrees"} for c in calls),
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=follow_up, tools=TOOLS, tool_choice="none", max_tokens=30
    )  # type: ignore[arg-type]
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_tool_message_with_unknown_call_id_is_400(client: openai.OpenAI) -> None:
    messages = [*FEW_SHOT[:2], {"role": "tool", "tool_call_id": "call_nope", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)  # type: ignore[arg-type]
    assert caught.value.param == "messages[2].tool_call_id"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "c"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_requests_are_400(chatwire: Stack, extra: dict[str, Any], param: str) -> None:
    reply = httpx.post(
        f"{chatwire.base_url}/chat/completions", json={"model": MODEL, "messages": ASK_WEATHER, **extra}, timeout=60
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


# --- gRPC ----------------------------------------------------------------------------------------------


def grpc_request(**fields: Any) -> pb.CreateChatCompletionRequest:
    return json_format.ParseDict({"model": MODEL, **fields}, pb.CreateChatCompletionRequest())


def test_tool_calls_over_grpc(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    request = grpc_request(messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", n=4, max_tokens=120, seed=3)
    reply = grpc_stub.CreateChatCompletion(request, timeout=300)
    for choice in reply.choices:
        if choice.finish_reason == "tool_calls":
            calls = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in choice.message.tool_calls
            ]
            check_calls(calls, set(SCHEMAS))
            assert choice.message.content.WhichOneof("kind") == "null_value"
    chunks = list(grpc_stub.StreamChatCompletion(request, timeout=300))
    starts = [c for chunk in chunks for ch in chunk.choices for c in ch.delta.tool_calls if c.HasField("id")]
    assert starts and all(s.type == "function" and s.function.name in SCHEMAS for s in starts)


def test_json_schema_over_grpc(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    reply = grpc_stub.CreateChatCompletion(
        grpc_request(messages=ASK_PERSON, response_format=PERSON_FORMAT, n=4, max_tokens=80, seed=5), timeout=300
    )
    assert any(c.finish_reason == "stop" for c in reply.choices)
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content.string_value), PERSON_SCHEMA)
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.CreateChatCompletion(
            grpc_request(
                messages=ASK_PERSON,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
            ),
            timeout=30,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
