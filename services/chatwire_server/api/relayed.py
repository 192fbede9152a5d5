"""Replies relayed from other OpenAI-compatible servers (engine `openai`) made ours: named by the model id the
client asked for, held to the contract's types (where servers are known to stray and the meaning is plain,
fitted), and to the spec's keys (vendor extensions dropped); and what they say, onto the relayed call's trace span."""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import json_format, struct_pb2

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire_server import tracing
from chatwire_server.api.convert import NULL
from chatwire_server.errors import UpstreamError


def relayed_response_to_proto(reply: dict[str, Any], model: str) -> pb.CreateChatCompletionResponse:
    """An upstream server's completion as ours, named by the model id the client asked for. Fields we do not
    know (vendor extensions such as `reasoning_content`) are dropped; the keys OpenAI requires are filled."""
    response = _parse_relayed(reply, pb.CreateChatCompletionResponse())
    response.model, response.object = model, "chat.completion"
    for choice in response.choices:
        choice.logprobs.CopyFrom(_spec_logprobs(choice.logprobs))
        message = choice.message
        message.role = message.role or "assistant"
        for key in ("content", "refusal"):
            if not message.HasField(key):
                getattr(message, key).CopyFrom(NULL)
    return response


def relayed_chunk_to_proto(chunk: dict[str, Any], model: str) -> pb.CreateChatCompletionStreamResponse:
    """An upstream server's stream chunk as ours (see `relayed_response_to_proto`)."""
    response = _parse_relayed(chunk, pb.CreateChatCompletionStreamResponse())
    response.model, response.object = model, "chat.completion.chunk"
    for choice in response.choices:
        if not choice.HasField("finish_reason"):
            choice.finish_reason.CopyFrom(NULL)
    return response


def _spec_logprobs(value: struct_pb2.Value) -> struct_pb2.Value:
    """A unary choice's `logprobs` (a free-form Value, so that it can print null) as the spec's `ChoiceLogprobs`:
    each token's `token`, `logprob`, `bytes` and `top_logprobs`, and nothing else (llama-server adds every token's
    `id`; stream chunks' typed `ChoiceLogprobs` drop it by themselves). `content` and `refusal` are null where the
    upstream sent none."""
    if value.WhichOneof("kind") != "struct_value":
        return NULL
    relayed = json_format.MessageToDict(value.struct_value)
    typed = _parse_relayed(relayed, pb.ChoiceLogprobs())
    spec = json_format.MessageToDict(typed, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key in ("content", "refusal"):
        if relayed.get(key) is None:
            spec[key] = None
    return json_format.ParseDict(spec, struct_pb2.Value())


def relayed_usage(usage: Any) -> tuple[int, int, int]:
    """Prompt, cached and completion tokens of an upstream's `usage` (zeros where it gave none)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0

    def count(value: Any) -> int:
        return value if isinstance(value, int) and value >= 0 else 0

    return count(usage.get("prompt_tokens")), count(cached), count(usage.get("completion_tokens"))


# Whole numbers in replies; counts bounded by int32, `created` by uint32.
_RELAYED_INTS = {
    "index", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "audio_tokens",
    "reasoning_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens", "start_index", "end_index",
}  # fmt: skip


def _tolerant(value: Any, key: str = "") -> Any:
    """An upstream's reply made to fit the contract where servers are known to stray and the meaning is plain:
    numbers as fractions or too large, `created` in milliseconds, a `logprob` of -Infinity, a numeric `id`, one
    tool call not in a list, `arguments` as a JSON object rather than its text."""
    if key == "arguments" and isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    if key == "tool_calls" and isinstance(value, dict):
        value = [value]
    if isinstance(value, dict):
        return {k: _tolerant(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_tolerant(v) for v in value]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "created" and number and math.isfinite(value):
        seconds = value / 1000 if value >= 2**32 else value  # milliseconds
        return min(max(int(seconds), 0), 2**32 - 1)
    if key in _RELAYED_INTS and number and math.isfinite(value):
        return min(max(int(value), 0), 2**31 - 1)
    if key == "logprob" and number and not math.isfinite(value):
        return -9999.0  # what OpenAI reports for a token with no chance
    if key == "id" and number:
        return str(value)
    return value


def _parse_relayed(data: dict[str, Any], message: Any) -> Any:
    try:
        return json_format.ParseDict(_tolerant(data), message, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise UpstreamError("The upstream server's reply is not a valid chat completion.") from exc


def trace_relayed(traced: tracing.Generation, reply: dict[str, Any]) -> None:
    """What the upstream answered (a whole reply or one chunk), onto the relayed call's span. Whatever shapes the
    upstream sent, this never fails the call: fields of unexpected types are left out."""
    if reply_id := reply.get("id"):
        traced.response(str(reply_id), str(reply.get("model") or ""))
    choices = reply.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        index = choice.get("index", 0) if isinstance(choice, dict) else None
        if not isinstance(index, int):
            continue
        message = choice.get("delta") or choice.get("message")
        if isinstance(message, dict) and (message.get("content") or message.get("tool_calls")):
            traced.output(index, message.get("content") or "")
        if isinstance(reason := choice.get("finish_reason"), str) and reason:
            traced.finish_reason(index, reason)
    if isinstance(usage := reply.get("usage"), dict):
        prompt, cached, completion = relayed_usage(usage)
        traced.usage(prompt, completion, cached)
