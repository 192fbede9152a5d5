"""The service's own model of a chat request and of what an engine produces, free of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatMessage:
    """One conversation turn, content already flattened to text."""

    role: str
    content: str | None
    name: str | None = None
    tool_call_id: str | None = None
    # Tool calls of an assistant turn, as OpenAI dicts ({"id", "type", "function": {...}}).
    tool_calls: tuple[dict[str, object], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one choice."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    include_usage: bool = False


@dataclass(frozen=True)
class TextDelta:
    """The next piece of generated text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of one choice, with its exact token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


EngineEvent = TextDelta | Finished
