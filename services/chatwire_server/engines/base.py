"""The engine interface the servicer depends on."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from chatwire_server.domain import ChatRequest, EngineEvent


class Engine(Protocol):
    """Generates one choice of a chat completion.

    `generate` yields `TextDelta`s and ends with exactly one `Finished`. Closing the iterator early (the
    client went away) must stop generation at the next token.
    """

    def generate(self, request: ChatRequest, *, seed: int | None) -> AsyncGenerator[EngineEvent, None]:
        """Generate one choice; `seed` overrides `request.sampling.seed` (distinct per choice)."""
        ...

    def context_length(self) -> int:
        """The model's context window in tokens."""
        ...

    async def close(self) -> None:
        """Stop generating and free the model."""
        ...
