"""The gRPC API directly, as internal callers use it: unary, streaming, models, errors, health, reflection."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc, models_pb2
from conftest import MODEL, Stack, assert_valid


def request(**fields: object) -> pb.CreateChatCompletionRequest:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], **fields}
    return json_format.ParseDict(body, pb.CreateChatCompletionRequest())


def as_json(message: object) -> dict[str, object]:
    """A response as the edge prints it (snake_case keys, zeros included)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def test_unary(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    reply = grpc_stub.CreateChatCompletion(request(max_tokens=8), timeout=120)
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.content.string_value
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert_valid(as_json(reply), "CreateChatCompletionResponse")


def test_streaming(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    chunks = list(
        grpc_stub.StreamChatCompletion(request(max_tokens=8, stream_options={"include_usage": True}), timeout=120)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason.string_value in ("stop", "length")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens > 0
    # Without the edge's SSE marker, gRPC callers never see the edge's end-of-stream sentinel.
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for chunk in chunks:
        assert_valid(as_json(chunk), "CreateChatCompletionStreamResponse")


def test_models(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    listed = grpc_stub.ListModels(models_pb2.ListModelsRequest(), timeout=10)
    assert [m.id for m in listed.data] == [MODEL]
    assert grpc_stub.GetModel(models_pb2.GetModelRequest(model=MODEL), timeout=10).owned_by == "huggingfacetb"


def error_body(error: grpc.RpcError) -> dict[str, object]:
    metadata = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return json.loads(metadata["x-chatwire-error"])["error"]


@pytest.mark.parametrize("streaming", [False, True])
def test_invalid_argument_with_openai_error(grpc_stub: chat_service_pb2_grpc.ChatServiceStub, streaming: bool) -> None:
    bad = request(temperature=9)
    with pytest.raises(grpc.RpcError) as caught:
        if streaming:
            list(grpc_stub.StreamChatCompletion(bad, timeout=30))
        else:
            grpc_stub.CreateChatCompletion(bad, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_body(caught.value)["param"] == "temperature"


def test_unknown_model_not_found(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.CreateChatCompletion(request(model="nope"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_body(caught.value)["code"] == "model_not_found"
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.GetModel(models_pb2.GetModelRequest(model="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(chatwire: Stack) -> None:
    with grpc.insecure_channel(chatwire.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chatwire.v1.ChatService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(iter(replies)).list_services_response.service}
    assert {"chatwire.v1.ChatService", "grpc.health.v1.Health"} <= names


def test_n_choices_and_logprobs_over_grpc(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    reply = grpc_stub.CreateChatCompletion(
        request(n=3, max_tokens=6, temperature=1.0, seed=11, logprobs=True, top_logprobs=2), timeout=120
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        logprobs = json_format.MessageToDict(choice.logprobs)
        assert logprobs["refusal"] is None
        assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in logprobs["content"])
    assert reply.usage.completion_tokens == sum(
        len(json_format.MessageToDict(c.logprobs)["content"]) for c in reply.choices
    )
    chunks = list(grpc_stub.StreamChatCompletion(request(n=2, max_tokens=4, logprobs=True), timeout=120))
    finished = {c.index for chunk in chunks for c in chunk.choices if c.finish_reason.string_value}
    assert finished == {0, 1}
    assert any(c.logprobs.content for chunk in chunks for c in chunk.choices)


def test_logit_bias_over_grpc(grpc_stub: chat_service_pb2_grpc.ChatServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.CreateChatCompletion(request(logit_bias={"1": 500}), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_body(caught.value)["param"] == "logit_bias.1"


@pytest.mark.parametrize(
    "fields, code, reason, field",
    [
        ({"temperature": 9}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE", "temperature"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ERROR", "model"),
        ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_ARRAY", "messages"),
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", "model"),
        ({"n": 0}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE", "n"),
        ({"tool_choice": "required"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE", "tool_choice"),
    ],
)
def test_client_mistakes_carry_google_rpc_details(
    grpc_stub: chat_service_pb2_grpc.ChatServiceStub,
    fields: dict[str, object],
    code: grpc.StatusCode,
    reason: str,
    field: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub.CreateChatCompletion(request(**fields), timeout=30)
    assert caught.value.code() == code  # never INTERNAL for a client mistake
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    kinds = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    assert info.reason == reason and info.domain == "chatwire.dev" and info.metadata["param"] == field
    kinds["google.rpc.BadRequest"].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field
