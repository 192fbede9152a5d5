"""The engine interface the servicer depends on."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from chatwire_server.domain import ChatRequest, EngineEvent

# `Engine.stats()` of an engine with nothing to report: no work, no KV cache.
IDLE_STATS = {
    "queued_requests": 0,
    "running_requests": 0,
    "running_sequences": 0,
    "cached_prefixes": 0,
    "kv_cells_used": 0,
    "kv_cells_capacity": 0,
}


class Engine(Protocol):
    """Generates the choices of a chat completion.

    `generate` yields `TextDelta`s and one `Finished` per choice (`request.n` of them), interleaved as the
    choices progress. Closing the generator early (the client went away) must stop generation promptly.
    """

    def generate(self, request: ChatRequest) -> AsyncGenerator[EngineEvent, None]:
        """Generate every choice of `request`."""
        ...

    def stats(self) -> dict[str, int]:
        """`queued_requests`, `running_requests` (a request with `n` choices runs `n` sequences), `running_sequences`,
        `cached_prefixes`, and the KV cells held by requests in flight
        out of those usable (`kv_cells_used`, `kv_cells_capacity`; 0 and 0 for an engine without a KV cache),
        for metrics."""
        ...

    async def close(self) -> None:
        """Stop generating and free the model."""
        ...


# No extra headers for a relayed request (see `RelayEngine`).
NO_HEADERS: Mapping[str, str] = MappingProxyType({})

# What an engine's own thread hands over after each step: (tag, event) pairs of every request with news, where
# an exception fails the tagged request and None follows its last event.
StepEvents = Sequence[tuple[Hashable, EngineEvent | BaseException | None]]


@runtime_checkable
class SteppingEngine(Engine, Protocol):
    """An engine that decodes in a thread of its own, in steps. Besides `generate`, it can hand the events of a
    step straight from that thread to a sink: the worker process sends them on from there, instead of waking its
    event loop per token while llama.cpp computes the next one (on a busy machine that wake-up costs more than
    the work it does)."""

    async def submit(
        self, request: ChatRequest, tag: Hashable, sink: Callable[[StepEvents], None]
    ) -> Callable[[], None]:
        """Queue `request` (raising what is wrong with it); its events reach `sink`, tagged `tag`, from the
        engine's thread, once per step. Returns a function that cancels it (harmless once it ended)."""
        ...


@runtime_checkable
class RelayEngine(Protocol):
    """Serves a model by passing OpenAI requests on to another server (see `engines.openai_upstream`). It takes
    and gives OpenAI JSON, not `ChatRequest`s: every field and content part the other server reads must reach it,
    and its replies (tool calls, logprobs, refusals) come back as it wrote them."""

    async def complete(self, body: dict[str, Any], headers: Mapping[str, str] = NO_HEADERS) -> dict[str, Any]:
        """The whole completion of `body`. `headers` go with the request to the other server: the caller's trace
        context (W3C `traceparent`), so that a server that traces continues the same trace."""
        ...

    def stream(
        self, body: dict[str, Any], headers: Mapping[str, str] = NO_HEADERS
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The chunks of `body`'s completion as they come, the last one with usage (`headers` as in `complete`).
        Closing the generator early must stop the other server's generation."""
        ...

    def stats(self) -> dict[str, int]:
        """As `Engine.stats`."""
        ...

    async def close(self) -> None:
        """Close its connections."""
        ...
