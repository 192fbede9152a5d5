"""Structured outputs and tool calls: JSON Schemas to llama.cpp grammars, and tool calls out of replies.

Guaranteed-valid JSON comes from grammar-constrained decoding: every sampled token must keep the text inside
the grammar. Grammars are llama.cpp's GBNF, converted from JSON Schema by llama-cpp-python's converter (a
port of llama.cpp's own), because they run inside the llama.cpp sampler chain we already use per sequence:
no second tokenizer, no extra dependency. The converter does not understand every JSON Schema keyword, so a
schema is checked first and any keyword it would silently drop is refused with a 400.

Tool calls are written by the model as `<tool_call>{"name": "f", "arguments": {...}}</tool_call>` blocks,
constrained by a grammar built from the tools' parameter schemas; `ReplyParser` turns the stream of text into
content and tool-call pieces.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from chatwire_server.errors import InvalidRequestError

# Keywords the converter enforces, and annotations that constrain nothing.
ENFORCED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
    }
)
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
ENFORCED_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_HEAD, _CALL_MID = '{"name": "', '", "arguments": '
# llama.cpp's lazy grammars start constraining when the generated text matches this; group 1 marks where.
TOOL_CALL_TRIGGER = r"[\s\S]*?(<tool_call>)[\s\S]*"


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]


def check_schema(schema: Any, param: str, path: str = "") -> None:
    """Refuse a schema any part of which the grammar could not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"Invalid schema at '{path or '/'}': expected an object.", param=param)
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key not in ENFORCED_KEYWORDS:
            raise InvalidRequestError(
                f"The JSON Schema keyword '{key}' at '{path or '/'}' cannot be enforced by this server; "
                "remove it or express the constraint with supported keywords.",
                param=param,
                code="unsupported_schema",
            )
        if key == "format" and value not in ENFORCED_FORMATS:
            raise InvalidRequestError(
                f"The string format '{value}' at '{path or '/'}' cannot be enforced by this server "
                f"(supported: {', '.join(sorted(ENFORCED_FORMATS))}).",
                param=param,
                code="unsupported_schema",
            )
        if key == "$ref" and not str(value).startswith("#/"):
            raise InvalidRequestError(
                f"Only local references ('#/...') are supported; got '{value}' at '{path or '/'}'.",
                param=param,
                code="unsupported_schema",
            )
        if key in ("properties", "$defs", "definitions"):
            for name, sub in value.items():
                check_schema(sub, param, f"{path}/{key}/{name}")
        elif key in ("items", "additionalProperties") and isinstance(value, dict | bool):
            check_schema(value, param, f"{path}/{key}")
        elif key in ("prefixItems", "anyOf", "oneOf", "allOf", "items"):
            for i, sub in enumerate(value):
                check_schema(sub, param, f"{path}/{key}/{i}")


# The converter's string characters admit raw control characters (and its regex `.` admits quotes), which
# JSON forbids inside strings; llama.cpp's own converter excludes them, and so do we.
_JSON_SAFE_CHAR = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_JSON_SAFE_DOT = r'[^"\\\x7F\x00-\x1F]'


def _converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _grammar_text(converter: SchemaConverter) -> str:
    """The converter's rules as GBNF, with JSON-safe string characters."""
    for rule, safe in (("char", _JSON_SAFE_CHAR), ("dot", _JSON_SAFE_DOT)):
        if rule in converter._rules:
            converter._rules[rule] = safe
    return str(converter.format_grammar())


def json_grammar(schema: dict[str, Any] | None, param: str) -> str:
    """The grammar of JSON text valid against `schema`; no schema means any JSON object."""
    schema = {"type": "object"} if schema is None else schema
    check_schema(schema, param)
    converter = _converter()
    try:
        converter.visit(converter.resolve_refs(schema, "schema"), "")
    except Exception as exc:  # the converter rejects what it cannot translate (a bad ref, an odd pattern)
        raise InvalidRequestError(
            f"The schema cannot be enforced: {exc}", param=param, code="unsupported_schema"
        ) from None
    return _grammar_text(converter)


def tool_call_grammar(tools: list[Tool], *, parallel: bool) -> str:
    """The grammar of one (or, with `parallel`, several) `<tool_call>` blocks calling `tools`."""
    converter = _converter()
    calls = []
    for i, tool in enumerate(tools):
        param = f"tools[{i}].function.parameters"
        check_schema(tool.parameters, param)
        try:
            args = converter.visit(converter.resolve_refs(tool.parameters, f"tool-{i}"), f"tool-{i}-arguments")
        except Exception as exc:
            raise InvalidRequestError(
                f"The schema cannot be enforced: {exc}", param=param, code="unsupported_schema"
            ) from None
        head = converter._format_literal(f"{_CALL_HEAD}{tool.name}{_CALL_MID}")
        calls.append(converter._add_rule(f"tool-{i}-call", f"{head} {args} {converter._format_literal('}')}"))
    open_tag, close_tag = converter._format_literal(TOOL_CALL_OPEN), converter._format_literal(TOOL_CALL_CLOSE)
    block = converter._add_rule("tool-call-block", f"{open_tag} ( {' | '.join(calls)} ) {close_tag}")
    converter._add_rule("root", f'{block} ( "\\n" {block} )*' if parallel else block)
    return _grammar_text(converter)


def tools_prompt(tools: list[Tool], choice: str | None) -> str:
    """System-prompt text that shows the model its tools and how to call them."""
    listing = json.dumps(
        [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools], indent=None
    )
    lines = [
        "You can call these functions:",
        listing,
        f'To call a function, reply with {TOOL_CALL_OPEN}{{"name": "<function name>", "arguments": '
        f"{{<arguments as JSON>}}}}{TOOL_CALL_CLOSE}.",
    ]
    if choice == "required":
        lines.append("You must call at least one function.")
    elif choice:
        lines.append(f"Call the function {choice}.")
    return "\n".join(lines)


def render_tool_call(name: str, arguments: str) -> str:
    """An earlier assistant tool call, written as the model writes one."""
    return f"{TOOL_CALL_OPEN}{_CALL_HEAD}{name}{_CALL_MID}{arguments}}}{TOOL_CALL_CLOSE}"


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ContentPiece:
    """Plain reply text."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A tool call begins: its position among the choice's calls, id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """The next piece of a tool call's JSON arguments."""

    index: int
    text: str


ReplyPiece = ContentPiece | ToolCallStart | ToolCallArguments


class ReplyParser:
    """Splits a streamed reply into content and tool calls, emitting each piece as soon as it is certain."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "text"
        self.calls = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[ReplyPiece]:
        self._buffer += text
        pieces: list[ReplyPiece] = []
        while True:
            before = (self._state, len(self._buffer))
            getattr(self, f"_in_{self._state}")(pieces)
            if (self._state, len(self._buffer)) == before:
                return pieces

    def finish(self) -> list[ReplyPiece]:
        """The end of the reply: text held back in case it began a tool call is content after all, unless
        it is the cut-off start of one more call after earlier calls."""
        rest, self._buffer = self._buffer, ""
        if not rest or self._state != "text" or (self.calls and TOOL_CALL_OPEN.startswith(rest.lstrip())):
            return []
        return [ContentPiece(rest)]

    def _in_text(self, pieces: list[ReplyPiece]) -> None:
        at = self._buffer.find(TOOL_CALL_OPEN)
        if at >= 0:
            text, self._buffer = self._buffer[:at], self._buffer[at + len(TOOL_CALL_OPEN) :]
            self._state = "head"
        else:
            hold = next(
                (
                    n
                    for n in range(min(len(TOOL_CALL_OPEN) - 1, len(self._buffer)), 0, -1)
                    if self._buffer.endswith(TOOL_CALL_OPEN[:n])
                ),
                0,
            )
            text = self._buffer[: len(self._buffer) - hold]
            self._buffer = self._buffer[len(text) :]
        if text and not (self.calls and not text.strip()):
            pieces.append(ContentPiece(text))

    def _in_head(self, pieces: list[ReplyPiece]) -> None:
        end = self._buffer.find(_CALL_MID, len(_CALL_HEAD))
        if self._buffer.startswith(_CALL_HEAD) and end >= 0:
            pieces.append(ToolCallStart(self.calls, new_call_id(), self._buffer[len(_CALL_HEAD) : end]))
            self._buffer = self._buffer[end + len(_CALL_MID) :]
            self._state, self._depth, self._in_string, self._escaped = "arguments", 0, False, False

    def _in_arguments(self, pieces: list[ReplyPiece]) -> None:
        for i, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    pieces.append(ToolCallArguments(self.calls, self._buffer[: i + 1]))
                    self._buffer = self._buffer[i + 1 :]
                    self._state = "tail"
                    return
        if self._buffer:
            pieces.append(ToolCallArguments(self.calls, self._buffer))
            self._buffer = ""

    def _in_tail(self, pieces: list[ReplyPiece]) -> None:
        end = self._buffer.find(TOOL_CALL_CLOSE)
        if end >= 0:
            self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE) :]
            self.calls += 1
            self._state = "text"
