"""Batch invariance (issue 26): the same request, greedy or seeded, gets the same reply whatever else the server is
doing. Each probe is sent alone on a quiet engine (its prompt new to the server), then again while 8 long streams
run beside it (its prompt evaluated in their steps, its reply decoded in a batch of 9+ over thousands of cells),
then alone again after them, and once more (its prompt a cached prefix). Text, finish reasons and logprobs must be
identical to the last bit, choice by choice. With `batch_invariant = false` (llama.cpp's own kernels) this fails."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

from conftest import MODEL, NO_END_BIAS

# Long enough that the prompt's evaluation beside 8 decoding streams crosses 64 rows (llama.cpp's tiled kernel).
SYSTEM = (
    "Session {nonce}. You are a patient writing tutor. You answer in plain prose, without lists, and you keep every "
    "answer short, warm and concrete. When asked for a story you give it a named character, a place, and one "
    "surprising detail. When asked for facts you give the most useful one first."
)
# What a new prompt may share with whatever the server cached: the chat template's opening tokens ("Session").
TEMPLATE_TOKENS = 8
CITY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"],
    "additionalProperties": False,
}
PROBES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0, "logprobs": True, "top_logprobs": 3},
    "seeded": {"temperature": 0.9, "seed": 7, "logprobs": True, "top_logprobs": 2},
    "greedy n=3": {"temperature": 0, "n": 3, "logprobs": True},
    "seeded n=3": {"temperature": 0.9, "seed": 11, "n": 3, "logprobs": True, "top_logprobs": 1},
    "json_schema": {
        "temperature": 0.9,
        "seed": 5,
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    },
}
QUESTIONS = {
    "greedy": "Tell me a story about a lighthouse keeper.",
    "seeded": "Tell me a story about a baker who finds a map.",
    "greedy n=3": "What is the most useful fact about bees?",
    "seeded n=3": "Tell me a story about a violin in an attic.",
    "json_schema": "Name a large city by the sea and its population, as JSON.",
}
LOAD_STREAMS = 8


def ask(client: openai.OpenAI, name: str, nonces: dict[str, str]) -> tuple[Any, int]:
    """The probe's choices (text, finish reason, logprobs as JSON) and how many prompt tokens were cached."""
    messages = [
        {"role": "system", "content": SYSTEM.format(nonce=nonces[name])},  # each probe's prompt new to the server
        {"role": "user", "content": QUESTIONS[name]},
    ]
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, **PROBES[name])
    choices = [
        (c.message.content, c.finish_reason, c.logprobs.model_dump() if c.logprobs else None)
        for c in sorted(completion.choices, key=lambda c: c.index)
    ]
    usage = completion.usage
    assert usage is not None
    details = usage.prompt_tokens_details
    return choices, (details.cached_tokens or 0) if details else 0


@contextlib.contextmanager
def load(client: openai.OpenAI) -> Iterator[None]:
    """LOAD_STREAMS long streams decoding beside the block, each with a prompt of its own."""
    started = threading.Barrier(LOAD_STREAMS + 1)

    def stream(i: int) -> None:
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Write a long essay about rivers, part {i} {uuid.uuid4()}."}],
            max_tokens=160,
            logit_bias=NO_END_BIAS,  # no end of text: they run all along
            stream=True,
        )
        first = True
        for _ in chunks:
            if first:
                started.wait(timeout=120)
                first = False

    with ThreadPoolExecutor(LOAD_STREAMS) as pool:
        running = [pool.submit(stream, i) for i in range(LOAD_STREAMS)]
        started.wait(timeout=120)  # every stream is decoding
        time.sleep(0.5)
        yield
        for future in running:
            future.result()


def test_replies_do_not_depend_on_other_requests_or_the_cache(client: openai.OpenAI) -> None:
    nonces = {name: uuid.uuid4().hex for name in PROBES}
    alone = {name: ask(client, name, nonces) for name in PROBES}
    assert all(cached <= TEMPLATE_TOKENS for _, cached in alone.values()), "the probes' prompts must be new"
    with load(client), ThreadPoolExecutor(len(PROBES)) as pool:
        loaded = dict(zip(PROBES, pool.map(lambda name: ask(client, name, nonces), PROBES), strict=True))
    after, cached = {}, {}
    for name in PROBES:
        after[name] = ask(client, name, nonces)
        # Right after: its prompt is the newest cached prefix (the load may have pushed out the earlier ones).
        cached[name] = ask(client, name, nonces)
    reused = {name: tokens for name, (_, tokens) in cached.items()}
    assert all(tokens > TEMPLATE_TOKENS for tokens in reused.values()), reused
    for name in PROBES:
        assert loaded[name][0] == alone[name][0], f"{name}: under load the reply changed"
        assert after[name][0] == alone[name][0], f"{name}: after the load the reply changed"
        assert cached[name][0] == alone[name][0], f"{name}: from a cached prefix the reply changed"
    # The probes are not degenerate: the seeded choices differ from each other, and the greedy ones do not.
    seeded = [text for text, _, _ in alone["seeded n=3"][0]]
    assert len(set(seeded)) > 1, seeded
    assert len({text for text, _, _ in alone["greedy n=3"][0]}) == 1
