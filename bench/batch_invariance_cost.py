"""`make bench`, batch invariance: what the batch-invariant attention kernel (the model setting `batch_invariant`,
on by default; docs/performance.md, "Batch invariance") costs, and whether it holds under load. Two stacks of one
replica on this machine, the default config and one with `batch_invariant = false`, measured in turns so that
both see the same minutes of the machine:

- c1, c4, c16: that many streams of 64 tokens at once, tokens per second;
- long: a new ~1,200-token prompt and one token, seconds (the prompt's evaluation);
- determinism: 100 requests (greedy with logprobs, and seeded at temperature 0.9) sent one at a time on a quiet
  server, then again while 8 other streams run: how many replies (text or logprobs) differ from their quiet run.

Adds `batch_invariance` to bench/results/results.json and re-renders BENCHMARKS.md.

    PYTHONPATH=services:build/gen/python:clients/python .venv/bin/python bench/batch_invariance_cost.py
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from paired import MODEL, STREAM_TOKENS, config_with, in_turns, publish, streams_per_s, two_stacks, warm

ROUNDS = {"c1": 8, "c4": 4, "c16": 4, "long": 4}
# About 1,200 tokens, made new for each request (the prefix cache would answer a repeated one).
LONG = "Summarize: " + "The sea and the wind tell stories of sailors. " * 120
TOPICS = (
    "the sea", "a lighthouse", "autumn leaves", "a train station", "bees", "the moon", "a bakery", "winter roads",
    "a violin", "old maps", "rain on a roof", "a chess game", "mountain goats", "a library", "city lights",
    "a garden", "thunder", "a fishing boat", "the desert", "a clock tower", "snow owls", "a market", "river stones",
    "a kite", "the first frost",
)  # fmt: skip
LOAD_STREAMS = 8
PROBE_TOKENS = 24


def long_prompt_s(_: str, client: httpx.Client) -> float:
    messages = [{"role": "user", "content": f"Note {time.time_ns()}. {LONG}"}]
    started = time.perf_counter()
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).raise_for_status()
    return time.perf_counter() - started


def probes(run: str) -> list[dict[str, Any]]:
    """100 requests: per topic, two greedy with logprobs and two seeded at temperature 0.9. `run` makes their
    prompts new to this run's servers (a prompt cached by an earlier run would be no test of a fresh one)."""
    bodies = []
    for i, topic in enumerate(TOPICS):
        for ask in (f"Write two sentences about {topic}.", f"Describe {topic} to a child."):
            content = f"({run}) {ask}"
            base = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": PROBE_TOKENS}
            bodies.append({**base, "temperature": 0, "logprobs": True, "top_logprobs": 2})
            bodies.append({**base, "temperature": 0.9, "seed": 1000 + i})
    return bodies


def reply(client: httpx.Client, body: dict[str, Any]) -> Any:
    answer = client.post("/v1/chat/completions", json=body)
    answer.raise_for_status()
    choice = answer.json()["choices"][0]
    return choice["message"]["content"], choice["logprobs"]


@contextlib.contextmanager
def load(client: httpx.Client) -> Iterator[None]:
    """LOAD_STREAMS streams running all along, each a new prompt, until the block ends."""
    done = threading.Event()
    counter = itertools.count()

    def stream() -> None:
        while not done.is_set():
            number = next(counter)
            story = f"Tell a long story about {TOPICS[number % len(TOPICS)]}, number {number}."
            body = {"model": MODEL, "messages": [{"role": "user", "content": story}], "max_tokens": 48, "stream": True}
            with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                for _ in answer.iter_lines():
                    pass

    with ThreadPoolExecutor(LOAD_STREAMS) as pool:
        running = [pool.submit(stream) for _ in range(LOAD_STREAMS)]
        time.sleep(1)  # all of them decoding
        try:
            yield
        finally:
            done.set()
            for future in running:
                future.result()


def differing(client: httpx.Client, run: str) -> int:
    """How many of the probes' replies under load differ from their replies on a quiet server."""
    bodies = probes(run)
    quiet = [reply(client, body) for body in bodies]
    with load(client):
        loaded = [reply(client, body) for body in bodies]
    return sum(a != b for a, b in zip(quiet, loaded, strict=True))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-invariance-"))
    stock_config = config_with(work, "batch_invariant", "false")
    with contextlib.ExitStack() as running:
        invariant, stock = running.enter_context(two_stacks(work, ("invariant", "stock"), {}, config=stock_config))
        clients = {
            name: running.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{s.ports.http}", timeout=300))
            for name, s in (("invariant", invariant), ("stock", stock))
        }
        warm(clients)
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in clients}
        for probe, measure in {**{f"c{n}": streams_per_s(n) for n in (1, 4, 16)}, "long": long_prompt_s}.items():
            for name, values in in_turns(clients, {probe: measure}, ROUNDS[probe]).items():
                samples[name].update(values)
        run = f"{time.time_ns():x}"
        differences = {name: differing(client, run) for name, client in clients.items()}
    modes = {
        name: {
            **{f"{p}_tokens_per_s": round(statistics.median(values[p]), 1) for p in ("c1", "c4", "c16")},
            "long_prompt_p50_s": round(statistics.median(values["long"]), 2),
            "differing_under_load": differences[name],
        }
        for name, values in samples.items()
    }
    # Each round's invariant/stock ratio: the two runs of a round are seconds apart, so the machine's drift cancels.
    ratios = {
        probe: round(
            statistics.median(a / b for a, b in zip(samples["invariant"][probe], samples["stock"][probe], strict=True)),
            3,
        )
        for probe in ROUNDS
    }
    section = {
        "rounds": ROUNDS,
        "stream_tokens": STREAM_TOKENS,
        "probes": len(probes("")),
        "probe_tokens": PROBE_TOKENS,
        "load_streams": LOAD_STREAMS,
        "ratios": ratios,
        "modes": modes,
    }
    publish("batch_invariance", section, "batch invariance", work)


if __name__ == "__main__":
    main()
