"""`make bench`, tracing: what OpenTelemetry traces at 100 % sampling cost against tracing off. Two stacks of one
replica on this machine, one without OTEL_* settings, one whose edge and server export every span over OTLP/gRPC
to a receiver in a process of its own (tests/otlp.py --count: it only counts them, as a collector on another
machine would take little from this one), measured in turns so that both see the same minutes of the machine:

- a `GET /v1/models` round trip (the edge, the RPC and its spans, no model work): the per-request overhead;
- time to first token of a short stream and a 1-token request's total time, on kept-open connections;
- c16: 16 streams at once, tokens per second, alternating stacks over several rounds.

Adds `tracing` to bench/results/results.json and re-renders BENCHMARKS.md.

    PYTHONPATH=services:build/gen/python:clients/python .venv/bin/python bench/tracing_cost.py
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from chatwire_server.edge import stack
from paired import (
    STREAM_TOKENS,
    c16_tokens_per_s,
    first_token_s,
    in_turns,
    one_token_s,
    p50_ms,
    publish,
    two_stacks,
    warm,
)

ROUNDS = 200
C16_ROUNDS = 6
# The tests' OTLP receiver.
RECEIVER = Path(__file__).resolve().parents[1] / "tests" / "otlp.py"


def models_s(_: str, client: httpx.Client) -> float:
    started = time.perf_counter()
    client.get("/v1/models").raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-tracing-"))
    port = stack.free_port()
    counts = work / "receiver.log"
    tracing_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with contextlib.ExitStack() as running:
        command = [sys.executable, str(RECEIVER), "--count", "--grpc-port", str(port), "--http-port", "0"]
        receiver = subprocess.Popen(command, env=stack.python_env(), stdout=running.enter_context(counts.open("wb")))
        running.callback(stack.stop, receiver)
        off, on = running.enter_context(two_stacks(work, ("off", "on"), tracing_env))
        clients = {
            name: running.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{s.ports.http}", timeout=120))
            for name, s in (("off", off), ("on", on))
        }
        warm(clients)
        samples = in_turns(clients, {"models": models_s, "ttft": first_token_s, "one_token": one_token_s}, ROUNDS)
        c16 = {name: values["c16"] for name, values in in_turns(clients, {"c16": c16_tokens_per_s}, C16_ROUNDS).items()}
        time.sleep(3)  # the last batches of spans
    figures = {
        name: {
            "models_p50_ms": p50_ms(values["models"]),
            "ttft_p50_ms": p50_ms(values["ttft"]),
            "one_token_p50_ms": p50_ms(values["one_token"]),
            "c16_tokens_per_s": round(statistics.mean(c16[name]), 1),
        }
        for name, values in samples.items()
    }
    # Each round's on/off ratio: the two runs of a round are seconds apart, so the machine's drift cancels.
    ratios = [on / off for on, off in zip(c16["on"], c16["off"], strict=True)]
    section = {
        "rounds": ROUNDS,
        "c16_rounds": C16_ROUNDS,
        "c16_tokens": STREAM_TOKENS,
        "c16_ratio_median": round(statistics.median(ratios), 4),
        "spans_received": int(counts.read_text().split()[-1]),
        "modes": figures,
    }
    publish("tracing", section, "tracing", work)


if __name__ == "__main__":
    main()
