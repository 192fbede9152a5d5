"""What ggml's reference kernels (batch-invariant flash attention; docs/performance.md, "Batch invariance") cost:
two stacks of one replica in turns, the second with GGML_CPU_USE_REF=1. Needs a llama.cpp build that reads that
variable, which `make` does not build yet: patch `ctx->use_ref = false;` in ggml_backend_cpu_init
(vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.cpp of the llama-cpp-python sdist) to read it, build a wheel of
the patched sdist with the Makefile's CMAKE_ARGS, `pip install --target DIR` it, and put DIR first:

    PYTHONPATH=DIR:services:build/gen/python:clients/python .venv/bin/python bench/reference_kernels_cost.py

Without such a build both stacks run the same kernels (a check of the method: the figures should agree).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from paired import (
    HI,
    MODEL,
    NO_END,
    c16_tokens_per_s,
    carries_token,
    first_token_s,
    in_turns,
    p50_ms,
    two_stacks,
    warm,
)

# About 1,200 tokens, made new for each request (the prefix cache would answer a repeated one).
LONG = "Summarize: " + "The sea and the wind tell stories of sailors. " * 120


def c1_tokens_per_s(_: str, client: httpx.Client) -> float:
    body = {"model": MODEL, "messages": HI, "max_tokens": 64, "stream": True, "logit_bias": NO_END}
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        tokens = sum(1 for line in reply.iter_lines() if carries_token(line))
    return tokens / (time.perf_counter() - started)


def long_prompt_s(_: str, client: httpx.Client) -> float:
    messages = [{"role": "user", "content": f"Note {time.time_ns()}. {LONG}"}]
    started = time.perf_counter()
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-reference-"))
    with contextlib.ExitStack() as running:
        fast, reference = running.enter_context(two_stacks(work, ("fast", "reference"), {"GGML_CPU_USE_REF": "1"}))
        clients = {
            name: running.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{s.ports.http}", timeout=300))
            for name, s in (("fast", fast), ("reference", reference))
        }
        warm(clients)
        short = in_turns(clients, {"ttft": first_token_s, "c1": c1_tokens_per_s}, 20)
        long = in_turns(clients, {"long": long_prompt_s}, 6)
        c16 = in_turns(clients, {"c16": c16_tokens_per_s}, 4)
    for name in clients:
        print(
            f"{name:9s} TTFT p50 {p50_ms(short[name]['ttft'])} ms, c1 {statistics.median(short[name]['c1']):.1f} "
            f"tokens/s, new long prompt p50 {p50_ms(long[name]['long'])} ms, "
            f"c16 {statistics.mean(c16[name]['c16']):.1f} tokens/s"
        )
    print(f"(logs in {work})")


if __name__ == "__main__":
    main()
