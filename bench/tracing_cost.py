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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

import report
from chatwire_server.edge import stack
from tls_cost import c16_tokens_per_s, first_token_s, one_token_s, p50_ms

# The tests' OTLP receiver.
RECEIVER = Path(__file__).resolve().parents[1] / "tests" / "otlp.py"

ROUNDS = 200
C16_ROUNDS = 6
C16_TOKENS = 64


def models_s(client: httpx.Client) -> float:
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
        off = running.enter_context(stack.launched(work, "off", 1))
        os.environ.update(tracing_env)  # the second stack (its server and Envoy) reads them
        try:
            on = running.enter_context(stack.launched(work, "on", 1))
        finally:
            for name in tracing_env:
                os.environ.pop(name)
        clients = {
            name: running.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{s.ports.http}", timeout=120))
            for name, s in (("off", off), ("on", on))
        }
        for client in clients.values():  # warm: connections open, prompt cached
            for _ in range(5):
                first_token_s(client)
        samples: dict[str, dict[str, list[float]]] = {n: {"models": [], "ttft": [], "one_token": []} for n in clients}
        for round_ in range(ROUNDS):
            for name in list(clients)[:: 1 if round_ % 2 else -1]:
                samples[name]["models"].append(models_s(clients[name]))
                samples[name]["ttft"].append(first_token_s(clients[name]))
                samples[name]["one_token"].append(one_token_s(clients[name]))
        c16: dict[str, list[float]] = {name: [] for name in clients}
        for round_ in range(C16_ROUNDS):
            for name in list(clients)[:: 1 if round_ % 2 else -1]:
                c16[name].append(c16_tokens_per_s(clients[name]))
        time.sleep(3)  # the last batches of spans
    figures: dict[str, Any] = {
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
        "cpu": report.cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": ROUNDS,
        "c16_rounds": C16_ROUNDS,
        "c16_tokens": C16_TOKENS,
        "c16_ratio_median": round(statistics.median(ratios), 4),
        "spans_received": int(counts.read_text().split()[-1]),
        "modes": figures,
    }
    print(json.dumps(section, indent=2))
    report.save_section("tracing", section)
    print(f"wrote the tracing figures to {report.RESULTS} (logs in {work})")


if __name__ == "__main__":
    main()
