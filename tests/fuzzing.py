"""The fuzzer's parts, shared by tests/test_fuzz.py and tests/test_soak.py: case families (hypothesis
strategies that produce requests), the checks every reply must pass, the run-level watch (engine restarts, a
canary, health, running sequences) and the results that reliability/report.py renders into RELIABILITY.md.

Families:
- `fields`: valid requests mutated field by field, every property of OpenAI's CreateChatCompletionRequest
  (from tests/spec) plus chatwire's extensions and nested fields: wrong JSON types, out-of-range numbers, huge,
  unicode and NUL strings, nulls, deep nesting, huge arrays.
- `schemas`: `response_format` json_schema and tool `parameters` that are random or hostile.
- `raw`: bytes on a socket: invalid JSON, odd content types, methods, paths, query strings, headers,
  `grpc-timeout`, truncated bodies.
- `reuse`: `raw` requests framed right, on a connection kept open and followed on it by `GET /v1/models`: any
  framing error of a reply (a body on HEAD, a wrong length) shows up as the follow-up's reply failing to parse.
- `grpc-bytes`: random bytes as the request message of every ChatService RPC.
- `grpc-messages`: valid protobuf messages whose fields hold hostile values.
- `fixed`: one request per hostile reproduction known to matter (FIXED_HTTP_CASES, FIXED_GRPC_CASES).
- `faults`: clients that go away mid-request or mid-stream, and short gRPC deadlines.

Whatever may generate keeps max_tokens/max_completion_tokens at most 8 and `n` at most 4 (one fixed case asks
for n = 128 with one token), so a run's time goes to the edge cases, not to the model.
"""

from __future__ import annotations

import datetime
import decimal
import heapq
import itertools
import json
import math
import os
import re
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, Phase, reject, settings
from hypothesis import strategies as st

import http1
from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import models_pb2
from conftest import EDGE_REPLY_HEADERS, MODEL, SPEC, Stack, assert_valid, engine_workers, metric, parse_sse

# ---------------------------------------------------------------------------------------------------------------
# Settings (from the environment: `make test` runs the defaults, `make fuzz` the big counts)

HTTP_CASES = int(os.environ.get("CHATWIRE_FUZZ_HTTP_CASES", "150"))
GRPC_CASES = int(os.environ.get("CHATWIRE_FUZZ_GRPC_CASES", "50"))
# `make test` draws the same sample every time (reproducible CI); `make fuzz` draws fresh cases.
RANDOM = os.environ.get("CHATWIRE_FUZZ_RANDOM", "") == "1"
# No request may take longer than its bound: this, plus time for the prompt it carries. A prompt that fits the
# context is legitimate work (a tool's schema is shown to the model whole), and prefill on 2 cores runs at about
# 150-250 tokens/s, a token being 3-4 bytes: 5 ms per byte of request covers it (8,192 tokens: about 2 minutes).
TIME_BOUND_S = float(os.environ.get("CHATWIRE_FUZZ_TIME_BOUND_S", "30"))
TIME_PER_BYTE_S = 0.005


def time_bound_s(size: int) -> float:
    """The time bound of a request of `size` bytes."""
    return TIME_BOUND_S + size * TIME_PER_BYTE_S


CANARY_EVERY_S = 2.0
CANARY_BOUND_S = 30.0
# The only 5xx a client may see: docs/design.md's 503 while the engine worker restarts.
ALLOWED_503_CODES = frozenset({"engine_restarting"})
# gRPC codes that blame the caller (or ask it to back off): anything else but OK is a server fault.
GRPC_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
MAX_GEN_TOKENS = 8
MAX_N = 4
SERVICE = "/chatwire.v1.ChatService/"
RPCS = {  # method -> (streaming, response type)
    "CreateChatCompletion": (False, pb.CreateChatCompletionResponse),
    "StreamChatCompletion": (True, pb.CreateChatCompletionStreamResponse),
    "ListModels": (False, models_pb2.ListModelsResponse),
    "GetModel": (False, models_pb2.Model),
}
USER = [{"role": "user", "content": "Hi"}]


def hypothesis_settings(max_examples: int) -> settings:
    """Settings for one family: no deadline (the time bound is ours), no example database, derandomized
    unless CHATWIRE_FUZZ_RANDOM=1, no shrinking (cases record their violations instead of raising)."""
    return settings(
        max_examples=max(1, max_examples),
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate),
        print_blob=False,
    )


# ---------------------------------------------------------------------------------------------------------------
# JSON that json.dumps cannot write, and short descriptions of huge values


@dataclass(frozen=True)
class Raw:
    """A JSON fragment sent as is: deep nesting, NaN, 1e999, lone surrogates, duplicate keys."""

    text: str


_RAW_TOKEN = "\ue000raw{}\ue000"
_RAW_PLACEHOLDER = re.compile('"\ue000raw([0-9]+)\ue000"')


def encode(body: Any) -> bytes:
    """`body` as JSON (UTF-8, non-ASCII unescaped), with every Raw fragment spliced in."""
    raws: list[str] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return _RAW_TOKEN.format(len(raws) - 1)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    text = json.dumps(walk(body), ensure_ascii=False, allow_nan=True)
    # One pass: a hostile value can hold thousands of fragments, and a replace() per fragment over the whole text
    # once took a `make fuzz` run minutes for a single case.
    text = _RAW_PLACEHOLDER.sub(lambda m: raws[int(m.group(1))], text)
    return text.encode("utf-8", "surrogatepass")


def describe(value: Any, limit: int = 60) -> str:
    """A short, readable stand-in for a value that may be megabytes long."""
    if isinstance(value, Raw):
        return f"raw({value.text[:24]!r}{'…' if len(value.text) > 24 else ''}, {len(value.text)} chars)"
    if isinstance(value, str):
        if len(value) <= 24:
            return repr(value)
        return f"str({len(value)} chars, {value[:12]!r}…)"
    if isinstance(value, bytes):
        return f"bytes({len(value)}, {value[:12]!r}…)" if len(value) > 16 else repr(value)
    if isinstance(value, list):
        if len(value) > 4:
            return f"list({len(value)} x {describe(value[0], 30)})"
        text = "[" + ", ".join(describe(v, 30) for v in value) + "]"
    elif isinstance(value, dict):
        if len(value) > 4:
            first = next(iter(value))
            return f"dict({len(value)} keys, {describe(first, 20)}: {describe(value[first], 20)}, …)"
        text = "{" + ", ".join(f"{describe(k, 20)}: {describe(v, 30)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(data: bytes | str, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def _number(value: Any) -> float | None:
    """What a JSON value becomes as a protobuf number (the transcoder also parses numeric strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = value.text if isinstance(value, Raw) else value if isinstance(value, str) else None
    if text is None:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return None


def bound_generation(body: dict[str, Any]) -> None:
    """Keep whatever a request could generate small: max tokens at most 8 (values the server must refuse, above
    any context, stay), `n` at most 4, and a limit always present."""
    for key in ("max_tokens", "max_completion_tokens"):
        n = _number(body.get(key))
        if n is not None and not math.isnan(n) and MAX_GEN_TOKENS < n <= 1_000_000:
            body[key] = MAX_GEN_TOKENS
    n = _number(body.get("n"))
    if n is not None and not math.isnan(n) and MAX_N < n <= 1_000:
        body["n"] = MAX_N
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens" if "max_completion_tokens" not in body else "max_tokens"] = 4


# ---------------------------------------------------------------------------------------------------------------
# Hostile values

EDGE_INTS = [
    0, -1, 1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30,
]  # fmt: skip
EDGE_NUMBERS = [
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"), Raw("-1e999"), Raw("-0"), Raw("1E400"),
    Raw("0.0000000000000000000000000000001"), Raw("123456789012345678901234567890"), 1e308, -1e308, 5e-324, 0.5, -0.0,
]  # fmt: skip
ODD_STRINGS = [
    "", " ", "\x00", "a\x00b", "\u202eevil", "\ufeff", "\uffff", "\U0001f600" * 3, "e\u0301" * 5, "\u200b",
    "null", "true", "1e400", "-0", "0x10", "NaN", "Infinity", "99999999999999999999", "\\u0000", "%s%n%x",
    "../../etc/passwd", "<script>", "{\"a\":", "\r\n\r\nHTTP/1.1 200 OK", "smollm2-135m-instruct\x00",
    "SMOLLM2-135M-INSTRUCT", " smollm2-135m-instruct", "\u00b2", "\u2460", "--1",
]  # fmt: skip
# JSON escapes Python cannot hold in a str: lone surrogates, escaped NUL.
RAW_STRINGS = [Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'), Raw('"a\\u0000b"'), Raw('"\\uDEAD"')]
HUGE_SIZES = [1_000, 4_096, 16_384, 65_536, 262_144]

short_text = st.text(max_size=12)
huge_strings = st.builds(
    lambda chunk, size: (chunk * (size // max(1, len(chunk)) + 1))[:size],
    st.sampled_from(["a", "word ", "\u00e9", "\U0001f600", "\x00", "\u4e2d\u6587", "<|im_start|>", "\ufffd"]),
    st.sampled_from(HUGE_SIZES),
)
hostile_strings = st.one_of(
    st.text(max_size=40),
    st.sampled_from(ODD_STRINGS),
    st.sampled_from(RAW_STRINGS),
    huge_strings,
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=200),
)
key_strings = st.one_of(short_text, st.sampled_from(ODD_STRINGS), huge_strings)
edge_ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**70), 2**70))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    edge_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(EDGE_NUMBERS),
    hostile_strings,
)


def deep(depth: int, kind: str) -> Raw:
    """`depth` levels of nested arrays or objects, written by hand (json.dumps would hit the recursion limit)."""
    if kind == "list":
        return Raw("[" * depth + "1" + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


deep_values = st.builds(deep, st.sampled_from([21, 64, 100, 101, 1_000, 10_000]), st.sampled_from(["list", "dict"]))
huge_arrays = st.builds(
    lambda item, n: [item] * n, st.sampled_from([0, 1, "a", None, {}, []]), st.sampled_from([1_000, 10_000, 100_000])
)
duplicate_keys = st.builds(lambda k: Raw(f'{{"{k}": 1, "{k}": "x", "{k}": null}}'), st.sampled_from(["a", "type"]))
hostile_values = st.recursive(
    st.one_of(scalars, deep_values, huge_arrays, duplicate_keys),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(key_strings, children, max_size=4)),
    max_leaves=8,
)

# ---------------------------------------------------------------------------------------------------------------
# OpenAI's request properties, from tests/spec: names, JSON types, bounds, enums


@dataclass
class FieldSpec:
    types: set[str] = field(default_factory=lambda: set(ALL_TYPES))
    minimum: float | None = None
    maximum: float | None = None
    enum: list[Any] = field(default_factory=list)


ALL_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
DEFS = SPEC["definitions"]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = DEFS[node["$ref"].split("/")[-1]]
    return node


def _spec_of(node: dict[str, Any]) -> FieldSpec:
    node = _resolve(node)
    spec = FieldSpec(types=set(), minimum=node.get("minimum"), maximum=node.get("maximum"), enum=node.get("enum", []))
    kinds = node.get("type")
    if isinstance(kinds, str):
        spec.types.add(kinds)
    elif isinstance(kinds, list):
        spec.types.update(kinds)
    for key in ("anyOf", "oneOf", "allOf"):
        for option in node.get(key, []):
            sub = _spec_of(option)
            spec.types |= sub.types
            spec.enum += sub.enum
            spec.minimum = spec.minimum if spec.minimum is not None else sub.minimum
            spec.maximum = spec.maximum if spec.maximum is not None else sub.maximum
    if node.get("nullable"):
        spec.types.add("null")
    if not spec.types:
        spec.types = {"string"} if spec.enum else set(ALL_TYPES)
    if "number" in spec.types:
        spec.types.add("integer")
    return spec


def _properties(node: dict[str, Any]) -> dict[str, Any]:
    node = _resolve(node)
    found: dict[str, Any] = {}
    for part in node.get("allOf", []):
        found.update(_properties(part))
    found.update(node.get("properties", {}))
    return found


REQUEST_FIELDS: dict[str, FieldSpec] = {
    name: _spec_of(schema) for name, schema in _properties(DEFS["CreateChatCompletionRequest"]).items()
}
# chatwire's extensions (fields of the proto that OpenAI lacks).
REQUEST_FIELDS["top_k"] = FieldSpec({"integer"}, 0, None)
REQUEST_FIELDS["min_p"] = FieldSpec({"number", "integer"}, 0, 1)
REQUEST_FIELDS["repetition_penalty"] = FieldSpec({"number", "integer"}, 0, None)
# Nested fields, mutated inside a base request that has them.
NESTED_FIELDS: dict[str, FieldSpec] = {
    "messages.0": FieldSpec({"object"}),
    "messages.0.role": FieldSpec({"string"}, enum=["user", "system", "assistant", "developer", "tool", "function"]),
    "messages.0.content": FieldSpec({"string", "array", "null"}),
    "messages.0.name": FieldSpec({"string"}),
    "messages.0.content.0": FieldSpec({"object"}),
    "messages.0.content.0.type": FieldSpec({"string"}, enum=["text", "image_url", "input_audio", "file", "refusal"]),
    "messages.0.content.0.text": FieldSpec({"string"}),
    "messages.0.content.0.image_url": FieldSpec({"object"}),
    "messages.1.tool_calls": FieldSpec({"array"}),
    "messages.1.tool_calls.0.id": FieldSpec({"string"}),
    "messages.1.tool_calls.0.function.name": FieldSpec({"string"}),
    "messages.1.tool_calls.0.function.arguments": FieldSpec({"string"}),
    "messages.2.tool_call_id": FieldSpec({"string"}),
    "stream_options.include_usage": FieldSpec({"boolean", "null"}),
    "response_format.type": FieldSpec({"string"}, enum=["text", "json_object", "json_schema"]),
    "response_format.json_schema": FieldSpec({"object"}),
    "response_format.json_schema.name": FieldSpec({"string"}),
    "response_format.json_schema.schema": FieldSpec({"object"}),
    "response_format.json_schema.strict": FieldSpec({"boolean", "null"}),
    "tools.0": FieldSpec({"object"}),
    "tools.0.type": FieldSpec({"string"}, enum=["function", "custom"]),
    "tools.0.function.name": FieldSpec({"string"}),
    "tools.0.function.parameters": FieldSpec({"object"}),
    "tools.0.function.strict": FieldSpec({"boolean", "null"}),
    "tool_choice.function.name": FieldSpec({"string"}),
    "logit_bias.1": FieldSpec({"integer"}, -100, 100),
}
UNKNOWN_FIELDS = ["foo", "", "\x00", "Model", "MESSAGES", "stream ", "max-tokens", "@type", "__proto__", "x" * 5000]


def _of_type(kind: str) -> st.SearchStrategy[Any]:
    return {
        "null": st.none(),
        "boolean": st.booleans(),
        "integer": st.integers(-5, 300),
        "number": st.floats(-5, 5, allow_nan=False).filter(lambda x: x != int(x)),
        "string": short_text,
        "array": st.lists(short_text, max_size=3),
        "object": st.dictionaries(short_text, short_text, max_size=3),
    }[kind]


def values_for(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """Values for a field: wrong types, out-of-range numbers, hostile strings, nulls, nesting, huge arrays, and
    some right ones."""
    wrong = [k for k in ALL_TYPES if k not in spec.types]
    options: list[st.SearchStrategy[Any]] = [
        st.one_of([_of_type(k) for k in wrong]) if wrong else st.none(),
        st.none(),
        hostile_strings,
        hostile_values,
        deep_values,
        huge_arrays,
        st.one_of([_of_type(k) for k in spec.types]),
    ]
    if spec.enum:
        options.append(st.sampled_from([e for e in spec.enum if e is not None] or [None]))
    if spec.types & {"integer", "number"}:
        # In range, edges included: the sampler's own corner cases (temperature 0, top_p 0, min_p 1, top_k 0, …).
        low = spec.minimum if spec.minimum is not None else 0
        high = spec.maximum if spec.maximum is not None else low + 3
        in_range = st.integers(math.ceil(low), math.floor(high)) | st.sampled_from([low, high])
        options.append(in_range if "number" not in spec.types else in_range | st.floats(low, high))
        edges: list[Any] = [*EDGE_INTS, *EDGE_NUMBERS]
        for bound in (spec.minimum, spec.maximum):
            if bound is not None:
                edges += [bound, bound - 1, bound + 1, bound - 1e-9, bound + 1e-9, bound * 1000 or 1000]
        options.append(st.sampled_from(edges))
        options.append(st.sampled_from([str(e) for e in EDGE_INTS]))
    return st.one_of(options)


# ---------------------------------------------------------------------------------------------------------------
# Cases


@dataclass
class HttpCase:
    """One HTTP request. JSON families fill `body` (a dict, Raw or None); `raw` sends exact bytes instead."""

    family: str
    description: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/v1/chat/completions"
    raw: bytes | None = None  # the whole request, written to a socket as is

    @property
    def expect_stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True


@dataclass
class GrpcCase:
    """One RPC with `payload` as the serialized request message."""

    family: str
    description: str
    method: str
    payload: bytes


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
]


@st.composite
def base_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request that generates a few tokens, in one of several shapes."""
    shape = draw(st.sampled_from(["text", "parts", "system", "tools", "json_schema", "json_object"]))
    body: dict[str, Any] = {"model": MODEL, "max_tokens": draw(st.integers(1, MAX_GEN_TOKENS))}
    if shape == "parts":
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    elif shape == "system":
        body["messages"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    elif shape == "tools":
        body["messages"] = json.loads(json.dumps(TOOL_CONVERSATION))
        body["tools"] = [json.loads(json.dumps(WEATHER_TOOL))]
        body["tool_choice"] = draw(
            st.sampled_from(["auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}])
        )
    else:
        body["messages"] = [{"role": "user", "content": "Say hi."}]
    if shape == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        }
    elif shape == "json_object":
        body["response_format"] = {"type": "json_object"}
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    if draw(st.booleans()):
        body["temperature"] = draw(st.floats(0, 2))
        body["seed"] = draw(st.integers(0, 2**31))
    return body


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path (numbers index lists), making containers on the way where needed."""
    keys: list[str | int] = [int(k) if k.isdigit() else k for k in path.split(".")]
    node: Any = body
    for key, following in itertools.pairwise(keys):
        fresh: Any = [] if isinstance(following, int) else {}
        if isinstance(key, int):
            if not isinstance(node, list):
                raise TypeError(path)
            while len(node) <= key:
                node.append({})
            if not isinstance(node[key], list | dict) or isinstance(node[key], list) != isinstance(fresh, list):
                node[key] = fresh
        else:
            if not isinstance(node.get(key), list | dict) or isinstance(node[key], list) != isinstance(fresh, list):
                node[key] = fresh
        node = node[key]
    last = keys[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append({})
    node[last] = value


@st.composite
def field_cases(draw: st.DrawFn) -> HttpCase:
    """Family `fields`: a valid request with one to three fields mutated."""
    body = draw(base_requests())
    targets = [*REQUEST_FIELDS, *NESTED_FIELDS, "<unknown>"]
    notes = []
    for path in draw(st.lists(st.sampled_from(targets), min_size=1, max_size=3, unique=True)):
        if path == "<unknown>":
            key = draw(st.sampled_from(UNKNOWN_FIELDS))
            value = draw(hostile_values)
            body[key] = value
            notes.append(f"{describe(key, 20)}={describe(value)}")
            continue
        spec = REQUEST_FIELDS.get(path) or NESTED_FIELDS[path]
        if "." not in path and path in body and draw(st.integers(0, 9)) == 0:
            del body[path]
            notes.append(f"-{path}")
            continue
        value = draw(values_for(spec))
        set_path(body, path, value)
        notes.append(f"{path}={describe(value)}")
    bound_generation(body)
    mode = "stream" if body.get("stream") is True else "unary"
    return HttpCase("fields", f"{mode}: " + "; ".join(notes), body)


# --- schemas -------------------------------------------------------------------------------------------------

REGEXES = [
    "^a{1,100000}$", "^((a{1,100}){1,100}){1,100}$", "^(a+)+$", "(a|a)*b", "^[a-z]{0,4294967295}$", "(", "[z-a]",
    "\\", "^\\p{L}+$", "(?<n>a)\\k<n>", "a{2,1}", ".*" * 50, "^(?:(?:a{1,1000}){1,1000})$", "^$", "\x00", "[^]",
    "^\\d{4}-\\d{2}-\\d{2}$", "^(a{0,10}){0,10}b{1000}$",
]  # fmt: skip
FORMATS = ["date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri", "regex", "x"]


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# Hostile schemas, each sent once as a fixed case (as response_format and as tool parameters) and drawn at random.
HOSTILE_SCHEMAS: dict[str, Any] = {
    "empty enum": {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]},
    "empty enum at the root": {"enum": []},
    "huge maxItems": {
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "integer"}, "maxItems": 2**31 - 1}},
        "required": ["a"],
    },
    "huge minItems": {"type": "object", "properties": {"a": {"type": "array", "minItems": 100_000}}, "required": ["a"]},
    "huge maxLength": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}},
    "huge minLength": {
        "type": "object",
        "properties": {"a": {"type": "string", "minLength": 10**6}},
        "required": ["a"],
    },
    "pattern ^a{1,100000}$": {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": "^a{1,100000}$"}},
        "required": ["a"],
    },
    "pattern ^((a{1,100}){1,100}){1,100}$": {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": "^((a{1,100}){1,100}){1,100}$"}},
        "required": ["a"],
    },
    "property named NUL": {"type": "object", "properties": {"\x00": {"type": "string"}}, "required": ["\x00"]},
    "properties: null": {"type": "object", "properties": None},
    "anyOf: 5": {"anyOf": 5},
    "$defs: []": {"type": "object", "$defs": []},
    "nesting 25 levels": nested_schema(25),
    "nesting 200 levels": nested_schema(200),
    "enum of 100k strings": {
        "type": "object",
        "properties": {"a": {"enum": [f"value-{i}" for i in range(100_000)]}},
        "required": ["a"],
    },
    "required self-reference": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    "$ref to nothing": {"$ref": "#/$defs/missing"},
    "remote $ref": {"$ref": "http://127.0.0.1:1/schema.json"},
    "minimum above maximum": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}},
    "multipleOf 0": {"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0}}, "required": ["a"]},
    "multipleOf 1e-300": {"type": "object", "properties": {"a": {"type": "number", "multipleOf": 1e-300}}},
    "integer bounds 2^70": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 2**70}}},
    "type: 5": {"type": 5},
    "type: []": {"type": []},
    "invalid pattern": {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}},
    "1000 required names": {"type": "object", "required": [f"k{i}" for i in range(1000)]},
    "5000 properties": {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(5000)}},
    "anyOf of 1000": {"anyOf": [{"const": i} for i in range(1000)]},
    "items: false": {"type": "array", "items": False, "minItems": 1},
    "schema: true": True,
}


@st.composite
def random_schemas(draw: st.DrawFn, depth: int = 0) -> Any:
    """A JSON Schema-shaped object: real keywords with sensible and hostile values, nested."""
    if depth > 3 or draw(st.integers(0, 3)) == 0:
        leaf = {
            "type": st.one_of(
                st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "text"]),
                st.lists(st.sampled_from(["string", "null", "integer"]), max_size=3),
                scalars,
            ),
            "enum": st.one_of(st.lists(st.one_of(short_text, st.integers()), max_size=5), scalars),
            "const": scalars,
            "pattern": st.one_of(st.sampled_from(REGEXES), st.text(alphabet="ab()[]{}*+?|^$\\.0123,-", max_size=20)),
            "format": st.sampled_from(FORMATS),
            "minLength": st.one_of(st.integers(0, 10), edge_ints),
            "maxLength": st.one_of(st.integers(0, 10), edge_ints),
            "minimum": st.one_of(st.integers(-10, 10), st.sampled_from(EDGE_NUMBERS), edge_ints),
            "maximum": st.one_of(st.integers(-10, 10), st.sampled_from(EDGE_NUMBERS), edge_ints),
            "exclusiveMinimum": st.one_of(st.floats(-10, 10), st.booleans()),
            "multipleOf": st.one_of(st.sampled_from([0, -1, 0.1, 1e-9, 3, 0.25]), scalars),
            "description": hostile_strings,
        }
        chosen = draw(st.lists(st.sampled_from(sorted(leaf)), max_size=3, unique=True))
        return {k: draw(leaf[k]) for k in chosen}
    child = random_schemas(depth + 1)
    names = st.one_of(st.sampled_from(["a", "b", "\x00", "", "$ref", "a" * 300, "\U0001f600"]), short_text)
    inner = {
        "type": st.just("object"),
        "properties": st.one_of(st.dictionaries(names, child, max_size=4), scalars),
        "required": st.one_of(st.lists(names, max_size=4), scalars),
        "additionalProperties": st.one_of(st.booleans(), child),
        "items": st.one_of(child, st.booleans(), scalars),
        "prefixItems": st.lists(child, max_size=3),
        "minItems": st.one_of(st.integers(0, 5), edge_ints),
        "maxItems": st.one_of(st.integers(0, 5), edge_ints),
        "anyOf": st.one_of(st.lists(child, max_size=3), scalars),
        "oneOf": st.lists(child, max_size=3),
        "allOf": st.lists(child, max_size=3),
        "$defs": st.one_of(st.dictionaries(names, child, max_size=2), scalars),
        "$ref": st.sampled_from(["#", "#/$defs/a", "#/definitions/a", "#/properties/a", "#/$defs/\x00", "urn:x", "#/"]),
        "not": child,
        "if": child,
        "uniqueItems": st.booleans(),
        "patternProperties": st.dictionaries(st.sampled_from(REGEXES), child, max_size=2),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(inner)), min_size=1, max_size=4, unique=True))
    return {k: draw(inner[k]) for k in chosen}


def schema_request(schema: Any, where: str, stream: bool = False, max_tokens: int = 4) -> dict[str, Any]:
    """A request that puts `schema` in `response_format` or a tool's `parameters`."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON."}]}
    body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    if where.startswith("response_format"):
        spec: dict[str, Any] = {"name": "answer", "schema": schema}
        if where.endswith("strict"):
            spec["strict"] = True
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    else:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        body["tool_choice"] = {
            "tool-required": "required",
            "tool-auto": "auto",
            "tool-named": {"type": "function", "function": {"name": "f"}},
        }[where]
    return body


SCHEMA_PLACES = ["response_format", "response_format strict", "tool-required", "tool-auto", "tool-named"]


@st.composite
def schema_cases(draw: st.DrawFn) -> HttpCase:
    """Family `schemas`: random or hostile schemas where the server compiles grammars."""
    name = draw(st.sampled_from(["random", "random", "random", *HOSTILE_SCHEMAS]))
    schema = draw(random_schemas()) if name == "random" else HOSTILE_SCHEMAS[name]
    where = draw(st.sampled_from(SCHEMA_PLACES))
    stream = draw(st.booleans())
    body = schema_request(schema, where, stream, draw(st.integers(1, MAX_GEN_TOKENS)))
    label = describe(schema, 90) if name == "random" else name
    return HttpCase("schemas", f"{where}{' stream' if stream else ''}: {label}", body)


# --- raw HTTP ------------------------------------------------------------------------------------------------

METHODS = ["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "post", "PRI", "GET\x00"]
PATHS = [
    "/v1/chat/completions",
    "/v1/chat/completions:stream",
    "/v1/chat/completions/",
    "/v1/chat/completions?api-version=x",
    "/v1/chat/completions?stream=true",
    "/v1/chat/completions#frag",
    "/V1/Chat/Completions",
    "//v1/chat/completions",
    "/v1/chat/../chat/completions",
    "/v1/chat/completions%00",
    "/v1/models",
    "/v1/models/",
    "/v1/models/%ff",
    "/v1/models/%00",
    "/v1/models/smollm2-135m-instruct",
    "/v1/models/smollm2-135m-instruct?x=1",
    "/v1/models/" + "a" * 8000,
    "/v1/models/..%2f..%2fetc%2fpasswd",
    "/chatwire.v1.ChatService/CreateChatCompletion",
    "/chatwire.v1.ChatService/ListModels",
    "/grpc.health.v1.Health/Check",
    "/health",
    "/health?full=1",
    "/",
    "*",
    "http://127.0.0.1/v1/models",
    "/v1",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/stats",
    "/ready",
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "Application/Json",
    "APPLICATION/JSON; CHARSET=LATIN1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/grpc",
    "application/grpc-web",
    "application/grpc+json",
    "application/octet-stream",
    "application/json\t",
    "",
    None,
]
ODD_HEADERS = [
    ("grpc-timeout", "1n"),
    ("grpc-timeout", "0S"),
    ("grpc-timeout", "1m"),
    ("grpc-timeout", "99999999H"),
    ("grpc-timeout", "abc"),
    ("grpc-timeout", "-1S"),
    ("te", "trailers"),
    ("x-chatwire-sse", "1"),
    ("x-request-id", "\x7f" * 10),
    ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("x-envoy-retry-on", "5xx"),
    ("authorization", "Bearer " + "a" * 4096),
    ("content-encoding", "gzip"),
    ("accept", "text/event-stream"),
    ("accept-encoding", "gzip, br, zstd"),
    ("expect", "100-continue"),
    ("origin", "https://evil.example"),
    ("x-forwarded-for", "1.2.3.4"),
    ("host", ""),
    ("connection", "upgrade"),
    ("upgrade", "h2c"),
    ("openai-organization", "\U0001f600"),
    ("x-" + "h" * 1000, "v"),
    ("x-big", "v" * 16_384),
]
VALID_BODY = {"model": MODEL, "messages": USER, "max_tokens": 2}


def raw_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    content_length: int | None,
    keep_alive: bool = False,
) -> bytes:
    """An HTTP/1.1 request, byte for byte as given (no normalization, no validation)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *([] if keep_alive else ["Connection: close"])]
    lines += [f"{k}: {v}" for k, v in headers]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body


@st.composite
def raw_cases(draw: st.DrawFn, reuse: bool = False) -> HttpCase:
    """Family `raw`: exact bytes on a socket; `reuse`, family `reuse`: framed right (no short Content-Length,
    which would make the rest of the body a request of its own) on a connection kept open."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.one_of(st.sampled_from(PATHS), st.builds(lambda s: "/" + s, st.text(max_size=30))))
    target = target.replace(" ", "%20").replace("\r", "%0d").replace("\n", "%0a") if draw(st.booleans()) else target
    body_kind = draw(
        st.sampled_from(["valid", "valid stream", "invalid json", "truncated", "empty", "binary", "field", "jsonish"])
    )
    if body_kind == "valid":
        body = encode(VALID_BODY)
    elif body_kind == "valid stream":
        body = encode({**VALID_BODY, "stream": True})
    elif body_kind == "invalid json":
        body = draw(
            st.sampled_from(
                [
                    b"{bad",
                    b"{",
                    b"}",
                    b"[]",
                    b"null",
                    b'"x"',
                    b"1",
                    b"{'model': 'x'}",
                    b'{"model": "x",}',
                    b"\xff\xfe",
                    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff"}]}',
                    b"\xef\xbb\xbf" + encode(VALID_BODY),
                    b'{"stream": true}' * 3,
                    b"model=x&messages=y",
                ]
            )
        )
    elif body_kind == "truncated":
        whole = encode({**VALID_BODY, "stream": draw(st.booleans())})
        body = whole[: draw(st.integers(0, len(whole) - 1))]
    elif body_kind == "binary":
        body = draw(st.binary(max_size=300))
    elif body_kind == "field":
        body = encode(draw(field_cases()).body)
    elif body_kind == "jsonish":
        body = encode(draw(hostile_values))
    else:
        body = b""
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    extra = draw(st.lists(st.sampled_from(ODD_HEADERS), max_size=3, unique=True))
    headers = ([("Content-Type", ctype)] if ctype is not None else []) + extra
    # On a reused connection the request must be framed right: no short length, and no body without a length
    # (it would be read as the next request).
    unframed = ["none", "short"] if not reuse else (["none"] if method != "POST" else [])
    length_kind = draw(st.sampled_from(["exact", "exact", "exact", "chunked", *unframed]))
    if length_kind == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
        length = None
    elif length_kind == "short" and body:
        payload, length = body, len(body) - draw(st.integers(1, len(body)))
    elif length_kind == "none":
        payload, length = (b"" if method != "POST" else body), None
    else:
        payload, length = body, len(body)
    head = f"{method!r} {describe(target, 50)} ctype={ctype!r} body={body_kind}({len(body)}) length={length_kind}"
    if extra:
        head += " headers=" + ",".join(f"{describe(k, 20)}:{describe(v, 16)}" for k, v in extra)
    return HttpCase(
        "reuse" if reuse else "raw",
        head,
        body=None,
        method=method,
        path=target,
        raw=raw_request(method, target, headers, payload, length, keep_alive=reuse),
    )


# --- gRPC ----------------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = _varint(number << 3 | wire)
    if wire == 0:
        assert isinstance(payload, int)
        return key + _varint(payload)
    assert isinstance(payload, bytes)
    return key + _varint(len(payload)) + payload


def valid_request_bytes(**extra: Any) -> bytes:
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "max_completion_tokens": 4, **extra}
    return json_format.ParseDict(body, pb.CreateChatCompletionRequest()).SerializeToString()


def bound_proto(message: pb.CreateChatCompletionRequest) -> None:
    """bound_generation for a message: at most 8 tokens and n at most 4."""
    for name in ("max_tokens", "max_completion_tokens"):
        if message.HasField(name) and MAX_GEN_TOKENS < getattr(message, name) <= 1_000_000:
            setattr(message, name, MAX_GEN_TOKENS)
    if message.HasField("n") and MAX_N < message.n <= 1_000:
        message.n = MAX_N
    if not message.HasField("max_tokens") and not message.HasField("max_completion_tokens"):
        message.max_completion_tokens = 4


def bound_payload(payload: bytes) -> bytes:
    """Random bytes that happen to parse as a request that generates: append fields that bound it (for a
    repeated scalar field, protobuf keeps the last value)."""
    try:
        message = pb.CreateChatCompletionRequest.FromString(payload)
    except Exception:
        return payload
    before = (message.max_tokens, message.max_completion_tokens, message.n)
    bound_proto(message)
    if (message.max_tokens, message.max_completion_tokens, message.n) == before and message.HasField(
        "max_completion_tokens"
    ):
        return payload
    return (
        payload
        + _field(28, 0, message.max_tokens)
        + _field(16, 0, message.max_completion_tokens)
        + (_field(29, 0, message.n) if message.HasField("n") else b"")
    )


@st.composite
def grpc_byte_cases(draw: st.DrawFn) -> GrpcCase:
    """Family `grpc-bytes`: random bytes, and valid messages broken on the wire."""
    method = draw(st.sampled_from(sorted(RPCS)))
    kind = draw(
        st.sampled_from(["random", "flipped", "truncated", "appended", "unknown field", "bomb", "wire types", "huge"])
    )
    valid = (
        valid_request_bytes()
        if method.endswith("ChatCompletion")
        else models_pb2.GetModelRequest(model=MODEL).SerializeToString()
    )
    if kind == "random":
        payload = draw(st.binary(max_size=600))
    elif kind == "flipped":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        payload = bytes(data)
    elif kind == "truncated":
        payload = valid[: draw(st.integers(0, len(valid) - 1))]
    elif kind == "appended":
        payload = valid + draw(st.binary(min_size=1, max_size=64))
    elif kind == "unknown field":
        number = draw(st.integers(41, 536_870_911))
        payload = valid + (
            _field(number, 0, 7) if draw(st.booleans()) else _field(number, 2, draw(st.binary(max_size=32)))
        )
    elif kind == "bomb":
        # Values nested past protobuf's recursion limit (100) in a message's content, or a length of 2^63.
        depth = draw(st.sampled_from([30, 99, 100, 101, 500, 5000]))
        payload = draw(st.sampled_from([content_request_bytes(deep_value_bytes(depth)), b"\x0a" + _varint(2**63)]))
    elif kind == "wire types":
        payload = b"".join(
            _varint(draw(st.integers(1, 45)) << 3 | draw(st.sampled_from([1, 3, 4, 5, 6, 7])))
            + draw(st.binary(max_size=9))
            for _ in range(draw(st.integers(1, 6)))
        )
    else:
        size = draw(st.sampled_from([65_536, 1_048_576, 3_000_000]))
        payload = _field(2, 2, b"m" * size)  # the model, as a huge string
    if method.endswith("ChatCompletion"):
        payload = bound_payload(payload)
    return GrpcCase("grpc-bytes", f"{method} {kind}: {describe(payload)}", method, payload)


# Messages stay under gRPC's 4 MiB limit (its RESOURCE_EXHAUSTED comes from the library, not the service).
PROTO_BUDGET = 1_000_000
PROTO_STRINGS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(ODD_STRINGS),
    st.builds(
        lambda c, n: c * n, st.sampled_from(["a", "\x00", "\U0001f600", "word "]), st.sampled_from([1_000, 65_536])
    ),
)
PROTO_DOUBLES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 2.0, -2.0, 3.0, 100.0]),
    st.floats(),
)


def _proto_value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int | float):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, list):
        out.list_value.values.extend(_proto_value(v) for v in value)
    elif isinstance(value, dict):
        for k, v in value.items():
            out.struct_value.fields[str(k)].CopyFrom(_proto_value(v))
    else:
        out.string_value = repr(value)
    return out


def _plain(value: Any) -> Any:
    """A JSON value protobuf can hold: Raw fragments become numbers or strings."""
    if isinstance(value, Raw):
        number = _number(value)
        return number if number is not None else value.text
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _deep_value(depth: int) -> struct_pb2.Value:
    """A Value of `depth` nested lists (at most 20: upb will not encode a message nested more than 64 deep;
    the `grpc-bytes` family sends deeper ones, written by hand)."""
    return struct_pb2.Value.FromString(deep_value_bytes(min(depth, 20)))


def deep_value_bytes(depth: int) -> bytes:
    """A google.protobuf.Value of `depth` nested lists, serialized by hand: any depth."""
    value = _field(3, 2, b"x")
    for _ in range(depth):
        value = _field(6, 2, _field(1, 2, value))
    return value


def content_request_bytes(content: bytes) -> bytes:
    """A valid request (max tokens 4) whose message content is the serialized Value `content`."""
    message = _field(1, 2, b"user") + _field(2, 2, content)
    return _field(1, 2, message) + _field(2, 2, MODEL.encode()) + _field(16, 0, 4) + _field(28, 0, 4)


proto_json = st.recursive(
    st.one_of(st.none(), st.booleans(), PROTO_DOUBLES, PROTO_STRINGS),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(PROTO_STRINGS, c, max_size=4)),
    max_leaves=10,
)


def _fill(draw: st.DrawFn, message: Any, depth: int = 0) -> list[str]:
    """Set one to three fields of `message` to hostile values of their own types; returns what it did."""
    fields = list(message.DESCRIPTOR.fields)
    notes = []
    for fd in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique_by=lambda f: f.name)):
        notes.append(f"{fd.name}=" + _set_hostile(draw, message, fd, depth))
    return notes


def _scalar(draw: st.DrawFn, fd: pb_descriptor.FieldDescriptor) -> Any:
    t = fd.type
    if t == fd.TYPE_STRING:
        return draw(PROTO_STRINGS)
    if t == fd.TYPE_BYTES:
        return draw(st.binary(max_size=64))
    if t == fd.TYPE_BOOL:
        return draw(st.booleans())
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return draw(PROTO_DOUBLES)
    if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
        return draw(
            st.one_of(
                st.sampled_from([0, -1, 1, 2, 8, 20, 21, 128, 129, 2**31 - 1, -(2**31)]),
                st.integers(-(2**31), 2**31 - 1),
            )
        )
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return draw(st.integers(0, 2**32 - 1))
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return draw(st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**53 + 1, 2**31]))
    return draw(st.integers(0, 2**64 - 1))


def _set_hostile(draw: st.DrawFn, message: Any, fd: pb_descriptor.FieldDescriptor, depth: int) -> str:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        target = getattr(message, fd.name)
        count, size = draw(st.sampled_from([1, 2, 3, 1000])), 0
        for _ in range(count):
            key, value = _scalar(draw, key_fd), _scalar(draw, value_fd)
            target[key] = value
            size += len(str(key)) + len(str(value))
            if size > PROTO_BUDGET:
                break
        return f"map({len(target)} entries)"
    if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Value":
        if draw(st.booleans()):
            plain = draw(proto_json)
            value, shown = _proto_value(plain), describe(plain)
        else:
            depth = draw(st.sampled_from([5, 10, 20]))
            value, shown = _deep_value(depth), f"{depth} nested lists"
        (getattr(message, fd.name).add() if fd.is_repeated else getattr(message, fd.name)).CopyFrom(value)
        return f"Value({shown})"
    if fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Struct":
        schema = draw(st.one_of(random_schemas(), st.sampled_from(sorted(HOSTILE_SCHEMAS))))
        schema = HOSTILE_SCHEMAS[schema] if isinstance(schema, str) else schema
        struct = getattr(message, fd.name)
        if isinstance(schema, dict):
            struct.update(_plain(schema))
        return f"Struct({describe(schema)})"
    if fd.message_type is not None:
        if fd.is_repeated:
            count = draw(st.sampled_from([0, 1, 2, 5000]))
            repeated = getattr(message, fd.name)
            sub = repeated.add()
            notes = _fill(draw, sub, depth + 1) if depth < 2 else []
            count = min(count, max(1, PROTO_BUDGET // max(1, sub.ByteSize())))
            for _ in range(count - 1):
                repeated.add().CopyFrom(sub)
            if count == 0:
                del repeated[:]
            return f"{count} x {{{', '.join(notes)}}}"
        sub = getattr(message, fd.name)
        sub.SetInParent()
        return "{" + ", ".join(_fill(draw, sub, depth + 1) if depth < 2 else []) + "}"
    if fd.is_repeated:
        values = [_scalar(draw, fd) for _ in range(draw(st.integers(0, 3)))]
        getattr(message, fd.name).extend(values)
        return describe(values)
    value = _scalar(draw, fd)
    setattr(message, fd.name, value)
    return describe(value)


@st.composite
def grpc_message_cases(draw: st.DrawFn) -> GrpcCase:
    """Family `grpc-messages`: well-formed messages whose fields hold hostile values."""
    method = draw(st.sampled_from(["CreateChatCompletion", "StreamChatCompletion", "GetModel", "ListModels"]))
    if method.endswith("ChatCompletion"):
        message: Any = pb.CreateChatCompletionRequest.FromString(valid_request_bytes())
        message.ClearField("max_completion_tokens")
        notes = _fill(draw, message)
        bound_proto(message)
    elif method == "GetModel":
        message = models_pb2.GetModelRequest()
        notes = _fill(draw, message)
    else:
        message = models_pb2.ListModelsRequest()
        notes = ["(empty)"]
    try:
        payload = message.SerializeToString()
    except Exception:  # a message this client library cannot encode (too deep): not a case
        reject()
    return GrpcCase("grpc-messages", f"{method}: " + "; ".join(notes), method, payload)


# ---------------------------------------------------------------------------------------------------------------
# Fixed cases: every hostile reproduction named in the issue, one request each


def _fixed(name: str, body: Any, **headers: str) -> HttpCase:
    return HttpCase("fixed", name, body, headers=dict(headers))


def fixed_http_cases() -> list[HttpCase]:
    cases = []
    for name, schema in HOSTILE_SCHEMAS.items():
        cases.append(
            _fixed(f"schema {name} (response_format)", schema_request(schema, "response_format", max_tokens=2))
        )
        cases.append(_fixed(f"schema {name} (tool parameters)", schema_request(schema, "tool-required", max_tokens=2)))
    cases += [
        _fixed("n 2, max_tokens 1", {"model": MODEL, "messages": USER, "n": 2, "max_tokens": 1}),
        _fixed(
            "n 128, max_completion_tokens 1", {"model": MODEL, "messages": USER, "n": 128, "max_completion_tokens": 1}
        ),
        _fixed("n 129, max_tokens 1", {"model": MODEL, "messages": USER, "n": 129, "max_tokens": 1}),
        _fixed("n 2^31-1, max_tokens 1", {"model": MODEL, "messages": USER, "n": 2**31 - 1, "max_tokens": 1}),
        _fixed(
            "logit_bias key \u00b2", {"model": MODEL, "messages": USER, "max_tokens": 2, "logit_bias": {"\u00b2": 1}}
        ),
        _fixed(
            "logit_bias key \u2460", {"model": MODEL, "messages": USER, "max_tokens": 2, "logit_bias": {"\u2460": 1}}
        ),
        _fixed("logit_bias key --1", {"model": MODEL, "messages": USER, "max_tokens": 2, "logit_bias": {"--1": 1}}),
        _fixed("logit_bias value {}", {"model": MODEL, "messages": USER, "max_tokens": 2, "logit_bias": {"1": {}}}),
        _fixed(
            "logit_bias key 2^40", {"model": MODEL, "messages": USER, "max_tokens": 2, "logit_bias": {str(2**40): 5}}
        ),
        _fixed(
            "logit_bias 100k keys",
            {"model": MODEL, "messages": USER, "max_tokens": 2, "logit_bias": {str(i): -1 for i in range(100_000)}},
        ),
        _fixed("1 MiB model", {"model": "m" * 2**20, "messages": USER, "max_tokens": 2}),
        _fixed("1 MiB stop", {"model": MODEL, "messages": USER, "max_tokens": 2, "stop": "s" * 2**20}),
        _fixed("stop: 1000 strings", {"model": MODEL, "messages": USER, "max_tokens": 2, "stop": ["x"] * 1000}),
        _fixed(
            "50,000 one-word messages",
            {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "word"}] * 50_000},
        ),
        _fixed(
            "100,000 content parts",
            {
                "model": MODEL,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100_000}],
            },
        ),
        _fixed("60 KiB header", {"model": MODEL, "messages": USER, "max_tokens": 2}, **{"x-big": "v" * 60 * 1024}),
        _fixed(
            "1 MiB message",
            {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "word " * 209_716}]},
        ),
        _fixed("messages nested 10,000 deep", {"model": MODEL, "max_tokens": 2, "messages": deep(10_000, "list")}),
        _fixed(
            "content nested 100 deep",
            {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": deep(100, "list")}]},
        ),
        _fixed("temperature NaN", {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": Raw("NaN")}),
        _fixed("temperature 1e999", {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": Raw("1e999")}),
        _fixed("seed 2^64", {"model": MODEL, "messages": USER, "max_tokens": 2, "seed": 2**64}),
        _fixed("max_tokens 2^31", {"model": MODEL, "messages": USER, "max_tokens": 2**31}),
        _fixed("max_tokens 2^31-1", {"model": MODEL, "messages": USER, "max_tokens": 2**31 - 1}),
        _fixed(
            "top_logprobs 21", {"model": MODEL, "messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 21}
        ),
        _fixed("role with NUL", {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user\x00", "content": "Hi"}]}),
        _fixed(
            "content lone surrogate",
            {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": Raw('"\\ud800"')}]},
        ),
        _fixed(
            "tool named with NUL",
            {
                "model": MODEL,
                "messages": USER,
                "max_tokens": 2,
                "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "\x00", "parameters": {"type": "object"}}}],
            },
        ),
        _fixed(
            "1000 tools",
            {
                "model": MODEL,
                "messages": USER,
                "max_tokens": 2,
                "tool_choice": "required",
                "tools": [
                    {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}
                    for i in range(1000)
                ],
            },
        ),
        _fixed('stream: "true"', {"model": MODEL, "messages": USER, "max_tokens": 2, "stream": "true"}),
        _fixed(
            "duplicate stream keys",
            Raw(
                f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 2, '
                '"stream": false, "stream": true}'
            ),
        ),
        _fixed(
            "stream true, nested stream false",
            {"model": MODEL, "messages": USER, "max_tokens": 2, "stream": True, "metadata": {"stream": "false"}},
        ),
        _fixed("body is a 1 MiB string", "s" * 2**20),
        _fixed("body is null", None),
    ]
    return cases


def fixed_raw_cases() -> list[HttpCase]:
    valid = encode(VALID_BODY)

    def raw(
        name: str, method: str, target: str, headers: list[tuple[str, str]], body: bytes, length: int | None
    ) -> HttpCase:
        return HttpCase(
            "fixed",
            name,
            None,
            method=method,
            path=target,
            raw=raw_request(method, target, headers, body, length),
        )

    json_type = [("Content-Type", "application/json")]
    grpc_type = [("Content-Type", "application/grpc")]
    message = valid_request_bytes()
    framed = b"\x00" + len(message).to_bytes(4, "big") + message  # one gRPC length-prefixed message
    cases = [
        raw(
            "content-type application/json; charset=utf-8",
            "POST",
            "/v1/chat/completions",
            [("Content-Type", "application/json; charset=utf-8")],
            valid,
            len(valid),
        ),
        raw(
            "content-type Application/Json",
            "POST",
            "/v1/chat/completions",
            [("Content-Type", "Application/Json")],
            valid,
            len(valid),
        ),
        raw(
            "content-type text/plain",
            "POST",
            "/v1/chat/completions",
            [("Content-Type", "text/plain")],
            valid,
            len(valid),
        ),
        raw("no content-type", "POST", "/v1/chat/completions", [], valid, len(valid)),
        raw("content-type application/grpc", "POST", "/v1/chat/completions", grpc_type, valid, len(valid)),
        raw("POST /v1/chat/completions:stream", "POST", "/v1/chat/completions:stream", json_type, valid, len(valid)),
        raw("GET /v1/models/%ff", "GET", "/v1/models/%ff", [], b"", None),
        raw("GET /v1/models/%00", "GET", "/v1/models/%00", [], b"", None),
        raw("POST ?api-version=x", "POST", "/v1/chat/completions?api-version=x", json_type, valid, len(valid)),
        raw("GET /v1/chat/completions", "GET", "/v1/chat/completions", [], b"", None),
        raw("DELETE /v1/models/smollm2-135m-instruct", "DELETE", f"/v1/models/{MODEL}", [], b"", None),
        raw("PUT /v1/chat/completions", "PUT", "/v1/chat/completions", json_type, valid, len(valid)),
        raw(
            "POST the gRPC path with JSON",
            "POST",
            "/chatwire.v1.ChatService/CreateChatCompletion",
            json_type,
            valid,
            len(valid),
        ),
        raw(
            "POST the gRPC path, content-type application/grpc, gRPC framing",
            "POST",
            "/chatwire.v1.ChatService/CreateChatCompletion",
            grpc_type,
            framed,
            len(framed),
        ),
        raw("POST /nope, content-type application/grpc", "POST", "/nope", grpc_type, valid, len(valid)),
        raw(
            "POST /v1/chat/completions:stream, content-type application/grpc",
            "POST",
            "/v1/chat/completions:stream",
            grpc_type,
            valid,
            len(valid),
        ),
        raw("invalid JSON", "POST", "/v1/chat/completions", json_type, b"{bad", 4),
        raw("truncated body", "POST", "/v1/chat/completions", json_type, valid[: len(valid) // 2], len(valid) // 2),
        raw(
            "chunked body",
            "POST",
            "/v1/chat/completions",
            [*json_type, ("Transfer-Encoding", "chunked")],
            f"{len(valid):x}\r\n".encode() + valid + b"\r\n0\r\n\r\n",
            None,
        ),
        raw(
            "gzip content-encoding, plain body",
            "POST",
            "/v1/chat/completions",
            [*json_type, ("Content-Encoding", "gzip")],
            valid,
            len(valid),
        ),
        raw("body over 4 MiB", "POST", "/v1/chat/completions", json_type, b" " * (4 * 2**20 + 1), 4 * 2**20 + 1),
        raw(
            "1000 headers",
            "POST",
            "/v1/chat/completions",
            [*json_type, *[(f"x-h{i}", "v") for i in range(1000)]],
            valid,
            len(valid),
        ),
        raw("header with NUL", "POST", "/v1/chat/completions", [*json_type, ("x-a", "a\x00b")], valid, len(valid)),
        raw("request line with a space in the path", "GET", "/v1/models /x", [], b"", None),
        raw("HTTP/1.0-style path *", "OPTIONS", "*", [], b"", None),
        raw(
            "x-chatwire-sse from the client, unary",
            "POST",
            "/v1/chat/completions",
            [*json_type, ("x-chatwire-sse", "1")],
            valid,
            len(valid),
        ),
    ]
    for timeout in ("1n", "0S", "1m", "99999999H", "abc", "-1S"):
        cases.append(
            raw(
                f"grpc-timeout {timeout}",
                "POST",
                "/v1/chat/completions",
                [*json_type, ("grpc-timeout", timeout)],
                valid,
                len(valid),
            )
        )
    return cases


def fixed_grpc_cases() -> list[GrpcCase]:
    cases = []
    for method in sorted(RPCS):
        cases.append(GrpcCase("fixed", f"{method}: empty message", method, b""))
        cases.append(GrpcCase("fixed", f"{method}: bytes ff ff ff", method, b"\xff\xff\xff"))
        cases.append(GrpcCase("fixed", f"{method}: wire type 7", method, b"\x0f"))
        cases.append(GrpcCase("fixed", f"{method}: length 2^63", method, b"\x0a" + _varint(2**63)))

    def message(name: str, method: str = "CreateChatCompletion", **fields: Any) -> GrpcCase:
        msg = pb.CreateChatCompletionRequest.FromString(valid_request_bytes())
        for key, value in fields.items():
            if key == "content":
                msg.messages[0].content.CopyFrom(value)
            else:
                setattr(msg, key, value)
        return GrpcCase("fixed", f"{method}: {name}", method, msg.SerializeToString())

    for method in ("CreateChatCompletion", "StreamChatCompletion"):
        cases += [
            message("temperature NaN", method, temperature=math.nan),
            message("temperature inf", method, temperature=math.inf),
            message("top_p -inf", method, top_p=-math.inf),
            message("model with NUL", method, model=MODEL + "\x00"),
            message("1 MiB model", method, model="m" * 2**20),
            message("n 128, max_completion_tokens 1", method, n=128, max_completion_tokens=1),
            message("n -1", method, n=-1),
            message("max_completion_tokens -2^31", method, max_completion_tokens=-(2**31)),
            message("seed -2^63", method, seed=-(2**63)),
            message("top_logprobs -1", method, logprobs=True, top_logprobs=-1),
            GrpcCase(
                "fixed", f"{method}: content nested 200 deep", method, content_request_bytes(deep_value_bytes(200))
            ),
            message("content NaN", method, content=struct_pb2.Value(number_value=math.nan)),
        ]
    cases.append(
        GrpcCase(
            "fixed", "GetModel: 1 MiB id", "GetModel", models_pb2.GetModelRequest(model="m" * 2**20).SerializeToString()
        )
    )
    cases.append(
        GrpcCase("fixed", "GetModel: id %ff", "GetModel", models_pb2.GetModelRequest(model="%ff").SerializeToString())
    )
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Sending and checking


@dataclass
class Outcome:
    """What a client saw: a status (HTTP code, gRPC code name, or `no response: …`), a body, the time taken, and
    every way the reply broke the rules."""

    status: str
    duration: float
    body: bytes = b""
    violations: list[str] = field(default_factory=list)


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _valid(instance: Any, definition: str) -> str | None:
    try:
        assert_valid(instance, definition)
    except AssertionError as error:
        return str(error)[:300]
    return None


def error_problems(data: bytes, where: str = "body") -> list[str]:
    """Problems with an OpenAI error body."""
    body = _json(data)
    if body is None:
        return [f"error {where} is not JSON: {excerpt(data, 200)!r}"]
    problem = _valid(body, "ErrorResponse")
    return [f"error {where} not OpenAI-shaped: {problem}; {excerpt(data, 200)!r}"] if problem else []


def _error_code(data: bytes) -> str | None:
    body = _json(data)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return code if isinstance(code, str) else None
    return None


def _route(path: str) -> str:
    """The path part of a request target, normalized as a router would (scheme and host, `//`, `.`, `..`)."""
    path = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", "", path).split("?")[0].split("#")[0]
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            parts = parts[:-1]
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def _is_chat(path: str) -> bool:
    return _route(path) in ("/v1/chat/completions", "/v1/chat/completions:stream")


def _is_known(path: str) -> bool:
    """The URLs the edge serves (README): chat completions, models, one model, health."""
    route = _route(path)
    return _is_chat(path) or route in ("/v1/models", "/health") or route.startswith("/v1/models/")


def sse_problems(data: bytes) -> list[str]:
    """Problems with an SSE body: every event a valid chunk (or an OpenAI error event), then `data: [DONE]`."""
    try:
        events = parse_sse(data.decode("utf-8"))
    except (AssertionError, ValueError) as error:
        return [f"malformed SSE: {str(error)[:200]}; {excerpt(data, 200)!r}"]
    problems = []
    if not events or events[-1] != "[DONE]":
        problems.append(f"SSE does not end with data: [DONE]: {excerpt(data[-200:], 200)!r}")
    for event in events:
        if event == "[DONE]":
            continue
        if isinstance(event, dict) and "error" in event:
            if problem := _valid(event, "ErrorResponse"):
                problems.append(f"SSE error event not OpenAI-shaped: {problem}")
            error = event.get("error") or {}
            if error.get("type") == "server_error" and error.get("code") not in ALLOWED_503_CODES:
                problems.append(f"stream ended with a server error: {json.dumps(event)[:300]}")
        elif problem := _valid(event, "CreateChatCompletionStreamResponse"):
            problems.append(f"invalid chunk: {problem}")
            break
    return problems


@dataclass
class Choice:
    """One choice of a reply, assembled from the message or from the stream's deltas."""

    content: str = ""
    finish: str | None = None
    calls: list[dict[str, str]] = field(default_factory=list)


def choices_of_reply(reply: dict[str, Any]) -> list[Choice]:
    found = []
    for choice in reply.get("choices") or []:
        message = choice.get("message") or {}
        calls = [
            {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
            for call in message.get("tool_calls") or []
            if call.get("type") == "function"
        ]
        found.append(Choice(message.get("content") or "", choice.get("finish_reason"), calls))
    return found


def choices_of_stream(events: list[Any]) -> list[Choice] | None:
    """The choices a stream built; None if it ended with an error event (its choices are cut short)."""
    found: dict[int, Choice] = defaultdict(Choice)
    for event in events:
        if not isinstance(event, dict):
            continue
        if "error" in event:
            return None
        for choice in event.get("choices") or []:
            built = found[choice.get("index", 0)]
            delta = choice.get("delta") or {}
            built.content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                while len(built.calls) <= call.get("index", 0):
                    built.calls.append({"name": "", "arguments": ""})
                function = call.get("function") or {}
                target = built.calls[call.get("index", 0)]
                target["name"] += function.get("name") or ""
                target["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                built.finish = choice["finish_reason"]
    return [found[i] for i in sorted(found)]


def _multiple_ok(error: jsonschema.ValidationError) -> bool:
    """jsonschema's multipleOf on floats is inexact (0.3 / 0.1); decide it with decimals instead."""
    if error.validator != "multipleOf":
        return False
    try:
        return decimal.Decimal(str(error.instance)) % decimal.Decimal(str(error.validator_value)) == 0
    except (decimal.InvalidOperation, TypeError, ValueError):
        return False


def schema_errors(value: Any, schema: Any) -> list[str]:
    """Why `value` does not validate against `schema` (empty when it does, or when jsonschema cannot judge)."""
    try:
        validator = jsonschema.Draft202012Validator(schema)
        errors = [e for e in validator.iter_errors(value) if not _multiple_ok(e)]
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors[:3]]
    except Exception:
        return []


def structured_problems(body: Any, choices: list[Choice]) -> list[str]:
    """docs/design.md's guarantees for accepted requests: a JSON reply that ends with `stop` parses (and validates
    against `json_schema`); under `required` or a named tool the reply calls a tool; every call names a given tool
    and its arguments validate against its `parameters`; `parallel_tool_calls: false` allows one call."""
    if not isinstance(body, dict) or body.get("stop"):
        return []  # a stop sequence may end any reply, JSON or call, where it pleases
    problems = []
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    tools = {
        tool["function"]["name"]: tool["function"].get("parameters")
        for tool in body.get("tools") or []
        if isinstance(tool, dict)
        and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str)
    }
    choice = body.get("tool_choice")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    forced = choice == "required" or named is not None
    for i, got in enumerate(choices):
        if kind in ("json_object", "json_schema") and got.finish == "stop":
            try:
                value = json.loads(got.content)
            except ValueError:
                problems.append(f"choice {i}: {kind} reply ended with stop but is not JSON: {got.content[:200]!r}")
            else:
                if kind == "json_object" and not isinstance(value, dict):
                    problems.append(f"choice {i}: json_object reply is not an object: {got.content[:200]!r}")
                if schema is not None and (errors := schema_errors(value, schema)):
                    problems.append(
                        f"choice {i}: reply does not match its json_schema: {errors}; {got.content[:200]!r}"
                    )
        if not tools or choice == "none":
            continue
        if forced and got.finish == "stop":
            problems.append(f"choice {i}: tool_choice {choice!r} but the reply ended with stop: {got.content[:200]!r}")
        if got.finish == "tool_calls" and not got.calls:
            problems.append(f"choice {i}: finish_reason tool_calls without tool_calls")
        if body.get("parallel_tool_calls") is False and len(got.calls) > 1:
            problems.append(f"choice {i}: {len(got.calls)} calls with parallel_tool_calls false")
        for call in got.calls:
            if call["name"] not in tools or (named is not None and call["name"] != named):
                problems.append(f"choice {i}: call to {call['name']!r}, not an allowed tool")
                continue
            try:
                arguments = json.loads(call["arguments"])
            except ValueError:
                problems.append(f"choice {i}: arguments of {call['name']!r} are not JSON: {call['arguments'][:200]!r}")
                continue
            parameters = tools[call["name"]]
            if parameters is not None and (errors := schema_errors(arguments, parameters)):
                problems.append(f"choice {i}: arguments of {call['name']!r} do not match its parameters: {errors}")
    return problems


def http_problems(case: HttpCase, status: int, headers: dict[str, str], body: bytes, duration: float) -> list[str]:
    """Every rule a reply breaks: 5xx (bar the documented 503), unshaped 4xx, invalid 200s, the time bound."""
    problems = []
    bound = time_bound_s(len(case.raw) if case.raw is not None else len(encode(case.body)))
    if duration > bound:
        problems.append(f"took {duration:.1f} s (bound {bound:.0f} s)")
    if status >= 500 and not (status == 503 and _error_code(body) in ALLOWED_503_CODES):
        problems.append(f"HTTP {status}: {excerpt(body, 300)!r}")
    grpc_framed = headers.get("content-type", "").startswith("application/grpc")
    internal = {n for n in headers if n not in EDGE_REPLY_HEADERS and not (grpc_framed and n.startswith("grpc-"))}
    if internal:
        problems.append(f"internal headers on a public reply: {sorted(internal)}")
    head = case.method.upper() == "HEAD"
    # Refused before the edge's filters read the request (the codec's 400 and 431, `OPTIONS *`): its status with
    # no body (the method, unknown there, might be HEAD) and no request id.
    unread = not body and "x-request-id" not in headers and headers.get("content-length") == "0"
    if status >= 400 and not head and not unread:
        if not headers.get("content-type", "").startswith("application/json"):
            problems.append(f"HTTP {status} error with content-type {headers.get('content-type')!r}")
        problems += error_problems(body)
    if status == 200 and headers.get("content-type", "").startswith("application/grpc"):
        # A gRPC-framed request is refused in gRPC's own way (trailers-only, a non-zero grpc-status): Envoy picks
        # the reply framing from the request before any filter runs. Nothing reaches the service.
        if headers.get("grpc-status", "0") == "0":
            problems.append(f"gRPC-framed request answered with grpc-status 0: {excerpt(body, 200)!r}")
        return problems
    if status == 200 and not head and not _is_known(case.path):
        problems.append(f"HTTP 200 for a URL the edge does not serve: {excerpt(body, 200)!r}")
    if status == 200 and not head and _is_chat(case.path):
        if headers.get("content-type", "").startswith("text/event-stream"):
            problems += sse_problems(body)
            try:
                choices = choices_of_stream(parse_sse(body.decode("utf-8")))
            except (AssertionError, ValueError):
                choices = None
            problems += structured_problems(case.body, choices or [])
        else:
            if case.expect_stream:
                problems.append(f"asked for a stream, got {headers.get('content-type')!r}")
            reply = _json(body)
            if reply is None:
                problems.append(f"200 reply is not JSON: {excerpt(body, 200)!r}")
            elif problem := _valid(reply, "CreateChatCompletionResponse"):
                problems.append(f"invalid 200 reply: {problem}")
            else:
                problems += structured_problems(case.body, choices_of_reply(reply))
    return problems


def send_http(client: httpx.Client, base: str, case: HttpCase) -> Outcome:
    """Send a JSON-family case (httpx, connection reused) and check the reply."""
    data = encode(case.body)
    headers = {"content-type": "application/json", **case.headers}
    start = time.monotonic()
    try:
        timeout = time_bound_s(len(data)) + 5
        with client.stream(case.method, base + case.path, content=data, headers=headers, timeout=timeout) as reply:
            body = b"".join(reply.iter_bytes())
            duration = time.monotonic() - start
            status, reply_headers = reply.status_code, {k.lower(): v for k, v in reply.headers.items()}
    except httpx.HTTPError as error:
        duration = time.monotonic() - start
        name = type(error).__name__
        return Outcome(f"no response: {name}", duration, violations=[f"no response: {name}: {str(error)[:200]}"])
    return Outcome(str(status), duration, body, http_problems(case, status, reply_headers, body, duration))


def send_raw(port: int, case: HttpCase) -> Outcome:
    """Write a raw case's bytes to a fresh connection and read its reply with h11 (tests/http1.py): any byte
    after it is a framing error. A `reuse` case is followed on the same connection, pipelined, by
    `GET /v1/models`, whose reply must parse and list the models (unless the first said the connection closes)."""
    assert case.raw is not None
    requests = [(case.method.upper(), case.raw)]
    if case.family == "reuse":
        requests.append(("GET", http1.request("GET", "/v1/models")))
    start = time.monotonic()
    try:
        replies = http1.exchange(port, requests, pipelined=True, timeout=time_bound_s(len(case.raw)) + 5)
    except (http1.FramingError, OSError) as error:
        duration = time.monotonic() - start
        name = type(error).__name__
        status = "framing error" if isinstance(error, http1.FramingError) else f"no response: {name}"
        return Outcome(status, duration, violations=[f"{status}: {name}: {str(error)[:200]}"])
    duration = time.monotonic() - start
    first = replies[0]
    problems = http_problems(case, first.status, first.headers, first.body, duration)
    if len(replies) == 2 and (replies[1].status != 200 or not replies[1].body.startswith(b'{"object":"list"')):
        problems.append(f"the follow-up GET /v1/models got {replies[1].status}: {excerpt(replies[1].body, 100)!r}")
    return Outcome(str(first.status), duration, first.body, problems)


def _as_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def grpc_problems(code: grpc.StatusCode, details: str, trailers: Any, duration: float, bound: float) -> list[str]:
    problems = []
    if duration > bound:
        problems.append(f"took {duration:.1f} s (bound {bound:.0f} s)")
    if code == grpc.StatusCode.OK:
        return problems
    trailer = dict(trailers or ()).get("x-chatwire-error")
    if code == grpc.StatusCode.UNAVAILABLE and trailer and _error_code(trailer.encode()) in ALLOWED_503_CODES:
        return problems
    if code not in GRPC_CLIENT_CODES:
        problems.append(f"status {code.name}: {details[:200]!r}")
    if trailer is None:
        problems.append(f"{code.name} without an x-chatwire-error trailer")
    else:
        problems += error_problems(trailer.encode() if isinstance(trailer, str) else trailer, "trailer")
    return problems


def send_grpc(channel: grpc.Channel, case: GrpcCase) -> Outcome:
    """Call an RPC with the case's bytes as the request message; check the status, trailer and replies."""
    streaming, reply_type = RPCS[case.method]
    path = SERVICE + case.method
    start = time.monotonic()
    replies: list[bytes] = []
    details = ""
    try:
        if streaming:
            call = channel.unary_stream(path)(case.payload, timeout=time_bound_s(len(case.payload)))
            replies.extend(call)
            code, trailers = call.code(), call.trailing_metadata()
        else:
            reply, call = channel.unary_unary(path).with_call(case.payload, timeout=time_bound_s(len(case.payload)))
            replies.append(reply)
            code, trailers = call.code(), call.trailing_metadata()
    except grpc.RpcError as error:
        code, trailers, details = error.code(), error.trailing_metadata(), error.details() or ""  # type: ignore[attr-defined]
    duration = time.monotonic() - start
    problems = grpc_problems(code, details, trailers, duration, time_bound_s(len(case.payload)))
    for data in replies:
        try:
            message = reply_type.FromString(data)
        except Exception as error:
            problems.append(f"reply does not parse: {error}")
            break
        definition = {
            "CreateChatCompletion": "CreateChatCompletionResponse",
            "StreamChatCompletion": "CreateChatCompletionStreamResponse",
        }.get(case.method)
        if definition and (problem := _valid(_as_json(message), definition)):
            problems.append(f"invalid reply: {problem}")
            break
    trailer = dict(trailers or ()).get("x-chatwire-error")
    return Outcome(code.name, duration, (trailer if isinstance(trailer, str) else details).encode(), problems)


# ---------------------------------------------------------------------------------------------------------------
# Faults: clients that go away, short deadlines


def fault_sse_disconnect(base: str, after_events: int) -> str:
    """Open a stream, read `after_events` events, hang up. Returns what the client saw."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 50."}],
        "max_tokens": 8,
        "stream": True,
    }
    with (
        httpx.Client(timeout=TIME_BOUND_S) as client,
        client.stream("POST", base + "/v1/chat/completions", json=body) as reply,
    ):
        seen = 0
        for line in reply.iter_lines():
            if seen >= after_events:
                break
            seen += line.startswith("data: ")
        return f"HTTP {reply.status_code}, hung up after {seen} events"


def fault_hang_up_before_reply(port: int) -> str:
    """Send a whole request, close before the reply."""
    data = encode({"model": MODEL, "messages": USER, "max_tokens": 8})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            raw_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], data, len(data))
        )
    return "closed right after sending"


def fault_partial_body(port: int) -> str:
    """Announce a body, send half of it, close."""
    data = encode({"model": MODEL, "messages": USER, "max_tokens": 8})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        request = raw_request("POST", "/v1/chat/completions", [("Content-Type", "application/json")], data, len(data))
        sock.sendall(request[: len(request) - len(data) // 2])
        time.sleep(0.05)
    return "closed mid-body"


def fault_grpc_cancel(channel: grpc.Channel) -> str:
    """Start a gRPC stream, cancel after the first chunk."""
    call = channel.unary_stream(SERVICE + "StreamChatCompletion")(
        valid_request_bytes(max_completion_tokens=8), timeout=TIME_BOUND_S
    )
    try:
        next(iter(call))
        call.cancel()
        return f"cancelled after one chunk: {call.code().name}"
    except grpc.RpcError as error:
        return f"{error.code().name} before the first chunk"  # type: ignore[attr-defined]


def fault_grpc_deadline(channel: grpc.Channel, deadline_s: float) -> str:
    """A unary call whose deadline expires while it runs."""
    try:
        channel.unary_unary(SERVICE + "CreateChatCompletion")(
            valid_request_bytes(max_completion_tokens=8), timeout=deadline_s
        )
        return "OK (finished within the deadline)"
    except grpc.RpcError as error:
        return f"{error.code().name}"  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Results


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
    }


def command() -> str:
    return os.environ.get("CHATWIRE_RELIABILITY_COMMAND") or "pytest " + " ".join(sys.argv[1:])


def summarize(durations: list[float]) -> dict[str, float]:
    if not durations:
        return {}
    ordered = sorted(durations)

    def pick(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99), "max_ms": round(1000 * ordered[-1], 1)}


class Results:
    """Every case's outcome, by family; what RELIABILITY.md reports."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.cases: Counter[str] = Counter()
        self.statuses: dict[str, Counter[str]] = defaultdict(Counter)
        self.durations: dict[str, list[float]] = defaultdict(list)
        self.violation_counts: Counter[str] = Counter()
        self.violations: list[dict[str, Any]] = []
        self.slowest: list[tuple[float, str, str, str]] = []
        self.faults: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        self.lock = threading.Lock()

    def record(self, family: str, description: str, outcome: Outcome, request: bytes | None = None) -> None:
        with self.lock:
            self.cases[family] += 1
            self.statuses[family][outcome.status] += 1
            self.durations[family].append(outcome.duration)
            entry = (outcome.duration, family, description[:160], outcome.status)
            if len(self.slowest) < 20:
                heapq.heappush(self.slowest, entry)
            else:
                heapq.heappushpop(self.slowest, entry)
            if outcome.violations:
                self.violation_counts[family] += 1
                if len(self.violations) < 2000:
                    self.violations.append(
                        {
                            "family": family,
                            "case": description[:300],
                            "status": outcome.status,
                            "problems": [p[:600] for p in outcome.violations],
                            "request": excerpt(request, 600) if request is not None else None,
                        }
                    )

    def fault(self, name: str, client_saw: str, next_request: str) -> None:
        """An injected fault: what its own client saw, and the status of the ordinary request sent right after."""
        with self.lock:
            self.faults[name]["client_saw"][client_saw] += 1
            self.faults[name]["next_request"][next_request] += 1

    def of_family(self, family: str) -> list[dict[str, Any]]:
        return [v for v in self.violations if v["family"] == family]

    def as_dict(self) -> dict[str, Any]:
        families = {
            name: {
                "cases": count,
                "violations": self.violation_counts[name],
                "statuses": dict(self.statuses[name].most_common()),
                "durations": summarize(self.durations[name]),
            }
            for name, count in self.cases.items()
        }
        total: Counter[str] = Counter()
        for counts in self.statuses.values():
            total.update(counts)
        return {
            "families": families,
            "statuses": dict(total.most_common()),
            "slowest": [
                {"duration_ms": round(1000 * d, 1), "family": f, "case": c, "status": s}
                for d, f, c, s in sorted(self.slowest, reverse=True)
            ],
            "violations": self.violations,
            "faults": {name: {k: dict(v) for k, v in seen.items()} for name, seen in self.faults.items()},
            "duration_s": round(time.monotonic() - self.started, 1),
        }


def write_results(kind: str, payload: dict[str, Any]) -> Path | None:
    """Write a run's results where CHATWIRE_RELIABILITY_OUT says (make fuzz / make soak), if anywhere."""
    out = os.environ.get("CHATWIRE_RELIABILITY_OUT")
    if not out:
        return None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"kind": kind, "machine": machine(), "command": command(), **payload}
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The run-level watch


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def envoy_pid(running: Stack) -> int | None:
    """Envoy's pid: the process started with this stack's Envoy config (conftest writes it beside the log)."""
    config = str(running.envoy_log.with_suffix(".yaml"))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\x00")
            except OSError:
                continue
            if config.encode() in argv:
                return int(proc.name)
    return None


class Watch:
    """Run-level checks around a fuzz or soak run: the engine worker never restarts, a canary request is served
    throughout, and at the end /health is 200 and no sequence is left running."""

    def __init__(self, running: Stack) -> None:
        self.stack = running
        self.workers: list[int] = []
        self.restarts_before: float | None = None
        self.canary_latencies: list[float] = []
        self.canary_failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._canary, name="canary", daemon=True)
        self.finished: dict[str, Any] | None = None

    def __enter__(self) -> Watch:
        self._start = time.monotonic()
        self.workers = sorted(engine_workers(self.stack.server_pid))
        self.restarts_before = metric(self.stack.ports.metrics, "chatwire_engine_restarts_total") or 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def _canary(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}
        url = f"{self.stack.base_url}/chat/completions"
        with httpx.Client(timeout=CANARY_BOUND_S) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    reply = client.post(url, json=body)
                    took = time.monotonic() - start
                    problem = _valid(reply.json(), "CreateChatCompletionResponse") if reply.status_code == 200 else None
                    if reply.status_code != 200 or problem or took > CANARY_BOUND_S:
                        self.canary_failures.append(
                            f"t={start - self._start:.0f}s HTTP {reply.status_code} in {took:.1f}s: "
                            f"{problem or excerpt(reply.content, 200)}"
                        )
                    else:
                        self.canary_latencies.append(took)
                except (httpx.HTTPError, ValueError) as error:
                    self.canary_failures.append(f"t={start - self._start:.0f}s {type(error).__name__}: {error}")
                self._stop.wait(max(0.0, CANARY_EVERY_S - (time.monotonic() - start)))

    def finish(self) -> dict[str, Any]:
        """Stop the canary and run the end-of-run checks (once); returns their findings."""
        if self.finished is not None:
            return self.finished
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(CANARY_BOUND_S + 5)
        problems = []
        workers_after = sorted(engine_workers(self.stack.server_pid))
        if workers_after != self.workers:
            problems.append(f"engine worker changed: {self.workers} -> {workers_after}")
        restarts = (metric(self.stack.ports.metrics, "chatwire_engine_restarts_total") or 0.0) - (
            self.restarts_before or 0.0
        )
        if restarts:
            problems.append(f"chatwire_engine_restarts_total rose by {restarts:.0f}")
        if self.canary_failures:
            problems.append(f"canary failed {len(self.canary_failures)} times: {self.canary_failures[:5]}")
        if not self.canary_latencies:
            problems.append("the canary was never served")
        # Requests in flight when the run ended (hung-up clients included) must drain.
        deadline = time.monotonic() + 30
        running = metric(self.stack.ports.metrics, "chatwire_running_sequences")
        queued = metric(self.stack.ports.metrics, "chatwire_queued_requests")
        while (running or queued) and time.monotonic() < deadline:
            time.sleep(0.5)
            running = metric(self.stack.ports.metrics, "chatwire_running_sequences")
            queued = metric(self.stack.ports.metrics, "chatwire_queued_requests")
        if running or queued:
            problems.append(f"still running after 30 s: {running} sequences, {queued} queued")
        health = httpx.get(f"http://127.0.0.1:{self.stack.ports.http}/health", timeout=10).status_code
        if health != 200:
            problems.append(f"/health is {health} at the end")
        self.finished = {
            "problems": problems,
            "workers_before": self.workers,
            "workers_after": workers_after,
            "engine_restarts": restarts,
            "running_sequences_at_end": running,
            "queued_requests_at_end": queued,
            "health_at_end": health,
            "canary": {
                "served": len(self.canary_latencies),
                "failed": len(self.canary_failures),
                "failures": self.canary_failures[:20],
                "latency": summarize(self.canary_latencies),
            },
        }
        return self.finished
