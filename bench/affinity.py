"""`make bench`, part two: multi-turn conversations on three replicas behind the edge, balanced by least
request (no key) and by affinity (`prompt_cache_key` = the conversation). The same conversations, shape and
concurrency both times; each mode on a fresh stack, so no prefix cache carries over.

Figures per mode: prompt tokens the replicas evaluated (prompt - cached), the share served from the prefix
cache, time to first token (p50/p99), and the wall time. Adds `affinity` to bench/results/results.json and
re-renders BENCHMARKS.md.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

import report
from chatwire_server.edge import stack

MODEL = "smollm2-135m-instruct"
REPLICAS = 3
CONVERSATIONS = 12
TURNS = 6
CONCURRENCY = 6
REPLY_TOKENS = 16


def system_prompt(mode: str, conversation: int) -> str:
    """A ~350-token instruction block of the conversation's own (a tenant's assistant, say)."""
    rules = " ".join(f"Rule {n}: answer in plain words and keep to the topic of item {n}." for n in range(1, 26))
    return f"[{mode} / conversation {conversation}] You are a careful assistant. {rules}"


def converse(base_url: str, mode: str, conversation: int) -> list[dict[str, float]]:
    """One conversation, turn by turn; each turn's timing and usage."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt(mode, conversation)}]
    turns = []
    with httpx.Client(timeout=300) as client:
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Tell me one fact about item {turn + 1}."})
            body: dict[str, Any] = {
                "model": MODEL,
                "messages": messages,
                "max_tokens": REPLY_TOKENS,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if mode == "affinity":
                body["prompt_cache_key"] = f"conversation-{conversation}"
            started = time.monotonic()
            first = None
            text, usage = [], None
            with client.stream("POST", f"{base_url}/chat/completions", json=body) as reply:
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = first or time.monotonic()
                        text.append(chunk["choices"][0]["delta"]["content"])
                    usage = chunk.get("usage") or usage
            assert usage is not None and first is not None
            messages.append({"role": "assistant", "content": "".join(text)})
            turns.append(
                {
                    "ttft_s": first - started,
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                }
            )
    return turns


def run_mode(mode: str, work: Path) -> dict[str, Any]:
    """A fresh three-replica stack, the conversations on it, its figures."""
    with stack.launched(work, mode, REPLICAS) as running:
        base_url = f"http://127.0.0.1:{running.ports.http}/v1"
        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            turns = [t for c in pool.map(lambda n: converse(base_url, mode, n), range(CONVERSATIONS)) for t in c]
        wall = time.monotonic() - started
    prompt = sum(t["prompt_tokens"] for t in turns)
    cached = sum(t["cached_tokens"] for t in turns)
    ttfts = sorted(t["ttft_s"] for t in turns)
    return {
        "requests": len(turns),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "evaluated_tokens": prompt - cached,
        "cached_share": round(cached / prompt, 3),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-affinity-"))
    figures = {}
    for mode in ("least_request", "affinity"):
        print(f"replicas, {mode}:", flush=True)
        figures[mode] = run_mode(mode, work)
        print(f"    {figures[mode]}", flush=True)
    report.save_section(
        "affinity",
        {
            "replicas": REPLICAS,
            "conversations": CONVERSATIONS,
            "turns": TURNS,
            "concurrency": CONCURRENCY,
            "reply_tokens": REPLY_TOKENS,
            "engine_threads": int(stack.replica_env(REPLICAS)["CHATWIRE_ENGINE_THREADS"]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "modes": figures,
        },
    )
    print(f"wrote the affinity figures to {report.RESULTS} (logs in {work})")


if __name__ == "__main__":
    main()
