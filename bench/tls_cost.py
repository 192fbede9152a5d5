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
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from chatwire_server.edge.certs import write_local_set
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
C16_ROUNDS = 3


def connect_s(port: int, context: ssl.SSLContext | None) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if context is None:
            return time.perf_counter() - started
        with context.wrap_socket(raw, server_hostname="localhost"):
            return time.perf_counter() - started


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
        plain, secure = running.enter_context(two_stacks(work, ("plaintext", "tls"), tls_env))
        clients = {
            "plaintext": running.enter_context(
                httpx.Client(base_url=f"http://127.0.0.1:{plain.ports.http}", timeout=120)
            ),
            "tls": running.enter_context(
                httpx.Client(base_url=f"https://127.0.0.1:{secure.ports.http}", verify=verify, timeout=120)
            ),
        }
        ports = {"plaintext": plain.ports.http, "tls": secure.ports.http}

        def connect(name: str, _: httpx.Client) -> float:
            return connect_s(ports[name], verify if name == "tls" else None)

        warm(clients)
        samples = in_turns(clients, {"ttft": first_token_s, "one_token": one_token_s, "connect": connect}, ROUNDS)
        c16 = in_turns(clients, {"c16": c16_tokens_per_s}, C16_ROUNDS)
    figures = {
        name: {
            "ttft_p50_ms": p50_ms(values["ttft"]),
            "one_token_p50_ms": p50_ms(values["one_token"]),
            "new_connection_p50_ms": p50_ms(values["connect"]),
            "c16_tokens_per_s": round(statistics.mean(c16[name]["c16"]), 1),
        }
        for name, values in samples.items()
    }
    section = {"rounds": ROUNDS, "c16_rounds": C16_ROUNDS, "c16_tokens": STREAM_TOKENS, "modes": figures}
    publish("tls", section, "TLS", work)


if __name__ == "__main__":
    main()
