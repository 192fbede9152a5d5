"""A scripted engine: replies with fixed text, word by word, and can fail mid-reply on purpose.

Not a model. It exists for exact protocol-shape tests (for example an error after a stream has started) and
for client developers who need a deterministic server; the real engine is `llama_cpp`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from chatwire_server.domain import ChatRequest, EngineEvent, Finished, TextDelta
from chatwire_server.engines.base import IDLE_STATS
from chatwire_server.errors import ServiceUnavailableError


class ScriptedEngine:
    """Settings: `reply` (text), `fail_after` (words sent before failing; omit to never fail), `failure`
    (`unavailable`, a clean 503, or `bug`, an unexpected exception), `delay_s` (between words)."""

    def __init__(
        self, reply: str, fail_after: int | None = None, failure: str = "unavailable", delay_s: float = 0.0
    ) -> None:
        self._words = reply.split(" ")
        self._fail_after = fail_after
        self._failure = failure
        self._delay_s = delay_s

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> ScriptedEngine:
        return cls(
            settings.get("reply", "Hello from the scripted engine."),
            settings.get("fail_after"),
            settings.get("failure", "unavailable"),
            float(settings.get("delay_s", 0.0)),
        )

    def stats(self) -> dict[str, int]:
        return dict(IDLE_STATS)

    async def generate(self, request: ChatRequest) -> AsyncGenerator[EngineEvent, None]:
        for index in range(request.n):
            for count, word in enumerate(self._words):
                if self._fail_after is not None and count == self._fail_after:
                    if self._failure == "bug":
                        raise RuntimeError("scripted bug with internal details that must not leak")
                    raise ServiceUnavailableError("The scripted engine failed mid-reply, as configured.")
                await asyncio.sleep(self._delay_s)
                yield TextDelta(index, word if count == 0 else f" {word}")
            yield Finished(index, "stop", prompt_tokens=1, completion_tokens=len(self._words))

    async def close(self) -> None:
        return None
