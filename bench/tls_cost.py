"""`make bench`, TLS: what HTTPS at the edge and mutual TLS to the replica cost. Two stacks of one replica on this
machine, one plaintext, one with both (certificates from a CA made for the run), measured in turns so that both see
the same minutes of it:

- time to first token of a short stream, on a kept-open connection (the handshake paid once), and a 1-token
  request's total time;
- a new connection's TLS handshake to the edge (TCP connect + handshake, against TCP connect alone);
- c16: 16 streams at once, tokens per second, alternating stacks over several rounds.

Adds `tls` to bench/results/results.json and re-renders BENCHMARKS.md.

    PYTHONPATH=services:build/gen/python:clients/python .venv/bin/python bench/tls_cost.py
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

import report
from chatwire_server.edge import stack
from chatwire_server.edge.certs import write_local_set

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Hi"}]
NO_END = {"0": -100, "2": -100, "4": -100}
ROUNDS = 200
C16_ROUNDS = 3
C16_TOKENS = 64


def carries_token(line: str) -> bool:
    """Whether an SSE line is a chunk with generated text (not the role chunk that opens a stream)."""
    return '"content":"' in line and '"content":""' not in line


def first_token_s(client: httpx.Client) -> float:
    body = {"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True, "logit_bias": NO_END}
    started = time.perf_counter()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():  # to the end, so the connection is reused
            if first is None and carries_token(line):
                first = time.perf_counter() - started
    assert first is not None, "no token"
    return first


def one_token_s(client: httpx.Client) -> float:
    started = time.perf_counter()
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 1}).raise_for_status()
    return time.perf_counter() - started


def connect_s(port: int, context: ssl.SSLContext | None) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if context is None:
            return time.perf_counter() - started
        with context.wrap_socket(raw, server_hostname="localhost"):
            return time.perf_counter() - started


def c16_tokens_per_s(client: httpx.Client) -> float:
    body = {"model": MODEL, "messages": HI, "max_tokens": C16_TOKENS, "stream": True, "logit_bias": NO_END}

    def stream(_: int) -> int:
        with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            return sum(1 for line in reply.iter_lines() if carries_token(line))

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        tokens = sum(pool.map(stream, range(16)))
    return tokens / (time.perf_counter() - started)


def p50_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-tls-"))
    certs = work / "certs"
    write_local_set(certs)
    tls_env = {
        "CHATWIRE_TLS_CERT_FILE": str(certs / "server.pem"),
        "CHATWIRE_TLS_KEY_FILE": str(certs / "server-key.pem"),
        "CHATWIRE_MTLS_CA_FILE": str(certs / "ca.pem"),
        "CHATWIRE_MTLS_CERT_FILE": str(certs / "server.pem"),
        "CHATWIRE_MTLS_KEY_FILE": str(certs / "server-key.pem"),
    }
    verify = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with contextlib.ExitStack() as running:
        plain = running.enter_context(stack.launched(work, "plaintext", 1))
        os.environ.update(tls_env)  # the second stack (its servers and Envoy) reads them
        try:
            secure = running.enter_context(stack.launched(work, "tls", 1))
        finally:
            for name in tls_env:
                os.environ.pop(name)
        clients = {
            "plaintext": running.enter_context(
                httpx.Client(base_url=f"http://127.0.0.1:{plain.ports.http}", timeout=120)
            ),
            "tls": running.enter_context(
                httpx.Client(base_url=f"https://127.0.0.1:{secure.ports.http}", verify=verify, timeout=120)
            ),
        }
        ports = {"plaintext": plain.ports.http, "tls": secure.ports.http}
        for client in clients.values():  # warm: connections open, prompt cached
            for _ in range(5):
                first_token_s(client)
        samples: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "one_token": [], "connect": []} for n in clients}
        for round_ in range(ROUNDS):
            for name in list(clients)[:: 1 if round_ % 2 else -1]:
                samples[name]["ttft"].append(first_token_s(clients[name]))
                samples[name]["one_token"].append(one_token_s(clients[name]))
                samples[name]["connect"].append(connect_s(ports[name], verify if name == "tls" else None))
        c16: dict[str, list[float]] = {name: [] for name in clients}
        for round_ in range(C16_ROUNDS):
            for name in list(clients)[:: 1 if round_ % 2 else -1]:
                c16[name].append(c16_tokens_per_s(clients[name]))
    figures: dict[str, Any] = {
        name: {
            "ttft_p50_ms": p50_ms(values["ttft"]),
            "one_token_p50_ms": p50_ms(values["one_token"]),
            "new_connection_p50_ms": p50_ms(values["connect"]),
            "c16_tokens_per_s": round(statistics.mean(c16[name]), 1),
        }
        for name, values in samples.items()
    }
    section = {
        "cpu": report.cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": ROUNDS,
        "c16_rounds": C16_ROUNDS,
        "c16_tokens": C16_TOKENS,
        "modes": figures,
    }
    print(json.dumps(section, indent=2))
    report.save_section("tls", section)
    print(f"wrote the TLS figures to {report.RESULTS} (logs in {work})")


if __name__ == "__main__":
    main()
