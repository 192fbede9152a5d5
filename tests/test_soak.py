"""Soak: 64 concurrent streams against the real stack (loopback only) for CHATWIRE_SOAK_SECONDS (default 600),
about a quarter of them hung up by their client before the end (before any event, or after a few).

Must hold: 0 errors (every stream that is not hung up is a 200 whose events end with `data: [DONE]`, no error
event), the engine worker never restarts and a canary request is served every 2 s throughout, running sequences
back to 0 at the end (the service's gauge), and the RSS of every process (Envoy, gRPC server, engine worker) flat
after warm-up: its least-squares slope, projected over the measured window, under
max(FLAT_MB, FLAT_SHARE x its RSS).

Deselected by default (pyproject's addopts); `make soak` runs it and writes reliability/results/soak.json, which
reliability/report.py renders into RELIABILITY.md. `CHATWIRE_SOAK_SECONDS=30 make soak` for a quick look.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import fuzzing as fz
from conftest import MODEL, Stack, assert_valid, engine_workers, run_stack

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("CHATWIRE_SOAK_SECONDS", "600"))
STREAMS = int(os.environ.get("CHATWIRE_SOAK_STREAMS", "64"))
HANG_UP_SHARE = 0.25
# A stream may take this long at most (64 streams share 2 cores: each gets a slice of every step).
STREAM_BOUND_S = 300.0
# RSS is judged after warm-up (the first WARMUP_SHARE of the run: caches fill, KV cells are first touched).
WARMUP_SHARE = 0.3
FLAT_MB = 16.0
FLAT_SHARE = 0.05
PROMPTS = [
    "Count from 1 to 20.",
    "Tell me a story about a dragon.",
    "List five fruits.",
    "Explain rain to a child.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
]


@pytest.fixture(scope="module")
def soak_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with run_stack(request) as running:
        yield running


class Soak:
    """The streams, their tallies, and the RSS samples."""

    def __init__(self, running: Stack) -> None:
        self.stack = running
        self.url = f"{running.base_url}/chat/completions"
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.ttft: list[float] = []
        self.durations: list[float] = []
        self.tokens = 0
        self.start = time.monotonic()
        self.stop_at = self.start + SECONDS
        self.samples: list[dict[str, Any]] = []
        self.pids: dict[str, int] = {}

    def error(self, what: str) -> None:
        with self.lock:
            self.counts["errors"] += 1
            if len(self.errors) < 200:
                self.errors.append(f"t={time.monotonic() - self.start:.0f}s {what}")

    def stream(self, client: httpx.Client, rng: random.Random) -> None:
        # A quarter hang up: before the first event (a socket closed 0-2 s after sending), or after 1, 2 or 5.
        hang_up_after = rng.choice([0, 1, 2, 5]) if rng.random() < HANG_UP_SHARE else None
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(8, 48),
            "temperature": 0.8,
            "seed": rng.randrange(2**31),
            "stream": True,
            "stream_options": {"include_usage": rng.random() < 0.5},
        }
        start = time.monotonic()
        first = 0.0
        events: list[str] = []
        with self.lock:
            self.counts["started"] += 1
        if hang_up_after == 0:
            self.hang_up_before_reply(body, rng.uniform(0, 2))
            return
        try:
            with client.stream("POST", self.url, json=body) as reply:
                if reply.status_code != 200:
                    self.error(f"HTTP {reply.status_code}: {fz.excerpt(reply.read(), 300)}")
                    return
                for line in reply.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if not events:
                        first = time.monotonic() - start
                    events.append(line[len("data: ") :])
                    if hang_up_after is not None and len(events) > hang_up_after:
                        break
                    if time.monotonic() - start > STREAM_BOUND_S:
                        self.error(f"stream still running after {STREAM_BOUND_S:.0f} s")
                        return
        except httpx.HTTPError as error:
            self.error(f"{type(error).__name__}: {error}")
            return
        if hang_up_after is not None and len(events) > hang_up_after:
            with self.lock:
                self.counts[f"hung up after {hang_up_after} events"] += 1
            return
        problems = self.check(events)
        if problems:
            self.error("; ".join(problems))
            return
        with self.lock:
            self.counts["completed"] += 1
            self.ttft.append(first)
            self.durations.append(time.monotonic() - start)
            self.tokens += sum(1 for e in events if '"content"' in e)

    def hang_up_before_reply(self, body: dict[str, Any], after_s: float) -> None:
        """Send the request on a socket of its own and close it `after_s` later, before reading anything."""
        data = fz.encode(body)
        request = fz.raw_request(
            "POST", "/v1/chat/completions", [("Content-Type", "application/json")], data, len(data)
        )
        try:
            with socket.create_connection(("127.0.0.1", self.stack.ports.http), timeout=10) as sock:
                sock.sendall(request)
                time.sleep(after_s)
        except OSError as error:
            self.error(f"could not send: {error}")
            return
        with self.lock:
            self.counts["hung up before the first event"] += 1

    @staticmethod
    def check(events: list[str]) -> list[str]:
        if not events or events[-1] != "[DONE]":
            return [f"no data: [DONE] at the end (last event {events[-1][:200] if events else None!r})"]
        problems = []
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:
                problems.append(f"error event: {event[:300]}")
        try:  # the first chunk in full; the rest are the same shape
            assert_valid(json.loads(events[0]), "CreateChatCompletionStreamResponse")
        except (AssertionError, ValueError) as error:
            problems.append(str(error)[:300])
        return problems

    def client_loop(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(timeout=httpx.Timeout(STREAM_BOUND_S)) as client:
            while time.monotonic() < self.stop_at:
                try:
                    self.stream(client, rng)
                except Exception as error:  # a bug here must show as an error, not a silent thread death
                    self.error(f"client crashed: {type(error).__name__}: {error}")

    def sample_loop(self, done: threading.Event) -> None:
        interval = max(1.0, SECONDS / 300)
        while not done.is_set():
            rss = {name: fz.rss_mb(pid) for name, pid in self.pids.items()}
            self.samples.append({"t": round(time.monotonic() - self.start, 2), "rss_mb": rss})
            done.wait(interval)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return 0.0
    return 60 * sum((t - mean_t) * (m - mean_m) for t, m in points) / var


def memory_verdicts(samples: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    window_start = SECONDS * WARMUP_SHARE
    verdicts = {}
    for name in names:
        series = [(s["t"], s["rss_mb"][name]) for s in samples if s["rss_mb"].get(name) is not None]
        after = [(t, m) for t, m in series if t >= window_start]
        slope = slope_mb_per_min(after)
        window_min = (after[-1][0] - after[0][0]) / 60 if len(after) > 1 else 0.0
        typical = sorted(m for _, m in after)[len(after) // 2] if after else 0.0
        allowed = max(FLAT_MB, FLAT_SHARE * typical)
        verdicts[name] = {
            "start_mb": round(series[0][1], 1) if series else None,
            "end_mb": round(series[-1][1], 1) if series else None,
            "peak_mb": round(max(m for _, m in series), 1) if series else None,
            "slope_mb_per_min": round(slope, 2),
            "growth_over_window_mb": round(slope * window_min, 1),
            "allowed_growth_mb": round(allowed, 1),
            "window_s": round(60 * window_min, 1),
            "flat": slope * window_min <= allowed,
        }
    return verdicts


@pytest.mark.timeout(SECONDS + STREAM_BOUND_S + 300)
def test_soak(soak_stack: Stack) -> None:
    soak = Soak(soak_stack)
    envoy = fz.envoy_pid(soak_stack)
    assert envoy, "Envoy's process not found"
    workers = engine_workers(soak_stack.server_pid)
    soak.pids = {"envoy": envoy, "grpc server": soak_stack.server_pid}
    soak.pids.update({f"engine worker{'' if i == 0 else f' {i}'}": pid for i, pid in enumerate(workers)})
    done = threading.Event()
    sampler = threading.Thread(target=soak.sample_loop, args=(done,), daemon=True)
    with fz.Watch(soak_stack) as watch:
        soak.start = time.monotonic()
        soak.stop_at = soak.start + SECONDS
        sampler.start()
        clients = [threading.Thread(target=soak.client_loop, args=(i,), daemon=True) for i in range(STREAMS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(SECONDS + STREAM_BOUND_S + 60)
        stuck = sum(thread.is_alive() for thread in clients)
        run = watch.finish()
    done.set()
    sampler.join(10)
    elapsed = time.monotonic() - soak.start
    memory = memory_verdicts(soak.samples, list(soak.pids))
    fz.write_results(
        "soak",
        {
            "settings": {
                "seconds": SECONDS,
                "streams": STREAMS,
                "hang_up_share": HANG_UP_SHARE,
                "warmup_share": WARMUP_SHARE,
                "flat_mb": FLAT_MB,
                "flat_share": FLAT_SHARE,
            },
            "duration_s": round(elapsed, 1),
            "counts": dict(soak.counts),
            "errors": soak.errors,
            "tokens": soak.tokens,
            "tokens_per_s": round(soak.tokens / elapsed, 1),
            "ttft": fz.summarize(soak.ttft),
            "stream_duration": fz.summarize(soak.durations),
            "pids": soak.pids,
            "memory": memory,
            "rss_samples": soak.samples,
            "run": run,
            "stuck_clients": stuck,
        },
    )
    problems = list(run["problems"])
    if soak.counts["errors"]:
        problems.append(f"{soak.counts['errors']} errors, e.g. {soak.errors[:5]}")
    if stuck:
        problems.append(f"{stuck} client threads still running")
    if not soak.counts["completed"]:
        problems.append("no stream completed")
    for name, verdict in memory.items():
        if not verdict["flat"]:
            problems.append(
                f"{name} RSS grows {verdict['slope_mb_per_min']} MB/min ({verdict['growth_over_window_mb']} MB over "
                f"{verdict['window_s']} s, allowed {verdict['allowed_growth_mb']} MB)"
            )
    assert not problems, "\n".join(problems)
