"""The grammars themselves, on the model's real vocabulary, no server: what each constraint admits and refuses,
edges of every range included. Sampling tests (test_structured.py) show replies follow them; these show
exactly what they allow, so a bound that is one off or silently dropped fails here whatever the model writes."""

from __future__ import annotations

import datetime
import re
import tomllib
from collections.abc import Iterator
from typing import Any

import llama_cpp
import pytest
from llguidance import LLMatcher, LLTokenizer
from llguidance.llamacpp import lltokenizer_from_vocab

from chatwire_server import structured
from chatwire_server.domain import Constraint
from chatwire_server.edge import stack
from chatwire_server.engines.llama_cpp import resolve_model_path
from chatwire_server.errors import InvalidRequestError


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[LLTokenizer]:
    """llguidance's view of the default model's vocabulary (the vocabulary alone is loaded: milliseconds)."""
    settings = tomllib.loads(stack.DEFAULT_CONFIG.read_text())["models"][0]["settings"]
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(resolve_model_path(settings)).encode(), params)
    assert model
    try:
        yield lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(model))
    finally:
        llama_cpp.llama_model_free(model)


def admits(tokenizer: LLTokenizer, constraint: Constraint, text: str) -> bool:
    """Whether a reply of exactly `text` is allowed: every token accepted, and the grammar complete."""
    matcher = LLMatcher(tokenizer, constraint.grammar, log_level=0)
    tokens = tokenizer.tokenize_str(text)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def value_in(schema: dict[str, Any]) -> Constraint:
    """Replies `{"v": <value>}` with the value following `schema`."""
    return structured.json_constraint(
        {"type": "object", "properties": {"v": schema}, "required": ["v"], "additionalProperties": False}, "p"
    )


@pytest.mark.parametrize(
    "schema, admitted, refused",
    [
        ({"type": "integer", "minimum": 3, "maximum": 7}, ["3", "5", "7"], ["2", "8", "-3", "3.5", "03", "70"]),
        ({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 5}, ["-2", "0", "4"], ["-3", "5", "-4"]),
        ({"type": "integer", "minimum": -20, "maximum": -10}, ["-20", "-15", "-10"], ["-21", "-9", "10", "-200"]),
        ({"type": "integer", "minimum": -9007199254740991, "maximum": 9007199254740991}, ["0", "-42"], ["1.5"]),
        # A fractional multiple is written with the divisor's decimals ("1.50"): never a value that is not one.
        (
            {"type": "number", "multipleOf": 0.25, "minimum": 0, "maximum": 2},
            ["0", "0.25", "1.50", "2"],
            ["0.3", "2.25"],
        ),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, ["0.5", "0.001"], ["0", "1", "1.5", "-0.5"]),
        ({"type": "integer", "multipleOf": 5, "minimum": -10}, ["-10", "0", "25"], ["-15", "3", "12"]),
        ({"type": "string", "format": "email"}, ['"ada@example.com"'], ['"ada"', '"@example.com"']),
        ({"type": "string", "format": "ipv4"}, ['"10.0.0.255"'], ['"10.0.0"', '"256.1.1.1"']),
        ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']),
        # Days that exist: leap years by the Gregorian rule, years from 0001.
        (
            {"type": "string", "format": "date"},
            ['"2024-02-29"', '"2000-02-29"', '"0001-01-01"', '"1999-12-31"', '"2023-04-30"'],
            [
                *('"2024-13-01"', '"24-02-01"', '"2021-02-29"', '"1900-02-29"', '"0000-01-01"', '"2023-04-31"'),
                *('"2021-08-15ooa"', '"x2021-08-15"'),
            ],
        ),
        (
            {"type": "string", "format": "date-time"},
            ['"2024-02-29T10:00:00Z"', '"2000-02-29t23:59:60.5+01:00"'],
            [
                *('"2024-02-29"', '"2021-02-29T10:00:00Z"', '"1900-02-29T00:00:00Z"', '"0000-01-01T00:00:00Z"'),
                '"2024-02-29T10:00:00Zz"',
            ],
        ),
        # Draft 4's tuple `items` too.
        ({"type": "array", "items": [{"type": "string", "format": "date"}]}, ['["2000-02-29"]'], ['["2021-02-29"]']),
        # The schema's own pattern holds as well as the calendar.
        (
            {"type": "string", "format": "date", "pattern": "^20"},
            ['"2000-02-29"', '"2024-12-31"'],
            ['"1996-02-29"', '"2021-02-29"', '"20"'],
        ),
        ({"type": "string", "format": "duration"}, ['"P3DT4H"'], ['"3 days"']),
        ({"type": "string", "format": "hostname"}, ['"api.example.com"'], ['"-bad-.com"']),
        ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, ['"AB-123"'], ['"AB-12"', '"ab-123"']),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, ["[1]", "[1, 2]"], ["[]"]),
    ],
)
def test_schema_grammars_admit_exactly_the_valid_values(
    tokenizer: LLTokenizer, schema: dict[str, Any], admitted: list[str], refused: list[str]
) -> None:
    constraint = value_in(schema)
    for value in admitted:
        assert admits(tokenizer, constraint, f'{{"v": {value}}}'), value
    for value in refused:
        assert not admits(tokenizer, constraint, f'{{"v": {value}}}'), value


def test_objects_hold_only_the_named_keys_in_one_line(tokenizer: LLTokenizer) -> None:
    constraint = structured.json_constraint({"type": "object", "properties": {"a": {"type": "integer"}}}, "p")
    assert admits(tokenizer, constraint, '{"a": 1}')
    assert not admits(tokenizer, constraint, '{"a": 1, "b": 2}')  # additionalProperties closed
    assert not admits(tokenizer, constraint, '{\n  "a": 1\n}')  # no free whitespace


def test_recursive_references_are_followed(tokenizer: LLTokenizer) -> None:
    node = {
        "type": "object",
        "properties": {"k": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
        "required": ["k"],
    }
    constraint = structured.json_constraint(node, "p")
    assert admits(tokenizer, constraint, '{"k": [{"k": [{"k": []}]}]}')
    assert not admits(tokenizer, constraint, '{"k": [{"k": [1]}]}')


WEATHER = structured.Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = structured.Tool("get_time", "", {"type": "object", "properties": {"hour": {"type": "integer", "maximum": 23}}})
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
OTHER = '<tool_call>{"name": "get_time", "arguments": {"hour": 9}}</tool_call>'


def test_tool_choice_grammars(tokenizer: LLTokenizer) -> None:
    named = structured.tool_call_constraint([WEATHER, TIME], "get_weather", parallel=True)
    assert admits(tokenizer, named, CALL)
    assert not admits(tokenizer, named, f"{CALL}\n{CALL}")  # a named function is called exactly once
    assert not admits(tokenizer, named, OTHER)
    required = structured.tool_call_constraint([WEATHER, TIME], "required", parallel=True)
    assert admits(tokenizer, required, f"{CALL}\n{OTHER}")
    assert not admits(tokenizer, required, "Sunny.")
    assert not admits(tokenizer, required, OTHER.replace("9", "24"))  # arguments follow the tool's schema
    single = structured.tool_call_constraint([WEATHER, TIME], "required", parallel=False)
    assert not admits(tokenizer, single, f"{CALL}\n{OTHER}")
    auto = structured.tool_call_constraint([WEATHER, TIME], "auto", parallel=True)
    assert admits(tokenizer, auto, "It is sunny in Paris.")
    assert admits(tokenizer, auto, f"Let me check.{CALL}")
    assert not admits(tokenizer, auto, '<tool_call>{"name": "get_news"')  # once opened, a call must be valid


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}, "none"),
        ({"type": "string", "format": "phone"}, "phone"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "if": {}}, "'if' at '/'"),
        ({"type": "object", "properties": {"a": {"not": {}}}}, "'not' at '/properties/a'"),
    ],
)
def test_unenforceable_schemas_are_refused_naming_why(schema: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        structured.json_constraint(schema, "response_format.json_schema.schema")
    assert words in str(caught.value) and caught.value.param == "response_format.json_schema.schema"


def test_date_pattern_is_the_gregorian_calendar() -> None:
    """Every day of years 0000-9999 around each month's end, against Python's calendar."""
    pattern = re.compile(structured.DATE_PATTERN)
    for year in range(10000):
        for month in range(14):
            for day in (0, 1, 28, 29, 30, 31, 32):
                try:
                    real = bool(datetime.date(year, month, day))
                except ValueError:
                    real = False
                text = f"{year:04d}-{month:02d}-{day:02d}"
                assert bool(pattern.fullmatch(text)) == real, text
