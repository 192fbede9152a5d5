"""Streaming speed through the whole stack (Envoy + gRPC + engine), on free ports.

1. One streamed reply of `--max-tokens` (200) tokens: time to first token and decode tokens/s.
2. `--concurrency 1,4,16`: that many streams at once, each `--sweep-tokens` (128) tokens at temperature 0.8;
   aggregate output tokens/s over the wall time of the round, and TTFT p50.
Counts only streams that complete; a cut stream fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from chatwire_server import stack

MODEL = "smollm2-135m-instruct"
PROMPT = "Count from 1 to 1000, separated by commas."
SWEEP_PROMPTS = [
    "Write a story about a lighthouse keeper.",
    "Explain how bread rises.",
    "Describe a walk through a forest in autumn.",
    "List some facts about the planet Mars.",
]


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, temperature: float) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        # Long replies for a fair count: the end-of-turn token is banned (SmolLM2's <|im_end|> is id 2).
        "logit_bias": {"2": -100},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    usage: dict[str, int] = {}
    done = False
    async with client.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[len("data: ") :])
                usage = chunk.get("usage") or usage
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
    if not done or usage.get("completion_tokens") != max_tokens:
        raise RuntimeError(f"stream cut: done={done} usage={usage}")
    tokens = usage["completion_tokens"]
    return {"tokens": tokens, "ttft_s": first - started, "decode_tps": (tokens - 1) / (last - first), "end": last}


async def sweep(url: str, levels: list[int], max_tokens: int) -> list[str]:
    lines = []
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, "Hi", 8, 0.8)  # warm-up
        for level in levels:
            started = time.perf_counter()
            runs = await asyncio.gather(
                *(one_stream(client, url, SWEEP_PROMPTS[i % 4], max_tokens, 0.8) for i in range(level))
            )
            wall = max(r["end"] for r in runs) - started
            total = sum(r["tokens"] for r in runs)
            ttft = statistics.median(r["ttft_s"] for r in runs)
            lines.append(
                f"concurrency {level:>3}: {total / wall:6.1f} tok/s aggregate, "
                f"TTFT p50 {ttft * 1000:6.0f} ms, {total} tokens in {wall:.1f} s"
            )
            print(lines[-1], flush=True)
    return lines


async def single(url: str, max_tokens: int, runs: int) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, "Hi", 8, 0)
        results = [await one_stream(client, url, PROMPT, max_tokens, 0) for _ in range(runs)]
    for r in results:
        print(f"{r['tokens']} tokens  ttft {r['ttft_s'] * 1000:.0f} ms  {r['decode_tps']:.1f} tok/s")
    print(
        f"single stream, median of {runs} x {max_tokens} tokens: "
        f"{statistics.median(r['decode_tps'] for r in results):.1f} tok/s through Envoy, "
        f"TTFT {statistics.median(r['ttft_s'] for r in results) * 1000:.0f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--sweep-tokens", type=int, default=128)
    args = parser.parse_args()
    ports = stack.Ports(http=stack.free_port(), grpc=stack.free_port(), admin=stack.free_port())
    work = Path(tempfile.mkdtemp(prefix="chatwire-bench-"))
    config = work / "envoy.yaml"
    config.write_text(stack.render_envoy_config(ports))
    with (work / "server.log").open("wb") as server_log, (work / "envoy.log").open("wb") as envoy_log:
        server = stack.start_server(ports.grpc, server_log)
        envoy = stack.start_envoy(config, ports.admin, envoy_log)
        try:
            stack.wait_for_server(ports.grpc, server)
            stack.wait_for_envoy(ports.admin, envoy)
            url = f"http://127.0.0.1:{ports.http}/v1/chat/completions"
            asyncio.run(single(url, args.max_tokens, args.runs))
            levels = [int(c) for c in args.concurrency.split(",") if c]
            asyncio.run(sweep(url, levels, args.sweep_tokens))
        except Exception as exc:
            sys.exit(f"benchmark failed: {exc} (logs in {work})")
        finally:
            stack.stop(envoy)
            stack.stop(server)


if __name__ == "__main__":
    main()
