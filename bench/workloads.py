"""The benchmark's workloads, the streaming client that drives a server with them, and their figures.

Every request streams `max_tokens` tokens (64) at temperature 0.8 with the end-of-turn token banned, so every
server generates the same number of tokens; a stream that ends short or without `[DONE]` is an error,
counted and reported, never averaged in. Sampling is OpenAI's (the whole distribution: top_p 1, and top_k 0
and min_p 0 sent explicitly, because llama.cpp's servers otherwise default to top_k 40, top_p 0.95 and
min_p 0.05), so every server does the same work per token.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

MAX_TOKENS = 64
# SmolLM2's end-of-generation tokens (<|endoftext|> 0, <|im_end|> 2, and 4) banned: replies run to max_tokens.
NO_END = {"0": -100, "2": -100, "4": -100}
SYSTEM = "You are a helpful assistant."
QUESTIONS = [
    "Write a story about a lighthouse keeper.",
    "Explain how bread rises.",
    "Describe a walk through a forest in autumn.",
    "List some facts about the planet Mars.",
    "How do bees make honey?",
    "Give advice for a first marathon.",
    "What makes a good cup of tea?",
    "Describe the water cycle.",
    "Why is the sky blue?",
    "Tell me about the history of bicycles.",
    "How does a refrigerator work?",
    "Suggest a plan for learning to paint.",
    "What do octopuses eat?",
    "Explain compound interest simply.",
    "Describe a busy market on a Saturday.",
    "How are mountains formed?",
]
_WORDS = (
    "river stone garden winter harbor lantern market engine meadow copper signal orchard valley thunder "
    "library kettle compass ribbon glacier canyon pepper violin cottage tunnel feather island mirror "
    "ladder saddle quarry beacon planet window bridge forest candle marble basket anchor pillow"
).split()


def _document(seed: int, words: int) -> str:
    """Deterministic filler text: `words` words (about 1.3 tokens each)."""
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(sentences)


def short_prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def long_prompt(i: int) -> list[dict[str, str]]:
    """About 700 prompt tokens, different for every request (nothing to reuse)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Document {i}:\n{_document(i, 520)}\n\nSummarise the document."},
    ]


SHARED_SYSTEM = "You are the assistant of a travel agency. Policies follow.\n" + _document(10_000, 450)


def shared_system_prompt(i: int) -> list[dict[str, str]]:
    """The same ~600-token system prompt before a different short question."""
    return [{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


# Structured outputs: an array of readings with integer bounds (what every server here can enforce; llama.cpp's
# GBNF converter has no float bounds). `minItems` keeps every reply unfinished at 64 tokens, so each stream is
# as long as the plain ones and the two cost the same number of tokens.
READINGS = {
    "type": "object",
    "properties": {
        "readings": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "sensor": {"type": "integer", "minimum": 1, "maximum": 64},
                    "celsius": {"type": "integer", "minimum": -40, "maximum": 125},
                },
                "required": ["sensor", "celsius"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["readings"],
    "additionalProperties": False,
}
READINGS_FORMAT = {"type": "json_schema", "json_schema": {"name": "readings", "schema": READINGS, "strict": True}}


@dataclass(frozen=True)
class Workload:
    """`requests` streamed requests, at most `concurrency` at once."""

    name: str
    description: str
    concurrency: int
    requests: int
    prompts: str = "short"  # short | long | shared | same
    n: int = 1
    max_tokens: int = MAX_TOKENS
    response_format: dict[str, Any] | None = None
    # Another variant asks its questions in other words: no prompt is cached from a run of another variant.
    variant: int = 0
    # Run while another process keeps one core busy (a noisy neighbour on a shared machine).
    noisy: bool = False

    def messages(self, i: int) -> list[dict[str, str]]:
        if self.prompts == "same":
            return short_prompt(0)
        messages = {"short": short_prompt, "long": long_prompt, "shared": shared_system_prompt}[self.prompts](i)
        if self.variant:
            messages[-1] = {**messages[-1], "content": f"(Question set {self.variant}.) {messages[-1]['content']}"}
        return messages


WORKLOADS = [
    Workload("c1", "1 stream at a time, short prompts", 1, 12),
    Workload("c4", "4 concurrent streams, short prompts", 4, 16),
    Workload("c16", "16 concurrent streams, short prompts", 16, 16),
    Workload("c64", "64 concurrent streams (admission control), short prompts", 64, 64),
    Workload("long", "4 concurrent streams, ~700-token prompts, all different", 4, 4, prompts="long"),
    Workload("shared", "16 concurrent streams sharing a ~600-token system prompt", 16, 16, prompts="shared"),
    Workload("n4", "4 concurrent requests with n = 4 (16 sequences)", 4, 4, n=4),
    Workload("c1-noisy", "c1 while another process keeps one core busy", 1, 6, variant=1, noisy=True),
    Workload("c16-noisy", "c16 while another process keeps one core busy", 16, 16, variant=1, noisy=True),
    Workload(
        "structured",
        "16 concurrent streams like c16, each constrained to a json_schema with integer bounds",
        16,
        16,
        response_format=READINGS_FORMAT,
    ),
]
# Time to first token of a 1-token reply to a cached prompt, one request at a time: what each hop adds.
OVERHEAD = Workload("overhead", "1-token replies to a cached prompt, one at a time", 1, 20, "same", max_tokens=1)


@dataclass
class Stream:
    """What one streamed request saw."""

    started: float
    ended: float = 0.0
    first_token: float | None = None
    # Gaps between successive content chunks of each choice, seconds.
    gaps: list[float] = field(default_factory=list)
    chunks: dict[int, int] = field(default_factory=dict)  # choice index -> content chunks
    # Completion tokens over all choices, from `usage` where the server reports it, else the chunk count.
    usage_tokens: int | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else sum(self.chunks.values())


@dataclass
class Figures:
    """A workload's figures on one target."""

    completed: int
    errors: list[str]
    wall_s: float
    tokens: int
    ttft_ms: tuple[float, float] | None  # p50, p99
    itl_ms: tuple[float, float] | None
    choices_per_request: float
    # Whole requests, sent to last byte: the median and the slowest, ms.
    request_ms: tuple[float, float] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.wall_s if self.wall_s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 3),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "requests_per_s": round(self.requests_per_s, 3),
            "ttft_ms": self.ttft_ms,
            "itl_ms": self.itl_ms,
            "request_ms": self.request_ms,
            "choices_per_request": self.choices_per_request,
        }


def _p50_p99(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    p50, p99 = np.percentile(np.array(values) * 1000, [50, 99])
    return round(float(p50), 2), round(float(p99), 2)


def figures(workload: Workload, streams: list[Stream], started: float) -> Figures:
    """Count only complete streams; the rest are reported as errors."""
    done = [s for s in streams if s.error is None]
    return Figures(
        completed=len(done),
        errors=[s.error for s in streams if s.error is not None],
        wall_s=(max(s.ended for s in done) - started) if done else 0.0,
        tokens=sum(s.tokens for s in done),
        ttft_ms=_p50_p99([s.first_token - s.started for s in done if s.first_token is not None]),
        itl_ms=_p50_p99([gap for s in done for gap in s.gaps]),
        choices_per_request=(sum(len(s.chunks) for s in done) / len(done)) if done else 0.0,
        request_ms=(
            (round(1000 * statistics.median(d), 2), round(1000 * max(d), 2))
            if (d := [s.ended - s.started for s in done])
            else None
        ),
    )


def request_body(workload: Workload, i: int, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": workload.messages(i),
        "max_tokens": workload.max_tokens,
        "temperature": 0.8,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "logit_bias": NO_END,
        "stream": True,
        # Exact token counts where the server supports it (llama_cpp.server ignores it: chunks are counted).
        "stream_options": {"include_usage": True},
    }
    if workload.n != 1:
        body["n"] = workload.n
    if workload.response_format:
        body["response_format"] = workload.response_format
    return body


async def _stream_http(client: httpx.AsyncClient, url: str, body: dict[str, Any], expected: int) -> Stream:
    stream = await _stream_http_once(client, url, body, expected)
    if stream.error and stream.error.startswith(_STALE_CONNECTION):
        # A kept-alive connection the server had closed (llama-server closes one after a few requests): like
        # OpenAI's SDKs, send it again, once, on a fresh connection.
        stream = await _stream_http_once(client, url, body, expected)
    return stream


# How httpx reports a request sent on a kept-alive connection that the server had already closed.
_STALE_CONNECTION = "RemoteProtocolError: Server disconnected without sending a response"


async def _stream_http_once(client: httpx.AsyncClient, url: str, body: dict[str, Any], expected: int) -> Stream:
    stream = Stream(started=time.perf_counter())
    last: dict[int, float] = {}
    finished = False
    try:
        async with client.stream("POST", url, json=body) as reply:
            if reply.status_code != 200:
                stream.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                return stream
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    finished = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stream.error = f"error event: {chunk['error'].get('message', '')[:200]}"
                    return stream
                if usage := chunk.get("usage"):
                    stream.usage_tokens = usage["completion_tokens"]
                now = time.perf_counter()
                for choice in chunk.get("choices") or ():
                    if choice.get("delta", {}).get("content"):
                        index = choice.get("index", 0)
                        stream.first_token = stream.first_token or now
                        if index in last:
                            stream.gaps.append(now - last[index])
                        last[index] = now
                        stream.chunks[index] = stream.chunks.get(index, 0) + 1
    except httpx.HTTPError as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
        return stream
    stream.ended = time.perf_counter()
    short = {i: t for i, t in stream.chunks.items() if t < expected}
    if not finished:
        stream.error = "stream cut: no [DONE]"
    elif not stream.chunks or short:
        stream.error = f"short reply: {short or 'no tokens'} of {expected} tokens"
    return stream


async def run_http(url: str, model: str, workload: Workload) -> Figures:
    """Drive an OpenAI-compatible streaming endpoint with `workload`."""
    limits = httpx.Limits(max_connections=workload.concurrency + 4, max_keepalive_connections=workload.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=30), limits=limits) as client:
        gate = asyncio.Semaphore(workload.concurrency)

        async def one(i: int) -> Stream:
            async with gate:
                # A chunk can hold text that is not one token (a UTF-8 fragment held back): count chunks
                # leniently, but at least 90% of max_tokens must arrive for the stream to count as complete.
                return await _stream_http(client, url, request_body(workload, i, model), int(workload.max_tokens * 0.9))

        started = time.perf_counter()
        streams = await asyncio.gather(*(one(i) for i in range(workload.requests)))
    return figures(workload, list(streams), started)


async def run_first_tokens(host: str, port: int, model: str, workload: Workload) -> Figures:
    """Time to first token over a bare HTTP/1.1 socket, one request at a time: a client that costs next to
    nothing, so the figure is the server's (the overhead workload; httpx alone adds a millisecond or two)."""
    started = time.perf_counter()
    streams = [await first_token_http(host, port, request_body(workload, i, model)) for i in range(workload.requests)]
    return figures(workload, streams, started)


async def first_token_http(host: str, port: int, body: dict[str, Any]) -> Stream:
    """One streamed request over a fresh connection (`Connection: close`), read to its end."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    stream = Stream(started=time.perf_counter())
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + data)
    seen = b""
    while chunk := await reader.read(65536):
        seen += chunk
        if stream.first_token is None and _FIRST_CONTENT.search(seen):
            stream.first_token = time.perf_counter()
            stream.chunks[0] = 1
    writer.close()
    stream.ended = time.perf_counter()
    if stream.first_token is None or b"data: [DONE]" not in seen:
        stream.error = f"no content or no [DONE]: {seen[-200:]!r}"
    return stream


# A content delta with text (the first chunk carries the role and empty content).
_FIRST_CONTENT = re.compile(rb'"content":"[^"]')


async def warm_up(url: str, model: str) -> None:
    """One small request, so that start-up costs (first allocation, caches) stay out of the figures."""
    async with httpx.AsyncClient(timeout=300) as client:
        body = {"model": model, "messages": short_prompt(0), "max_tokens": 8, "stream": True}
        async with client.stream("POST", url, json=body) as reply:
            async for _ in reply.aiter_lines():
                pass
