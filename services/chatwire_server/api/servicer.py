"""The gRPC servicer: proto in, engine events out, proto back. Thin on purpose: the RPC boundary (auth,
limits, logs, metrics, error mapping) is in `rpc`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import grpc

from chatwire.v1 import chat_completion_pb2 as pb
from chatwire.v1 import chat_service_pb2_grpc, models_pb2
from chatwire_server import metrics, tracing
from chatwire_server.api import convert, relayed, rpc
from chatwire_server.api.auth import Authenticator
from chatwire_server.domain import ChatRequest, EngineEvent, Finished, TextDelta, TokenLogprob
from chatwire_server.engines.base import NO_HEADERS, RelayEngine
from chatwire_server.limits import Admission, Limiter, Limits, Reservation
from chatwire_server.registry import ModelRegistry
from chatwire_server.structured import ReplyParser


class ChatServicer(chat_service_pb2_grpc.ChatServiceServicer):
    """Serves `chatwire.v1.ChatService` from a model registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        authenticator: Authenticator | None = None,
        limiter: Limiter | None = None,
        replica: str = "",
    ) -> None:
        self._registry = registry
        self._authenticator = authenticator or Authenticator([])
        self._limiter = limiter or Limiter(Limits())
        self.replica = replica

    async def admit(self, context: grpc.aio.ServicerContext, request: Any) -> Admission:
        """Check the caller's key, its right to the requested model, and its rate limits before any work: one
        request, and the tokens a chat request may cost reserved (settled to its real usage when it ends). The
        admission carries the key id and the limits' state as metadata (the edge returns it as OpenAI's
        `x-ratelimit-*` headers). Health and reflection, separate services, stay open."""
        key = self._authenticator.key_id(dict(context.invocation_metadata() or ()))
        if model := getattr(request, "model", ""):
            self._authenticator.check_model(key, model)
        reservation = Reservation(0, 0)
        if isinstance(request, pb.CreateChatCompletionRequest):
            reservation = self._limiter.limits.reservation(*convert.reply_bounds(request))
        return await self._limiter.admit(key, reservation)

    def settle(self, admission: Admission) -> None:
        """Charge the ended request's real usage instead of its reservation (in the background)."""
        self._limiter.settle_later(admission)

    def model_label(self, request: Any) -> str:
        """The model a request names, for metrics: only served ids, so labels stay few."""
        model = getattr(request, "model", "")
        return model if model in self._registry else ("unknown" if model else "")

    @rpc.unary_errors
    async def CreateChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateChatCompletionResponse:
        if relay := self._relay_for(request):
            return await self._relay_completion(relay, request)
        chat = await _validated(request)
        completion_id = _completion_id()
        texts: list[list[str]] = [[] for _ in range(chat.n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(chat.n)]
        finished: list[Finished] = []
        async with aclosing(self._generate(chat, completion_id)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    texts[event.index].append(event.text)
                    logprobs[event.index].extend(event.logprobs)
                else:
                    finished.append(event)
        finished.sort(key=lambda f: f.index)
        choices = []
        for f in finished:
            text = "".join(texts[f.index])
            choice_logprobs = logprobs[f.index] if chat.top_logprobs is not None else None
            if chat.tool_calls:
                parser = ReplyParser()
                choices.append(convert.tool_choice_to_proto([*parser.feed(text), *parser.finish()], choice_logprobs, f))
            else:
                choices.append(convert.choice_to_proto(text, choice_logprobs, f))
        return pb.CreateChatCompletionResponse(
            id=completion_id,
            object="chat.completion",
            created=int(time.time()),
            model=chat.model,
            choices=choices,
            usage=convert.usage_to_proto(finished),
        )

    @rpc.stream_errors
    async def StreamChatCompletion(
        self, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.CreateChatCompletionStreamResponse, None]:
        if relay := self._relay_for(request):
            async with aclosing(self._relay_stream(relay, request, context)) as relayed_chunks:
                async for relayed_chunk in relayed_chunks:
                    yield relayed_chunk
            return
        chat = await _validated(request)
        completion_id, created = _completion_id(), int(time.time())

        def chunk(
            *choices: pb.ChatCompletionChunkChoice, usage: pb.CompletionUsage | None = None
        ) -> pb.CreateChatCompletionStreamResponse:
            return pb.CreateChatCompletionStreamResponse(
                id=completion_id,
                object="chat.completion.chunk",
                created=created,
                model=chat.model,
                choices=choices,
                usage=usage,
            )

        parsers = [ReplyParser() for _ in range(chat.n)] if chat.tool_calls else None
        finished: list[Finished] = []
        # Closing the engine's stream, also when the client goes away, stops generation. Errors the engine
        # finds before generating (context length, a full queue) come before any chunk: a plain HTTP error.
        async with aclosing(self._generate(chat, completion_id)) as events:
            started = False
            async for event in events:
                if not started:
                    # Every choice opens with the assistant role, as OpenAI streams it.
                    yield chunk(*(convert.chunk_choice(i, role="assistant", content="") for i in range(chat.n)))
                    started = True
                if isinstance(event, TextDelta):
                    if parsers is None:
                        yield chunk(convert.chunk_choice(event.index, content=event.text, logprobs=event.logprobs))
                    else:
                        pieces = parsers[event.index].feed(event.text)
                        if pieces or event.logprobs:  # text held back as a possible `<tool_call>` waits
                            for delta in convert.chunk_pieces(event.index, pieces, event.logprobs):
                                yield chunk(delta)
                else:
                    finished.append(event)
                    reason = event.finish_reason
                    if parsers is not None:
                        parser = parsers[event.index]
                        if rest := parser.finish():
                            for delta in convert.chunk_pieces(event.index, rest, ()):
                                yield chunk(delta)
                        reason = "tool_calls" if parser.calls and reason == "stop" else reason
                    yield chunk(convert.chunk_choice(event.index, finish_reason=reason))
        if chat.include_usage:
            yield chunk(usage=convert.usage_to_proto(finished))
        if rpc.wants_sse(context):
            yield rpc.SSE_DONE_SENTINEL

    async def _generate(self, chat: ChatRequest, completion_id: str) -> AsyncGenerator[EngineEvent, None]:
        """The engine's events for `chat`, with time to first token and token counts recorded (and traced)."""
        engine = self._registry.get(chat.model).engine
        assert not isinstance(engine, RelayEngine), "relayed models take the _relay_* path"
        started = time.monotonic()
        waiting_for_first = True
        finished: list[Finished] = []
        admission = rpc.ADMISSION.get()
        with tracing.generation(chat) as traced:
            if traced:
                traced.response(completion_id, chat.model)
            async with aclosing(engine.generate(chat)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        admission.produced()
                        if waiting_for_first:
                            metrics.FIRST_TOKEN_SECONDS.labels(chat.model).observe(time.monotonic() - started)
                            waiting_for_first = False
                        if traced:
                            traced.delta(event)
                    elif isinstance(event, Finished):
                        finished.append(event)
                        if traced:
                            traced.finished(event)
                    yield event
        if finished:
            self._count_tokens(
                chat.model,
                finished[0].prompt_tokens,
                finished[0].cached_tokens,
                sum(f.completion_tokens for f in finished),
            )

    def _count_tokens(self, model: str, prompt: int, cached: int, completion: int) -> None:
        """Report the request's usage to its admission and count the tokens in the metrics."""
        rpc.ADMISSION.get().charge(prompt + completion)
        metrics.PROMPT_TOKENS.labels(model).inc(prompt)
        metrics.CACHED_TOKENS.labels(model).inc(cached)
        metrics.COMPLETION_TOKENS.labels(model).inc(completion)

    def _relay_for(self, request: pb.CreateChatCompletionRequest) -> RelayEngine | None:
        """The engine of the requested model if it forwards to another server (else validation decides)."""
        if isinstance(request, pb.CreateChatCompletionRequest) and request.model in self._registry:
            engine = self._registry.get(request.model).engine
            if isinstance(engine, RelayEngine):
                return engine
        return None

    async def _relay_body(self, request: pb.CreateChatCompletionRequest) -> dict[str, Any]:
        """The request as the OpenAI JSON to pass on, checked against what its model reads."""
        inputs = self._registry.get(request.model).inputs
        with tracing.span("validate"):
            return await asyncio.to_thread(convert.relay_request_from_proto, request, inputs)

    async def _relay_completion(
        self, relay: RelayEngine, request: pb.CreateChatCompletionRequest
    ) -> pb.CreateChatCompletionResponse:
        body = await self._relay_body(request)
        with tracing.relayed_generation(request.model, body) as traced:
            reply = await relay.complete(body, traced.headers() if traced else NO_HEADERS)
            if traced:
                relayed.trace_relayed(traced, reply)
        response = relayed.relayed_response_to_proto(reply, request.model)
        if reply.get("usage"):
            self._count_tokens(request.model, *relayed.relayed_usage(reply["usage"]))
        else:  # an upstream that reports no usage: the reply is charged what it reserved
            admission = rpc.ADMISSION.get()
            admission.charge(admission.reservation.tokens)
        return response

    async def _relay_stream(
        self, relay: RelayEngine, request: pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.CreateChatCompletionStreamResponse, None]:
        """The upstream's chunks as they arrive; usage only if the client asked for it. Tokens are counted from
        the last usage the upstream sent (some send a running total on every chunk)."""
        body = await self._relay_body(request)
        started, waiting_for_first = time.monotonic(), True
        usage = None
        with tracing.relayed_generation(request.model, body) as traced:
            async with aclosing(relay.stream(body, traced.headers() if traced else NO_HEADERS)) as chunks:
                async for chunk in chunks:
                    if traced:
                        relayed.trace_relayed(traced, chunk)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                        if not request.stream_options.include_usage:
                            chunk = {k: v for k, v in chunk.items() if k != "usage"}
                            if not chunk.get("choices"):
                                continue
                    if _has_output(chunk):
                        rpc.ADMISSION.get().produced()
                        if waiting_for_first:
                            metrics.FIRST_TOKEN_SECONDS.labels(request.model).observe(time.monotonic() - started)
                            waiting_for_first = False
                    yield relayed.relayed_chunk_to_proto(chunk, request.model)
        if usage:
            self._count_tokens(request.model, *relayed.relayed_usage(usage))
        if rpc.wants_sse(context):
            yield rpc.SSE_DONE_SENTINEL

    @rpc.unary_errors
    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.ListModelsResponse:
        key = rpc.ADMISSION.get().key
        visible = [e for e in self._registry.all() if self._authenticator.may_use(key, e.id)]
        return models_pb2.ListModelsResponse(object="list", data=[convert.model_to_proto(e) for e in visible])

    @rpc.unary_errors
    async def GetModel(
        self, request: models_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> models_pb2.Model:
        return convert.model_to_proto(self._registry.get(request.model))


# Requests up to this size (serialized) are checked on the event loop: that takes well under a millisecond, less
# than a hand-off to a thread and back on a busy machine.
INLINE_VALIDATION_BYTES = 4096


async def _validated(request: pb.CreateChatCompletionRequest) -> ChatRequest:
    """The request checked and converted; a large one (many messages, a big schema to compile) off the event
    loop, so that it does not hold up the streams of everyone else."""
    schemas = request.HasField("response_format") or len(request.tools) > 0  # grammars to compile
    with tracing.span("validate"):
        if request.ByteSize() <= INLINE_VALIDATION_BYTES and not schemas:
            return convert.chat_request_from_proto(request)
        return await asyncio.to_thread(convert.chat_request_from_proto, request)


def _has_output(chunk: dict[str, Any]) -> bool:
    """Whether a relayed chunk carries generated text or tool calls (not only the role that opens a stream)."""
    deltas = (c.get("delta") for c in chunk.get("choices") or () if isinstance(c, dict))
    return any(isinstance(d, dict) and (d.get("content") or d.get("tool_calls") or d.get("refusal")) for d in deltas)


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
