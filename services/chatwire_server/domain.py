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


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding: a grammar every reply must follow."""

    # An llguidance grammar (its JSON form), built and validated from the request by `structured`.
    grammar: str
    # The request field the grammar comes from, named in errors.
    param: str


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
    # Token id -> bias added to its logit; -100 bans the token, +100 all but forces it.
    logit_bias: dict[int, float] = field(default_factory=dict)
    constraint: Constraint | None = None
    # (open, close): the reply ends, as if at a stop sequence, before it repeats word for word a block between
    # these delimiters that it already wrote (a small model calls the same tool again and again).
    stop_at_repeated_block: tuple[str, str] | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    model: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    include_usage: bool = False
    # How many alternatives to report per token when logprobs are requested; None when they are not.
    top_logprobs: int | None = None
    # Whether replies may contain tool calls to parse out.
    tool_calls: bool = False
    # The text the reply is expected to be much like (OpenAI's Predicted Outputs): a guess that speeds decoding
    # up where the reply follows it, never changing the reply.
    prediction: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token, and the most likely tokens at its position."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """The next piece of one choice's text, with the logprobs of the token(s) it came from."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Timings:
    """When an engine did what for one request, in nanoseconds since the epoch (`time.time_ns()`, so that a
    worker process's times line up with the server's): the spans of a trace (see `tracing`)."""

    # Queued by the engine; admitted to the batch (the prompt's evaluation begins); prompt evaluated and the first
    # token sampled; this choice's last token.
    queued: int
    scheduled: int
    prefilled: int
    finished: int
    # The prompt's evaluation, step by step: (start, end, prompt tokens evaluated in that step).
    prefill_steps: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of one choice, with its exact token counts."""

    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens whose KV cells were reused from an earlier request.
    cached_tokens: int = 0
    # Tokens of the request's prediction that appeared in this choice's reply, and those that did not.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # Where the time went, from engines that know (for traces).
    timings: Timings | None = None


EngineEvent = TextDelta | Finished
