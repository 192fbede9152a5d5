"""Structured outputs and tool calls: JSON Schemas and tool lists to llguidance grammars, and tool calls out of
replies.

Guaranteed-valid JSON comes from constrained decoding: before each token is sampled, the engine masks every
token that would take the reply out of the grammar. Grammars are llguidance's (the library behind llama.cpp's
optional grammar backend, vLLM's and SGLang's): its JSON Schema compiler enforces by construction every keyword
of OpenAI's strict subset (numeric bounds and `multipleOf` included, which GBNF converters cannot express), its
grammars are checked here in the server before a request reaches the engine, and its work per token is bounded
by its own limits. A schema is walked first, so a keyword nobody enforces is refused with a 400 naming it and
its path.

Tool calls are written by the model as `<tool_call>{"name": "f", "arguments": {...}}</tool_call>` blocks,
constrained by a Lark grammar (llguidance's dialect) that inlines each tool's parameter schema; `ReplyParser`
turns the stream of text into content and tool-call pieces.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher, LLParserLimits

from chatwire_server.domain import Constraint
from chatwire_server.errors import InvalidRequestError, quote

# Keywords the grammar enforces, and annotations that constrain nothing.
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
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    }
)
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly", "writeOnly"}
)
# OpenAI's strict-mode formats, and `uri`, which llguidance enforces too.
ENFORCED_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"}
)
# llguidance's `date` admits any day 01-31 of any month, and year 0000 (`2021-02-29`, `1900-02-29`,
# `0000-01-01`); these admit only days of the Gregorian calendar, leap years included, in years 0001-9999 (as
# Python's `datetime.date` and the validators built on it). `date-time` is a real date, then RFC 3339's time as
# llguidance has it.
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_MONTH_DAY = (
    r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
# Divisible by 4 but not by 100 (the last two digits a non-zero multiple of 4), or by 400.
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
DATE_PATTERN = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
# Anchored: a JSON Schema pattern matches anywhere in the string unless it says otherwise.
CALENDAR_FORMATS = {"date": f"^{DATE_PATTERN}$", "date-time": f"^{DATE_PATTERN}[tT]{_TIME}$"}
# Keywords whose value is a map of subschemas, or a list of them.
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_HEAD, _CALL_MID = '{"name": "', '", "arguments": '
# JSON as a model writes it (and as the tools prompt shows it): one line, a space after ',' and ':'. Flexible
# whitespace would let a small model pad replies with newlines until max_tokens.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]


# Limits on the work one schema can cause (grammar size and compile time), OpenAI's own for strict schemas
# (platform.openai.com/docs/guides/structured-outputs, "Supported schemas"), plus bounds OpenAI leaves implicit.
MAX_SCHEMA_PROPERTIES = 5000  # object properties in all, OpenAI's limit
# Optional properties of one object: llguidance's parser holds about 4 items per optional key in one row of at
# most 2,000 (`max_items_in_row`); beyond, the reply fails after its first token. Required keys are not limited.
MAX_OPTIONAL_PROPERTIES = 500
MAX_ENUM_VALUES = 1000  # enum values across the schema, OpenAI's limit
MAX_SCHEMA_STRING_CHARS = 120_000  # property and definition names, enum and const values, OpenAI's limit
MAX_SCHEMA_DEPTH = 12  # nested subschemas: OpenAI allows 10 levels of nesting; `items` and `anyOf` count here too
MAX_SCHEMA_NODES = 10_000  # subschemas in all: every anyOf branch is a grammar alternative
MAX_PATTERN_CHARS = 1000  # one `pattern`
MAX_REPETITION = 1000  # a regex count `{m,n}`; a larger one is a grammar of that many states
# llguidance's own bounds on a grammar's work, set here rather than left to defaults: lexer states cost 1-2 kB
# each (its default, 250,000, would let one request take 500 MB), and the fuel of one token's mask computation
# is what a constrained choice can add to every decode step (100,000 is about 7 ms; real schemas use a
# fraction of a millisecond). A matcher that runs out fails its own request alone. Errors stay short.
GRAMMAR_LIMITS = LLParserLimits(max_lexer_states=50_000, step_lexer_fuel=100_000, verbose_errors=False)
_COUNTED_REPETITION = re.compile(r"(?<!\\)\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def check_schema(schema: Any, param: str) -> None:
    """Refuse a schema that is not one, that any part of the grammar could not enforce, or that exceeds the
    limits above: a 400 naming the keyword and its path."""
    _SchemaCheck(param).walk(schema, "", 0)


class _SchemaCheck:
    """One walk over a schema, counting what the limits bound."""

    def __init__(self, param: str) -> None:
        self.param = param
        self.counts: Counter[str] = Counter()  # properties, enum values, subschemas so far
        self.string_chars = 0

    def fail(self, message: str, code: str = "invalid_value") -> InvalidRequestError:
        return InvalidRequestError(message, param=self.param, code=code)

    def count(self, what: str, limit: int, name: str) -> None:
        self.counts[what] += 1
        if self.counts[what] > limit:
            raise self.fail(f"The schema has more {name} than the {limit} allowed.", code="schema_too_large")

    def chars(self, value: Any) -> None:
        self.string_chars += len(value) if isinstance(value, str) else len(json.dumps(value))
        if self.string_chars > MAX_SCHEMA_STRING_CHARS:
            raise self.fail(
                f"The schema's names, enum and const values exceed {MAX_SCHEMA_STRING_CHARS} characters in all.",
                code="schema_too_large",
            )

    def walk(self, schema: Any, path: str, depth: int) -> None:
        where = path or "/"
        if isinstance(schema, bool):
            return
        if not isinstance(schema, dict):
            raise self.fail(f"Invalid schema at '{where}': expected an object.")
        self.count("nodes", MAX_SCHEMA_NODES, "subschemas")
        if depth > MAX_SCHEMA_DEPTH:
            raise self.fail(
                f"The schema nests deeper than {MAX_SCHEMA_DEPTH} levels at '{where}'.", code="schema_too_large"
            )
        for key, value in schema.items():
            if key in ANNOTATIONS:
                continue
            if key not in ENFORCED_KEYWORDS:
                raise self.fail(
                    f"The JSON Schema keyword '{quote(key)}' at '{where}' cannot be enforced by this server; "
                    "remove it or express the constraint with supported keywords.",
                    code="unsupported_schema",
                )
            self.keyword(schema, key, value, path, depth)

    def keyword(self, schema: dict[str, Any], key: str, value: Any, path: str, depth: int) -> None:
        where = f"{path}/{key}"

        def expect(ok: bool, what: str) -> None:
            if not ok:
                raise self.fail(f"Invalid schema at '{where}': expected {what}.")

        if key == "properties" and isinstance(value, dict):
            required = schema.get("required")
            named = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
            optional = len(set(value) - named)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise self.fail(
                    f"The object at '{path or '/'}' has {optional} optional properties; at most "
                    f"{MAX_OPTIONAL_PROPERTIES} are allowed (list more of them in 'required').",
                    code="schema_too_large",
                )
        if key == "type":
            names = value if isinstance(value, list) else [value]
            expect(
                bool(names) and all(isinstance(t, str) and t in _TYPES for t in names),
                "a JSON type name or a list of them",
            )
        elif key in _SCHEMA_MAPS:
            expect(isinstance(value, dict), "an object of schemas")
            for name, sub in value.items():
                if key == "properties":
                    self.count("properties", MAX_SCHEMA_PROPERTIES, "object properties")
                self.chars(name)
                self.walk(sub, f"{where}/{name}", depth + 1)
        elif key in _SCHEMA_LISTS:
            expect(isinstance(value, list) and (bool(value) or key == "prefixItems"), "a non-empty array of schemas")
            for i, sub in enumerate(value):
                self.walk(sub, f"{where}/{i}", depth + 1)
        elif key == "items" and isinstance(value, list):  # draft 4's tuple form
            for i, sub in enumerate(value):
                self.walk(sub, f"{where}/{i}", depth + 1)
        elif key in ("items", "additionalProperties"):
            expect(isinstance(value, dict | bool), "a schema or a boolean")
            self.walk(value, where, depth + 1)
        elif key == "required":
            expect(isinstance(value, list) and all(isinstance(v, str) for v in value), "an array of property names")
        elif key == "enum":
            expect(isinstance(value, list), "an array")
            for item in value:
                self.count("enum_values", MAX_ENUM_VALUES, "enum values")
                self.chars(item)
        elif key == "const":
            self.chars(value)
        elif key in _COUNTS:
            expect(isinstance(value, int) and not isinstance(value, bool) and value >= 0, "a non-negative integer")
        elif key in _NUMBERS:
            expect(isinstance(value, int | float) and not isinstance(value, bool), "a number")
            expect(key != "multipleOf" or value > 0, "a number greater than 0")
        elif key == "pattern":
            expect(
                isinstance(value, str) and len(value) <= MAX_PATTERN_CHARS,
                f"a regex of at most {MAX_PATTERN_CHARS} characters",
            )
            self.pattern(value, where)
        elif key == "format":
            if value not in ENFORCED_FORMATS:
                raise self.fail(
                    f"The string format '{quote(value)}' at '{path or '/'}' cannot be enforced by this server "
                    f"(supported: {', '.join(sorted(ENFORCED_FORMATS))}).",
                    code="unsupported_schema",
                )
        elif key == "$ref":
            if not isinstance(value, str) or not (value == "#" or value.startswith("#/")):
                raise self.fail(
                    f"Only local references ('#/...') are supported; got '{quote(value)}' at '{path or '/'}'.",
                    code="unsupported_schema",
                )

    def pattern(self, pattern: str, where: str) -> None:
        for match in _COUNTED_REPETITION.finditer(pattern):
            counts = [int(c) for c in match.groups() if c]
            if max(counts) > MAX_REPETITION:
                raise self.fail(
                    f"The pattern at '{where}' repeats up to {max(counts)} times; at most {MAX_REPETITION} is allowed.",
                    code="schema_too_large",
                )


def _prepared(schema: Any) -> Any:
    """The schema as the JSON compiler should see it. `additionalProperties: false` wherever an object lists
    `properties` and says nothing about others: a reply never holds keys the schema does not name (valid output
    either way, and what OpenAI's strict mode requires of every object). `date` and `date-time` formats as
    patterns of real dates (CALENDAR_FORMATS), beside any pattern of the schema's own (llguidance intersects
    them)."""
    if isinstance(schema, list):  # draft 4's tuple `items`
        return [_prepared(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: _prepared(value[name]) for name in _in_order(value, schema.get("required"))}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            closed[key] = [_prepared(sub) for sub in value]
        elif key in ("items", "additionalProperties"):
            closed[key] = _prepared(value)
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    if (calendar := CALENDAR_FORMATS.get(str(schema.get("format")))) is not None:
        del closed["format"]
        if "pattern" in closed:
            closed["allOf"] = [*closed.get("allOf", []), {"pattern": calendar}]
        else:
            closed["pattern"] = calendar
    return closed


def _in_order(names: dict[str, Any], required: Any) -> list[str]:
    """An object's property names in the order its replies write them: those in `required` in its order, then the
    rest by name. The JSON compiler emits properties in the order it reads them, and a schema that came through
    gRPC as a `Struct` (a map) has lost its order, differently in every process: the same seeded request got
    other JSON from every replica and restart. `required` is a list, so its order survives (strict schemas list
    every property there)."""
    rank = {name: i for i, name in enumerate(required)} if isinstance(required, list) else {}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def _compiled(schema: Any, param: str) -> dict[str, Any]:
    """A checked schema, closed and laid out for the JSON compiler."""
    check_schema(schema, param)
    return {**_prepared(schema), "x-guidance": _JSON_LAYOUT}


def _grammar(build: Any, source: Any, param: str) -> str:
    """llguidance's grammar from a schema or Lark text; what it cannot take (an integer beyond 64 bits) is a 400."""
    try:
        return str(build(source))
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(
            f"The schema cannot be enforced: {exc}", param=param, code="unsupported_schema"
        ) from None


def _validated(grammar: str, param: str) -> Constraint:
    error = LLMatcher.validate_grammar(grammar, limits=GRAMMAR_LIMITS)
    if error:
        raise InvalidRequestError(f"The schema cannot be enforced: {error}", param=param, code="unsupported_schema")
    return Constraint(grammar, param)


def json_constraint(schema: dict[str, Any] | None, param: str) -> Constraint:
    """Replies are JSON text valid against `schema`; no schema means any JSON object."""
    schema = {"type": "object"} if schema is None else schema
    return _validated(_grammar(LLMatcher.grammar_from_json_schema, _compiled(schema, param), param), param)


def tool_call_constraint(tools: list[Tool], choice: str, *, parallel: bool) -> Constraint:
    """Replies that call `tools` as `tool_choice` says: `required`, one or more `<tool_call>` blocks (one
    without `parallel`); a function's name, exactly one call to it; `auto`, free text, constrained only from
    the moment the model opens a call."""
    calls = []
    for i, tool in enumerate(tools):
        if choice in ("auto", "required", tool.name):
            param = f"tools[{i}].function.parameters"
            arguments = _compiled(tool.parameters, param)
            _validated(_grammar(LLMatcher.grammar_from_json_schema, arguments, param), param)  # names the tool
            calls.append(f'{_lark_literal(_CALL_HEAD + tool.name + _CALL_MID)} %json {json.dumps(arguments)} "}}"')
    open_tag, close_tag = _lark_literal(TOOL_CALL_OPEN), _lark_literal(TOOL_CALL_CLOSE)
    more = r' ("\n" call)*' if parallel and choice in ("auto", "required") else ""
    rules = ["%llguidance {}", f"body: {' | '.join(calls)}", f"call: {open_tag} body {close_tag}"]
    if choice == "auto":
        # Any text; the lazy lexeme ends at the first `<tool_call>`, and from there the call must be well formed.
        rules += [r"TEXT: /(.|\n)*/", f"opened[lazy]: TEXT {open_tag}", f"start: TEXT | opened body {close_tag}{more}"]
    else:
        rules.append(f"start: call{more}")
    return _validated(_grammar(LLMatcher.grammar_from_lark, "\n".join(rules), "tools"), "tools")


def _lark_literal(text: str) -> str:
    # JSON string syntax is Lark's string literal syntax for the characters tool names and tags use.
    return json.dumps(text)


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
