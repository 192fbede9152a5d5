"""Protobuf <-> domain: request validation in one place, and the response messages.

Validation follows OpenAI's types and ranges; every failure names the offending field in `param`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import models_pb2
from chatwire_server import structured
from chatwire_server.domain import ChatMessage, ChatRequest, Constraint, Finished, SamplingParams, TokenLogprob
from chatwire_server.errors import InvalidRequestError, quote
from chatwire_server.registry import INPUT_KINDS, ModelEntry

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_STOP_SEQUENCES = 4
# Bounds on the work one request can cause before the engine sees it (templating, tokenizing, grammars); each
# is far above what fits a model's context, so no request that could be served is refused.
MAX_MESSAGES = 4096  # a chat template renders every message: a prompt that fits holds far fewer
MAX_CONTENT_PARTS = 4096  # content parts in all messages together
MAX_STOP_CHARS = 1024  # one stop sequence; every token is checked against it
MAX_TOOLS = 128  # OpenAI's limit
_TOKEN_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() takes "²" and "①"


def chat_request_from_proto(request: pb.CreateChatCompletionRequest) -> ChatRequest:
    """Validate a request and turn it into the domain model."""
    _check_bounds(request)
    _reject_unsupported(request)
    _check_accepted_fields(request)
    messages = _messages_from_proto(request.messages)
    tools = _tools(request)
    choice = _tool_choice(request, tools)
    constraint = _response_format_constraint(request)
    repeat_stop = None
    if choice != "none":
        if constraint is not None:
            raise InvalidRequestError(
                "'response_format' cannot be combined with tool calls; set 'tool_choice' to 'none' or drop "
                "'response_format'.",
                param="response_format",
                code="unsupported_parameter",
            )
        parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        constraint = structured.tool_call_constraint(tools, choice, parallel=parallel)
        # The reply ends when a call repeats an earlier one word for word: a small model repeats itself.
        repeat_stop = (structured.TOOL_CALL_OPEN, structured.TOOL_CALL_CLOSE)
        messages = _with_system_text(messages, structured.tools_prompt(tools, None if choice == "auto" else choice))
    sampling = dataclasses.replace(
        _sampling_from_proto(request), constraint=constraint, stop_at_repeated_block=repeat_stop
    )
    return ChatRequest(
        model=request.model,
        messages=messages,
        sampling=sampling,
        n=_int_in_range(request, "n", 1, 128, default=1),
        include_usage=request.stream_options.include_usage,
        top_logprobs=_top_logprobs(request),
        tool_calls=choice != "none",
        prediction=_prediction(request),
    )


def reply_bounds(request: pb.CreateChatCompletionRequest) -> tuple[int, int | None, int]:
    """What a token budget reserves by, read before validation (out-of-range values are refused later, and a
    refused request is charged nothing): the request's size in bytes, its replies' token maximum if it sets one,
    and its number of choices."""
    if request.HasField("max_completion_tokens"):
        maximum: int | None = max(0, request.max_completion_tokens)
    elif request.HasField("max_tokens"):
        maximum = max(0, request.max_tokens)
    else:
        maximum = None
    choices = min(max(request.n, 1), 128) if request.HasField("n") else 1
    return request.ByteSize(), maximum, choices


def relay_request_from_proto(
    request: pb.CreateChatCompletionRequest, inputs: frozenset[str] = frozenset(INPUT_KINDS)
) -> dict[str, Any]:
    """Check what chatwire answers for whichever engine serves the model (OpenAI's types, ranges and enums, the
    bounds on one request's size, and content parts only of the kinds in `inputs`, what the model's entry says
    it reads), and give the request back as the OpenAI JSON it came as, for a server that decides the rest: the
    parts it reads, its tools and response formats."""
    _check_bounds(request)
    for i, message in enumerate(request.messages):
        _check_role(f"messages[{i}]", message)
        _check_part_kinds(f"messages[{i}]", message, inputs)
    _check_accepted_fields(request)
    _sampling_from_proto(request)
    _int_in_range(request, "n", 1, 128, default=1)
    _top_logprobs(request)
    body = _plain_json(json_format.MessageToDict(request, preserving_proto_field_name=True))
    if "seed" in body:  # protobuf prints int64 fields as strings
        body["seed"] = int(body["seed"])
    for message in body["messages"]:
        for call in message.get("tool_calls", ()):
            # Protobuf drops empty strings; a call without arguments has `""`, which servers require.
            call.setdefault("function", {}).setdefault("arguments", "")
    return body


def _check_part_kinds(where: str, message: pb.ChatCompletionRequestMessage, inputs: frozenset[str]) -> None:
    """A 400 naming the first content part of a kind the model does not read (an image for a text-only model):
    its server would fail on it, often with a 500."""
    if len(inputs) == len(INPUT_KINDS) or not message.content.HasField("list_value"):
        return
    refused = {INPUT_KINDS[kind]: kind for kind in INPUT_KINDS.keys() - inputs}
    for j, part in enumerate(message.content.list_value.values):
        kind = part.struct_value.fields["type"].string_value if "type" in part.struct_value.fields else ""
        if kind in refused:
            readable = " and ".join(sorted(inputs))
            raise InvalidRequestError(
                f"'{where}.content[{j}]' is of type '{kind}', but this model only accepts {readable}.",
                param=f"{where}.content[{j}]",
                code="unsupported_content_type",
            )


def _plain_json(value: Any) -> Any:
    """Whole numbers as ints: protobuf keeps every JSON number of a Struct or Value (a tool's `maxItems`) as a
    double."""
    if isinstance(value, dict):
        return {k: _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_bounds(request: pb.CreateChatCompletionRequest) -> None:
    """A model, messages, and no more messages, content parts or tools than any served request needs."""
    if not request.model:
        raise InvalidRequestError("you must provide a model parameter", param="model")
    if not request.messages:
        raise InvalidRequestError(
            "'messages' must be a non-empty array of messages", param="messages", code="empty_array"
        )
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidRequestError(
            f"Invalid 'messages': at most {MAX_MESSAGES} messages are allowed, got {len(request.messages)}.",
            param="messages",
            code="array_above_max_length",
        )
    parts = sum(len(m.content.list_value.values) for m in request.messages if m.content.HasField("list_value"))
    if parts > MAX_CONTENT_PARTS:
        raise InvalidRequestError(
            f"Invalid 'messages': at most {MAX_CONTENT_PARTS} content parts are allowed in all, got {parts}.",
            param="messages",
            code="array_above_max_length",
        )
    if len(request.tools) > MAX_TOOLS:
        raise InvalidRequestError(
            f"Invalid 'tools': at most {MAX_TOOLS} tools are allowed, got {len(request.tools)}.",
            param="tools",
            code="array_above_max_length",
        )


def _messages_from_proto(messages: Sequence[pb.ChatCompletionRequestMessage]) -> tuple[ChatMessage, ...]:
    """Every message, with tool messages checked against the tool calls made before them."""
    converted: list[ChatMessage] = []
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        call_ids.update(call.id for call in message.tool_calls)
        if message.role == "tool" and message.tool_call_id and message.tool_call_id not in call_ids:
            raise InvalidRequestError(
                f"'messages[{i}].tool_call_id' ('{quote(message.tool_call_id)}') answers no tool call of an earlier "
                "assistant message.",
                param=f"messages[{i}].tool_call_id",
                code="invalid_value",
            )
        converted.append(_message_from_proto(i, message))
    return tuple(converted)


def _with_system_text(messages: tuple[ChatMessage, ...], text: str) -> tuple[ChatMessage, ...]:
    """Add `text` to the leading system (or developer) message, or put a system message first."""
    first = messages[0]
    if first.role in ("system", "developer"):
        return (dataclasses.replace(first, content=f"{first.content or ''}\n\n{text}"), *messages[1:])
    return (ChatMessage(role="system", content=text), *messages)


def _tools(request: pb.CreateChatCompletionRequest) -> list[structured.Tool]:
    tools: list[structured.Tool] = []
    for i, tool in enumerate(request.tools):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise InvalidRequestError(
                f"'{where}.type' is '{quote(tool.type)}'; only 'function' tools are supported.",
                param=f"{where}.type",
                code="unsupported_parameter",
            )
        name = tool.function.name
        if not structured.NAME_PATTERN.match(name):
            raise InvalidRequestError(
                f"Invalid '{where}.function.name': '{quote(name)}' must be 1-64 letters, digits, '_' or '-'.",
                param=f"{where}.function.name",
                code="invalid_value",
            )
        if any(t.name == name for t in tools):
            raise InvalidRequestError(
                f"Duplicate function name '{name}' in 'tools'.", param=f"{where}.function.name", code="invalid_value"
            )
        parameters = (
            _json_value(tool.function.parameters)
            if tool.function.HasField("parameters")
            else {"type": "object", "properties": {}}
        )
        tools.append(structured.Tool(name, tool.function.description, parameters))
    return tools


def _tool_choice(request: pb.CreateChatCompletionRequest, tools: list[structured.Tool]) -> str:
    """`none`, `auto`, `required`, or the name of the one function to call."""
    value = request.tool_choice
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        choice = "auto" if tools else "none"
    elif kind == "string_value" and value.string_value in ("none", "auto", "required"):
        choice = value.string_value
    elif kind == "struct_value":
        named = json_format.MessageToDict(value.struct_value)
        function = named.get("function")
        if named.get("type") != "function" or not isinstance(function, dict) or "name" not in function:
            raise InvalidRequestError(
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
                code="invalid_value",
            )
        choice = str(function["name"])
        if not any(t.name == choice for t in tools):
            raise InvalidRequestError(
                f"'tool_choice' names the function '{quote(choice)}', which is not in 'tools'.",
                param="tool_choice.function.name",
                code="invalid_value",
            )
    else:
        raise InvalidRequestError(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or a function.",
            param="tool_choice",
            code="invalid_value",
        )
    if choice != "none" and not tools:
        raise InvalidRequestError(
            f"'tool_choice' is '{choice}' but no 'tools' were given.", param="tool_choice", code="invalid_value"
        )
    return choice


def _json_value(struct: struct_pb2.Struct) -> Any:
    """A Struct as plain JSON data, whole numbers as ints (protobuf stores every JSON number as a double)."""

    def restore(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json_format.MessageToDict(struct))


def _response_format_constraint(request: pb.CreateChatCompletionRequest) -> Constraint | None:
    """The constraint `response_format` asks for, or None for free text."""
    kind = request.response_format.type
    if kind in ("", "text"):
        return None
    if kind == "json_object":
        return structured.json_constraint(None, "response_format")
    if kind == "json_schema":
        spec = request.response_format.json_schema
        if not structured.NAME_PATTERN.match(spec.name):
            raise InvalidRequestError(
                "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'.",
                param="response_format.json_schema.name",
                code="invalid_value",
            )
        schema = _json_value(spec.schema) if spec.HasField("schema") else None
        return structured.json_constraint(schema, "response_format.json_schema.schema")
    raise InvalidRequestError(
        f"Invalid 'response_format.type': '{quote(kind)}'; expected 'text', 'json_object' or 'json_schema'.",
        param="response_format.type",
        code="invalid_value",
    )


def _top_logprobs(request: pb.CreateChatCompletionRequest) -> int | None:
    top = _int_in_range(request, "top_logprobs", 0, 20, default=0)
    if request.HasField("top_logprobs") and not request.logprobs:
        raise InvalidRequestError(
            "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs", code="invalid_value"
        )
    return top if request.logprobs else None


# Enumerated string fields: accepted values (OpenAI's), validated even where they change nothing here.
ENUMS = {
    "service_tier": ("auto", "default", "flex", "scale", "priority", "fast"),
    "reasoning_effort": ("none", "minimal", "low", "medium", "high", "xhigh", "max"),
    "verbosity": ("low", "medium", "high"),
    "prompt_cache_retention": ("in_memory", "24h"),
}
METADATA_MAX_PAIRS, METADATA_MAX_KEY, METADATA_MAX_VALUE = 16, 64, 512
SAFETY_IDENTIFIER_MAX = 64


def _check_accepted_fields(request: pb.CreateChatCompletionRequest) -> None:
    """Fields that do not steer generation here are still checked against OpenAI's types and limits."""
    for name, allowed in ENUMS.items():
        value = getattr(request, name)
        if request.HasField(name) and value not in allowed:
            raise InvalidRequestError(
                f"Invalid value for '{name}': expected one of {', '.join(allowed)}; got '{quote(value)}'.",
                param=name,
                code="invalid_value",
            )
    if len(request.metadata) > METADATA_MAX_PAIRS:
        raise InvalidRequestError(
            f"'metadata' may hold at most {METADATA_MAX_PAIRS} pairs.", param="metadata", code="invalid_value"
        )
    for key, value in request.metadata.items():
        if len(key) > METADATA_MAX_KEY or len(value) > METADATA_MAX_VALUE:
            raise InvalidRequestError(
                f"'metadata' keys are at most {METADATA_MAX_KEY} characters and values at most {METADATA_MAX_VALUE}.",
                param=f"metadata.{key[:METADATA_MAX_KEY]}",
                code="invalid_value",
            )
    if len(request.safety_identifier) > SAFETY_IDENTIFIER_MAX:
        raise InvalidRequestError(
            f"'safety_identifier' is at most {SAFETY_IDENTIFIER_MAX} characters.",
            param="safety_identifier",
            code="invalid_value",
        )


def _reject_unsupported(request: pb.CreateChatCompletionRequest) -> None:
    """Features this server does not implement yet get a 400, never a silent no-op."""
    if len(request.functions) or request.HasField("function_call"):
        raise InvalidRequestError(
            "'functions' and 'function_call' are deprecated and not supported here; send the same functions "
            "as 'tools' (type 'function') and use 'tool_choice'.",
            param="functions" if len(request.functions) else "function_call",
            code="unsupported_parameter",
        )
    unsupported = {
        "audio": request.HasField("audio"),
        "web_search_options": request.HasField("web_search_options"),
        "moderation": request.HasField("moderation"),
    }
    for param, present in unsupported.items():
        if present:
            raise InvalidRequestError(
                f"'{param}' is not supported by this server yet.", param=param, code="unsupported_parameter"
            )
    if any(m != "text" for m in request.modalities):
        raise InvalidRequestError(
            "This model only produces text: 'modalities' may only contain 'text'.", param="modalities"
        )


def _prediction(request: pb.CreateChatCompletionRequest) -> str | None:
    """The predicted reply's text (a string, or text parts joined), None without a prediction."""
    if not request.HasField("prediction"):
        return None
    prediction = request.prediction
    if prediction.type != "content":
        raise InvalidRequestError(
            f"Invalid value for 'prediction.type': expected 'content', got {quote(prediction.type)}.",
            param="prediction.type",
            code="invalid_value",
        )
    kind = prediction.content.WhichOneof("kind")
    if kind == "string_value":
        return prediction.content.string_value
    if kind != "list_value":
        raise InvalidRequestError(
            "Invalid type for 'prediction.content': expected a string or an array of text parts.",
            param="prediction.content",
            code="invalid_type",
        )
    texts = []
    for j, value in enumerate(prediction.content.list_value.values):
        where = f"prediction.content[{j}]"
        kind = value.struct_value.fields["type"].string_value if value.HasField("struct_value") else "text"
        if kind != "text":  # a refusal part is no prediction of the reply's text
            raise InvalidRequestError(
                f"Invalid content part '{where}': a prediction's parts are of type 'text'.",
                param=where,
                code="invalid_value",
            )
        texts.append(_part_text(where, value))
    return "".join(texts)


def _message_from_proto(index: int, message: pb.ChatCompletionRequestMessage) -> ChatMessage:
    where = f"messages[{index}]"
    _check_role(where, message)
    content = _content_text(where, message)
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidRequestError(
            f"'{where}.tool_call_id' is required for tool messages.", param=f"{where}.tool_call_id"
        )
    if message.role == "function" and not message.name:
        raise InvalidRequestError(f"'{where}.name' is required for function messages.", param=f"{where}.name")
    # Earlier tool calls are shown to the model as it writes them itself.
    calls = "".join(structured.render_tool_call(c.function.name, c.function.arguments) for c in message.tool_calls)
    return ChatMessage(
        role=message.role,
        content=(content or "") + calls if calls else content,
        name=message.name if message.HasField("name") else None,
        tool_call_id=message.tool_call_id if message.HasField("tool_call_id") else None,
    )


def _check_role(where: str, message: pb.ChatCompletionRequestMessage) -> None:
    if message.role not in ROLES:
        raise InvalidRequestError(
            f"Invalid value for '{where}.role': expected one of {', '.join(ROLES)}; got '{quote(message.role)}'.",
            param=f"{where}.role",
            code="invalid_value",
        )


def _content_text(where: str, message: pb.ChatCompletionRequestMessage) -> str | None:
    """The message's text: a string, or the text parts of an array joined; null only where OpenAI allows."""
    kind = message.content.WhichOneof("kind")
    may_be_null = message.role in ("assistant", "function")
    if kind is None or kind == "null_value":
        if may_be_null:
            return None
        raise InvalidRequestError(
            f"'{where}.content' is required for {message.role} messages.", param=f"{where}.content"
        )
    if kind == "string_value":
        return message.content.string_value
    if kind != "list_value":
        raise InvalidRequestError(
            f"Invalid type for '{where}.content': expected a string or an array of content parts.",
            param=f"{where}.content",
            code="invalid_type",
        )
    parts = message.content.list_value.values
    if not parts and not may_be_null:
        raise InvalidRequestError(f"'{where}.content' must not be an empty array.", param=f"{where}.content")
    texts = []
    for j, value in enumerate(parts):
        texts.append(_part_text(f"{where}.content[{j}]", value))
    return "".join(texts)


def _part_text(where: str, value: struct_pb2.Value) -> str:
    if value.WhichOneof("kind") != "struct_value":
        raise InvalidRequestError(f"Invalid type for '{where}': expected an object.", param=where, code="invalid_type")
    part = pb.ChatCompletionRequestMessageContentPart()
    try:
        json_format.ParseDict(json_format.MessageToDict(value.struct_value), part)
    except json_format.ParseError as exc:
        raise InvalidRequestError(f"Invalid content part '{where}': {exc}", param=where) from None
    if part.type == "text" and part.HasField("text"):
        return part.text
    if part.type == "refusal" and part.HasField("refusal"):
        return part.refusal
    if part.type in ("image_url", "input_audio", "file"):
        raise InvalidRequestError(
            f"'{where}' is of type '{part.type}', but this model only accepts text.",
            param=where,
            code="unsupported_content_type",
        )
    raise InvalidRequestError(
        f"Invalid content part '{where}': expected type 'text' with a 'text' field.", param=where, code="invalid_value"
    )


def _sampling_from_proto(request: pb.CreateChatCompletionRequest) -> SamplingParams:
    # max_completion_tokens is OpenAI's current name; it wins over the deprecated max_tokens.
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        if request.HasField(name):
            max_tokens = _int_in_range(request, name, 1, 2**31 - 1)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float_in_range(request, "temperature", 0.0, 2.0, default=1.0),
        top_p=_float_in_range(request, "top_p", 0.0, 1.0, default=1.0),
        top_k=_int_in_range(request, "top_k", 0, 2**31 - 1, default=0),
        min_p=_float_in_range(request, "min_p", 0.0, 1.0, default=0.0),
        seed=request.seed if request.HasField("seed") else None,
        stop=_stop_sequences(request.stop),
        frequency_penalty=_float_in_range(request, "frequency_penalty", -2.0, 2.0, default=0.0),
        presence_penalty=_float_in_range(request, "presence_penalty", -2.0, 2.0, default=0.0),
        logit_bias=_logit_bias(request),
        repetition_penalty=_float_in_range(request, "repetition_penalty", 0.0, 10.0, default=1.0, open_low=True),
    )


def _logit_bias(request: pb.CreateChatCompletionRequest) -> dict[int, float]:
    biases = {}
    for key, bias in request.logit_bias.items():
        if not _TOKEN_ID.fullmatch(key.strip()):
            raise InvalidRequestError(
                f"Invalid key in 'logit_bias': '{quote(key)}' is not a token id (an integer).",
                param="logit_bias",
                code="invalid_value",
            )
        if not -100 <= bias <= 100:
            raise InvalidRequestError(
                f"Invalid value in 'logit_bias' for token {key}: {bias}; it must be between -100 and 100.",
                param=f"logit_bias.{quote(key)}",
                code="invalid_value",
            )
        biases[int(key)] = float(bias)
    return biases


def _float_in_range(
    request: pb.CreateChatCompletionRequest,
    name: str,
    low: float,
    high: float,
    *,
    default: float,
    open_low: bool = False,
) -> float:
    if not request.HasField(name):
        return default
    value = float(getattr(request, name))
    if not math.isfinite(value) or value < low or value > high or (open_low and value == low):
        bound = f"greater than {low:g}" if open_low else f"at least {low:g}"
        raise InvalidRequestError(
            f"Invalid '{name}': {value:g}; it must be {bound} and at most {high:g}.",
            param=name,
            code="invalid_value",
        )
    return value


def _int_in_range(
    request: pb.CreateChatCompletionRequest, name: str, low: int, high: int, *, default: int | None = None
) -> int:
    if not request.HasField(name):
        assert default is not None
        return default
    value = int(getattr(request, name))
    if value < low or value > high:
        raise InvalidRequestError(
            f"Invalid '{name}': {value}; it must be at least {low} and at most {high}.",
            param=name,
            code="invalid_value",
        )
    return value


def _stop_sequences(stop: struct_pb2.Value) -> tuple[str, ...]:
    kind = stop.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return ()
    if kind == "string_value":
        return _bounded_stops((stop.string_value,))
    if kind == "list_value":
        values = stop.list_value.values
        if all(v.WhichOneof("kind") == "string_value" for v in values):
            if len(values) > MAX_STOP_SEQUENCES:
                raise InvalidRequestError(
                    f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences are allowed, got {len(values)}.",
                    param="stop",
                    code="invalid_value",
                )
            return _bounded_stops(tuple(v.string_value for v in values))
    raise InvalidRequestError(
        "Invalid type for 'stop': expected a string, an array of strings, or null.", param="stop", code="invalid_type"
    )


def _bounded_stops(stops: tuple[str, ...]) -> tuple[str, ...]:
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise InvalidRequestError(
            f"Invalid 'stop': each sequence may be at most {MAX_STOP_CHARS} characters.",
            param="stop",
            code="string_above_max_length",
        )
    return stops


# --- responses ---------------------------------------------------------------------------------------

NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)


def usage_to_proto(finished: list[Finished]) -> pb.CompletionUsage:
    """Token counts of all choices; the prompt is counted once however many choices were generated. Rejected
    prediction tokens are reported, not added to `completion_tokens`: that stays the replies' tokens, what
    `max_completion_tokens` bounds, the same with or without a prediction (docs/design.md)."""
    prompt_tokens = finished[0].prompt_tokens if finished else 0
    completion_tokens = sum(f.completion_tokens for f in finished)
    return pb.CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=finished[0].cached_tokens if finished else 0),
        # This model does not reason: every generated token is answer text.
        completion_tokens_details=pb.CompletionTokensDetails(
            reasoning_tokens=0,
            accepted_prediction_tokens=sum(f.accepted_prediction_tokens for f in finished),
            rejected_prediction_tokens=sum(f.rejected_prediction_tokens for f in finished),
        ),
    )


def choice_to_proto(text: str, logprobs: list[TokenLogprob] | None, finished: Finished) -> pb.ChatCompletionChoice:
    """One choice of a whole completion; `logprobs` is None when they were not requested."""
    return pb.ChatCompletionChoice(
        index=finished.index,
        message=pb.ChatCompletionResponseMessage(
            role="assistant", content=struct_pb2.Value(string_value=text), refusal=NULL
        ),
        finish_reason=finished.finish_reason,
        logprobs=NULL
        if logprobs is None
        else json_format.ParseDict(
            {"content": [_token_logprob(t) for t in logprobs], "refusal": None}, struct_pb2.Value()
        ),
    )


def tool_choice_to_proto(
    pieces: list[structured.ReplyPiece], logprobs: list[TokenLogprob] | None, finished: Finished
) -> pb.ChatCompletionChoice:
    """A choice whose reply may hold tool calls: content (null when only tools were called) and calls."""
    content = "".join(p.text for p in pieces if isinstance(p, structured.ContentPiece))
    calls: list[pb.ChatCompletionMessageToolCall] = []
    for piece in pieces:
        if isinstance(piece, structured.ToolCallStart):
            calls.append(
                pb.ChatCompletionMessageToolCall(
                    id=piece.id, type="function", function=pb.FunctionCall(name=piece.name, arguments="")
                )
            )
        elif isinstance(piece, structured.ToolCallArguments):
            calls[piece.index].function.arguments += piece.text
    choice = choice_to_proto(content, logprobs, finished)
    if calls:
        choice.message.tool_calls.extend(calls)
        if not content.strip():
            choice.message.content.CopyFrom(NULL)
        if finished.finish_reason == "stop":
            choice.finish_reason = "tool_calls"
    return choice


def chunk_pieces(
    index: int, pieces: list[structured.ReplyPiece], logprobs: tuple[TokenLogprob, ...]
) -> list[pb.ChatCompletionChunkChoice]:
    """Stream deltas from parsed reply pieces, as OpenAI streams them: each tool call opens with a delta of
    its id, type, name and empty arguments alone; argument pieces follow in later deltas."""
    deltas: list[pb.ChatCompletionChunkChoice] = []
    current = None
    for piece in pieces:
        if current is None or isinstance(piece, structured.ToolCallStart):
            current = chunk_choice(index, logprobs=() if deltas else logprobs)
            deltas.append(current)
        delta = current.delta
        if isinstance(piece, structured.ContentPiece):
            delta.content = (delta.content if delta.HasField("content") else "") + piece.text
        elif isinstance(piece, structured.ToolCallStart):
            delta.tool_calls.add(
                index=piece.index,
                id=piece.id,
                type="function",
                function=pb.FunctionCallDelta(name=piece.name, arguments=""),
            )
            current = None  # the call's arguments go in the next delta
        elif delta.tool_calls:
            delta.tool_calls[-1].function.arguments += piece.text
        else:
            delta.tool_calls.add(index=piece.index, function=pb.FunctionCallDelta(arguments=piece.text))
    return deltas or [chunk_choice(index, logprobs=logprobs)]


def chunk_choice(
    index: int,
    *,
    role: str | None = None,
    content: str | None = None,
    logprobs: tuple[TokenLogprob, ...] = (),
    finish_reason: str | None = None,
) -> pb.ChatCompletionChunkChoice:
    """One choice delta of a stream chunk; `finish_reason` stays JSON null until the choice ends."""
    choice = pb.ChatCompletionChunkChoice(
        index=index,
        delta=pb.ChatCompletionStreamResponseDelta(role=role, content=content),
        finish_reason=NULL if finish_reason is None else struct_pb2.Value(string_value=finish_reason),
    )
    if logprobs:
        json_format.ParseDict({"content": [_token_logprob(t) for t in logprobs]}, choice.logprobs)
    return choice


def _token_logprob(token: TokenLogprob) -> dict[str, object]:
    """OpenAI's `ChatCompletionTokenLogprob`: the token as text and as its UTF-8 bytes."""
    return {
        "token": token.piece.decode("utf-8", errors="replace"),
        "logprob": token.logprob,
        "bytes": list(token.piece),
        "top_logprobs": [
            {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}
            for piece, logprob in token.top
        ],
    }


def model_to_proto(entry: ModelEntry) -> models_pb2.Model:
    """A registry entry as OpenAI's model object."""
    return models_pb2.Model(id=entry.id, object="model", created=entry.created, owned_by=entry.owned_by)
