"""The batching engine's scheduling through the edge: concurrent streams, chunked prefill, admission control."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from chatwire_server.edge import stack
from conftest import MODEL, NO_END_BIAS, Stack, run_stack

COUNT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def stream_times(base_url: str, body: dict[str, object]) -> list[float]:
    """Arrival times of a stream's content chunks."""
    times = []
    with httpx.stream("POST", f"{base_url}/chat/completions", json={**body, "stream": True}, timeout=300) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                times.append(time.monotonic())
    return times


def test_concurrent_streams_decode_together(chatwire: Stack) -> None:
    body = {"model": MODEL, "messages": COUNT, "max_tokens": 40, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: stream_times(chatwire.base_url, body), range(4)))
    # Batched, not queued: every stream has started before any has finished.
    assert all(len(r) >= 10 for r in runs)
    assert max(r[0] for r in runs) < min(r[-1] for r in runs)


def test_long_prompt_does_not_stall_running_streams(chatwire: Stack) -> None:
    running_body = {"model": MODEL, "messages": COUNT, "max_tokens": 400, "temperature": 0}
    long_prompt = [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 150}]
    long_body = {"model": MODEL, "messages": long_prompt, "max_tokens": 1}
    chunks: list[float] = []
    started = threading.Event()

    def run_stream() -> None:
        with httpx.stream(
            "POST", f"{chatwire.base_url}/chat/completions", json={**running_body, "stream": True}, timeout=300
        ) as reply:
            for line in reply.iter_lines():
                if '"content":"' in line:
                    chunks.append(time.monotonic())
                    started.set()

    streamer = threading.Thread(target=run_stream)
    streamer.start()
    assert started.wait(60)
    submitted = time.monotonic()
    reply = httpx.post(f"{chatwire.base_url}/chat/completions", json=long_body, timeout=300)
    answered = time.monotonic()
    streamer.join(300)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > 1500
    during = [t for t in chunks if submitted < t < answered]
    # The ~1.6k-token prompt is evaluated in chunks between decode steps: the running stream keeps going.
    assert len(during) >= 5, f"only {len(during)} tokens streamed while the long prompt was evaluated"


@pytest.fixture(scope="module")
def tiny_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server that decodes one sequence at a time, queues one more request, and caches 200 prompt tokens."""
    config = tmp_path_factory.mktemp("tiny") / "models.toml"
    default = stack.DEFAULT_CONFIG.read_text()
    config.write_text(
        default.replace("max_sequences = 128", "max_sequences = 1")
        .replace("max_queued_requests = 64", "max_queued_requests = 1")
        .replace("kv_cells = 32768", "kv_cells = 4096")
        .replace("prefix_cache_tokens = 4096", "prefix_cache_tokens = 200")
    )
    settings = config.read_text()
    assert "max_sequences = 1\n" in settings and "prefix_cache_tokens = 200" in settings
    with run_stack(request, Path(config)) as running:
        yield running


def test_full_queue_answers_429_at_once(tiny_stack: Stack) -> None:
    body = {"model": MODEL, "messages": COUNT, "max_tokens": 60, "temperature": 0}
    url = f"{tiny_stack.base_url}/chat/completions"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: httpx.post(url, json=body, timeout=300), range(6)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}
    limited = next(r for r in replies if r.status_code == 429)
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"


def test_sdk_sees_rate_limit_error(tiny_stack: Stack) -> None:
    client = openai.OpenAI(base_url=tiny_stack.base_url, api_key="unused", max_retries=0, timeout=300)

    def call(_: int) -> str:
        try:
            client.chat.completions.create(model=MODEL, messages=COUNT, max_tokens=60)  # type: ignore[arg-type]
            return "ok"
        except openai.RateLimitError:
            return "429"

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(call, range(5)))
    assert "429" in outcomes and "ok" in outcomes


def test_n_larger_than_the_engine_can_decode_is_400(tiny_stack: Stack) -> None:
    reply = httpx.post(
        f"{tiny_stack.base_url}/chat/completions", json={"model": MODEL, "messages": COUNT, "n": 2}, timeout=60
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"


def test_each_request_in_a_batch_samples_with_its_own_parameters(chatwire: Stack) -> None:
    from test_sampling import token_ids

    def forced(word: str) -> dict[str, object]:
        (token,) = token_ids(f" {word}")
        return {"model": MODEL, "messages": COUNT, "max_tokens": 30, "temperature": 0, "logit_bias": {str(token): 100}}

    bodies = [
        forced("apple"),
        forced("banana"),
        {"model": MODEL, "messages": COUNT, "max_tokens": 30, "temperature": 0},
    ]
    url = f"{chatwire.base_url}/chat/completions"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = [
            r.json()["choices"][0]["message"]["content"]
            for r in pool.map(lambda b: httpx.post(url, json=b, timeout=120), bodies)
        ]
    assert texts[0] == " apple" * 30
    assert texts[1] == " banana" * 30
    assert "apple" not in texts[2] and "banana" not in texts[2]


def test_choices_that_end_at_their_first_token_all_finish(chatwire: Stack) -> None:
    """Every choice of `n` that ends at once still finishes, and its sequence is freed for the next request."""
    url = f"{chatwire.base_url}/chat/completions"
    for _ in range(3):
        reply = httpx.post(url, json={"model": MODEL, "messages": COUNT, "n": 16, "max_tokens": 1}, timeout=60)
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        assert sorted(c["index"] for c in choices) == list(range(16))
        assert {c["finish_reason"] for c in choices} == {"length"}
    # The end token banned: a sampled reply may otherwise end before its 5 tokens (seen once in CI).
    after = httpx.post(
        url, json={"model": MODEL, "messages": COUNT, "max_tokens": 5, "logit_bias": NO_END_BIAS}, timeout=60
    )
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5


def test_prefixes_beyond_the_cache_budget_are_not_kept(tiny_stack: Stack) -> None:
    def cached_on_second_ask(content: str) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2}
        replies = [httpx.post(f"{tiny_stack.base_url}/chat/completions", json=body, timeout=60) for _ in range(2)]
        assert [r.status_code for r in replies] == [200, 200]
        return int(replies[1].json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached_on_second_ask("Name a colour.") > 0
    assert cached_on_second_ask("Name a colour. " * 80) == 0  # ~400 tokens: over the 200-token budget


@pytest.fixture(scope="module")
def forgetful_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Cached prefixes dropped once 300 tokens were evaluated after them."""
    config = tmp_path_factory.mktemp("forgetful") / "models.toml"
    text = stack.DEFAULT_CONFIG.read_text()
    config.write_text(text.replace("prefix_cache_idle_tokens = 1024", "prefix_cache_idle_tokens = 300"))
    assert "prefix_cache_idle_tokens = 300" in config.read_text()
    with run_stack(request, Path(config)) as running:
        yield running


def test_prefixes_left_idle_while_others_are_served_are_dropped(forgetful_stack: Stack) -> None:
    url = f"{forgetful_stack.base_url}/chat/completions"

    def usage(messages: list[dict[str, str]], max_tokens: int = 2) -> tuple[int, int]:
        """(prompt tokens, of them cached)"""
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "logit_bias": NO_END_BIAS}
        reply = httpx.post(url, json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        counts = reply.json()["usage"]
        return counts["prompt_tokens"], counts["prompt_tokens_details"]["cached_tokens"]

    colour = [{"role": "user", "content": "Name a colour."}]
    # Asked together, both leave a cached prefix; COUNT asked again takes over its own and runs 400 tokens.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        [(colour_tokens, _), (count_tokens, _)] = pool.map(usage, [colour, COUNT])
    assert usage(COUNT, max_tokens=400)[1] == count_tokens - 1
    # More than 300 tokens were evaluated since the colour prompt was cached: it was dropped (the 4096-token budget
    # would have kept it); only the default system prompt, which COUNT's cached prefix shares, is reused.
    assert 0 < usage(colour)[1] < colour_tokens - 1


@pytest.fixture(scope="module")
def cramped_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Four sequence ids and few KV cells: cached prefixes must be evicted all the time."""
    config = tmp_path_factory.mktemp("cramped") / "models.toml"
    config.write_text(
        stack.DEFAULT_CONFIG.read_text()
        .replace("max_sequences = 128", "max_sequences = 4")
        .replace("kv_cells = 32768", "kv_cells = 4096")
    )
    with run_stack(request, Path(config)) as running:
        yield running


def test_prefix_cache_eviction_never_loses_sequences(cramped_stack: Stack) -> None:
    url = f"{cramped_stack.base_url}/chat/completions"

    def ask(topic: int, **extra: object) -> httpx.Response:
        prompt = f"Topic {topic}. " + f"word{topic} " * 700  # about 1400 tokens: three do not fit at once
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, **extra}
        return httpx.post(url, json=body, timeout=120)

    # Three at once: the third waits for cells, then all three leave cached prefixes; a fourth long prompt
    # must evict them to fit.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert [r.status_code for r in pool.map(ask, range(3))] == [200, 200, 200]
    assert ask(3).status_code == 200
    # Every sequence id is still usable: a request needing all four at once is served.
    reply = httpx.post(url, json={"model": MODEL, "messages": COUNT, "n": 4, "max_tokens": 4}, timeout=120)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 4


def test_requests_arriving_together_evaluate_a_shared_prompt_once(chatwire: Stack, client: openai.OpenAI) -> None:
    """Many users, one long system prompt, at the same moment: the first request evaluates it, the others wait
    for its cells and copy them (reported as cached tokens), and answer from them."""
    system = {"role": "system", "content": "You answer questions about the moon in one sentence. " * 12}
    questions = ["How far away is it?", "What is it made of?", "Why does it glow?", "Who walked on it?"]

    def ask(question: str) -> openai.types.chat.ChatCompletion:
        messages = [system, {"role": "user", "content": question}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]

    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    usages = [reply.usage for reply in together]
    assert all(u is not None and u.prompt_tokens_details is not None for u in usages)
    system_tokens = 12 * 10  # each repetition of the sentence is at least 10 tokens
    cached = sorted(u.prompt_tokens_details.cached_tokens or 0 for u in usages)  # type: ignore[union-attr]
    assert all(c >= system_tokens for c in cached[1:]), cached  # all but the first copied the shared prompt
    # Only the system prompt names the moon: replies that talk about it read the copied cells. (Not compared
    # with replies made alone: a different batch makes different float rounding, and greedy text can diverge.)
    replies = [reply.choices[0].message.content or "" for reply in together]
    assert all("moon" in reply.lower() for reply in replies), replies
