"""The ceiling: the workloads decoded in-process with no server at all. Run by bench/run.py in a process of its own.

`--mode raw`: llama.cpp's own batched loop through llama-cpp-python's low-level API, the shape of the fastest
possible server on this build: each wave of requests is prefilled together (`n` copies share one prompt
evaluation), then every sequence decodes one token per `llama_decode`, sampled in C with the same sampler
chain as chatwire's (logit bias, temperature, seeded draw), with prefixes reused ideally (see `wave`). No text
decoding, no queues, no threads: the most a server on this build could get out of the same requests.

`--mode engine`: chatwire's own engine (`LlamaCppEngine`) called in-process, without gRPC, Envoy or the
worker hop: the difference to the full stack is the cost of the server around the engine.

Prints a JSON line per workload, {"workload": name, "figures": ...}, then {"peak_rss_kb": ...}. The workloads
come from --workloads, or with --serve one per stdin line, {"workload": name, "variant": n}: bench/run.py keeps
the model loaded and asks for each workload when its turn comes, so that every target runs it in the same minute.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
from llama_cpp import _logger as llama_cpp_logger

if TYPE_CHECKING:
    from chatwire_server.engines.base import Engine

from workloads import NO_END, OVERHEAD, WORKLOADS, Stream, Workload, figures

THREADS = 2
KV_CELLS = 32768
N_BATCH = 512
# SmolLM2's end-of-generation tokens, banned as the HTTP workloads ban them.
END_TOKENS = tuple(int(token) for token in NO_END)


def _chatml(messages: list[dict[str, str]]) -> str:
    """SmolLM2's chat template (ChatML), as every server renders it."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


class RawLoop:
    """A bare batched decode loop over one llama.cpp context."""

    def __init__(self, model_path: Path) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(model_path).encode(), llama_cpp.llama_model_default_params()
        )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = KV_CELLS
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = 256
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = THREADS
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # Room for a shared prompt token that belongs to every sequence of a wave.
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 256)
        # The prompt whose cells sequence 0 still holds from the previous wave.
        self.cached: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        tokens = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, len(data) + 8, False, True)
        return list(tokens[:count])

    def sampler(self, seed: int) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        banned = [llama_cpp.llama_logit_bias(token, -100.0) for token in END_TOKENS]
        bias = (llama_cpp.llama_logit_bias * len(banned))(*banned)
        llama_cpp.llama_sampler_chain_add(
            chain, llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(banned), bias)
        )
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(0.8))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _decode(self, entries: list[tuple[int, int, list[int], bool]]) -> None:
        """entries: (token, pos, seq ids, wants logits)."""
        batch = self.batch
        for i, (token, pos, seq_ids, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = len(seq_ids)
            for j, seq_id in enumerate(seq_ids):
                batch.seq_id[i][j] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def wave(self, workload: Workload, indexes: list[int]) -> tuple[list[Stream], float]:
        """Prefill the wave's prompts together, each shared prefix once, then decode every sequence."""
        started = time.perf_counter()
        streams = [Stream(started=started) for _ in indexes]
        prompts = [self.tokenize(_chatml(workload.messages(i))) for i in indexes]
        # The ideal of prefix reuse: what the wave's prompts share is evaluated once (one batch entry for all
        # their sequences), and what the previous wave left in sequence 0 is kept (every prompt keeps its
        # last token to evaluate: its logits start the reply).
        shared = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        kept = min(_common_prefix([self.cached, prompts[0]]), shared)
        llama_cpp.llama_memory_seq_keep(self.memory, 0)
        llama_cpp.llama_memory_seq_rm(self.memory, 0, kept, -1)
        for r in range(1, len(prompts)):
            llama_cpp.llama_memory_seq_cp(self.memory, 0, r * workload.n, 0, kept)
        self.cached = prompts[0]
        # Sequence s belongs to request s // n; the prompt goes to the request's first sequence, then is shared.
        n = workload.n
        seqs = [(r, r * n + c) for r in range(len(indexes)) for c in range(n)]
        samplers = {seq: self.sampler(seq + 1) for _, seq in seqs}
        pos = {seq: len(prompts[r]) for r, seq in seqs}
        next_token: dict[int, int] = {}
        last_seen: dict[int, float] = {}

        def sample(request: int, rows: list[int]) -> None:
            """Sample the request's n sequences from their logits rows."""
            now = time.perf_counter()
            for c, row in enumerate(rows):
                seq = request * n + c
                next_token[seq] = llama_cpp.llama_sampler_sample(samplers[seq], self.ctx, row)
                stream = streams[request]
                if seq in last_seen:
                    stream.gaps.append(now - last_seen[seq])
                stream.first_token = stream.first_token or now
                last_seen[seq] = now
                stream.chunks[c] = stream.chunks.get(c, 0) + 1

        # Prefill: prompt tokens in batches of N_BATCH; a request samples as soon as its last token is decoded.
        firsts = [r * n for r in range(len(prompts))]
        pending = [(-1, p, prompts[0][p], firsts) for p in range(kept, shared)]
        pending += [(r, p, prompt[p], [r * n]) for r, prompt in enumerate(prompts) for p in range(shared, len(prompt))]
        for start in range(0, len(pending), N_BATCH):
            chunk = pending[start : start + N_BATCH]
            entries = [(t, p, seq_ids, r >= 0 and p == len(prompts[r]) - 1) for r, p, t, seq_ids in chunk]
            self._decode(entries)
            for row, (r, p, _, _) in enumerate(chunk):
                if r >= 0 and p == len(prompts[r]) - 1:
                    for c in range(1, n):
                        llama_cpp.llama_memory_seq_cp(self.memory, r * n, r * n + c, -1, -1)
                    sample(r, [row] * n)  # the n choices share the prompt's last logits
        # Decode: one token per sequence per step.
        decode_started = time.perf_counter()
        for _ in range(workload.max_tokens - 1):
            entries = [(next_token[seq], pos[seq], [seq], True) for _, seq in seqs]
            self._decode(entries)
            for _, seq in seqs:
                pos[seq] += 1
            for request in range(len(indexes)):
                sample(request, [request * n + c for c in range(n)])  # rows follow `seqs`
        ended = time.perf_counter()
        for stream in streams:
            stream.ended = ended
        for chain in samplers.values():
            llama_cpp.llama_sampler_free(chain)
        return streams, ended - decode_started

    def run(self, workload: Workload) -> dict[str, Any]:
        """Requests in waves of `concurrency` (with equal-length replies, what continuous batching does)."""
        waves = math.ceil(workload.requests / workload.concurrency)
        streams: list[Stream] = []
        decoding = 0.0
        started = time.perf_counter()
        for w in range(waves):
            indexes = list(range(w * workload.concurrency, min(workload.requests, (w + 1) * workload.concurrency)))
            wave, decode_s = self.wave(workload, indexes)
            streams += wave
            decoding += decode_s
        result = figures(workload, streams, started).to_json()
        # For the record: tokens sampled while decoding (each sequence's first comes from its prefill) over
        # decode time alone.
        decoded = result["tokens"] - sum(len(s.chunks) for s in streams)
        result["decode_tokens_per_s"] = round(decoded / decoding, 2) if decoding else 0.0
        return result


def _common_prefix(prompts: list[list[int]]) -> int:
    shortest = min(len(p) for p in prompts)
    for i in range(shortest):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return shortest


class EngineRunner:
    """The workloads' requests through an engine's `generate`, in-process: chatwire's `LlamaCppEngine` here,
    a `WorkerEngine` too in bench/hops.py."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def one(self, workload: Workload, i: int) -> Stream:
        from chatwire_server import structured
        from chatwire_server.domain import ChatMessage, ChatRequest, Finished, SamplingParams, TextDelta

        request = ChatRequest(
            model="m",
            messages=tuple(ChatMessage(m["role"], m["content"]) for m in workload.messages(i)),
            sampling=SamplingParams(
                max_tokens=workload.max_tokens,
                temperature=0.8,
                logit_bias=dict.fromkeys(END_TOKENS, -100.0),
                constraint=structured.json_constraint(workload.response_format["json_schema"]["schema"], "schema")
                if workload.response_format
                else None,
            ),
            n=workload.n,
        )
        stream = Stream(started=time.perf_counter())
        last: dict[int, float] = {}
        async for event in self.engine.generate(request):
            now = time.perf_counter()
            if isinstance(event, TextDelta) and event.text:
                stream.first_token = stream.first_token or now
                if event.index in last:
                    stream.gaps.append(now - last[event.index])
                last[event.index] = now
                stream.chunks[event.index] = stream.chunks.get(event.index, 0) + 1
            elif isinstance(event, Finished):
                stream.usage_tokens = (stream.usage_tokens or 0) + event.completion_tokens
        stream.ended = time.perf_counter()
        return stream

    async def run(self, workload: Workload) -> dict[str, Any]:
        gate = asyncio.Semaphore(workload.concurrency)

        async def gated(i: int) -> Stream:
            async with gate:
                return await self.one(workload, i)

        started = time.perf_counter()
        streams = await asyncio.gather(*(gated(i) for i in range(workload.requests)))
        return figures(workload, list(streams), started).to_json()


async def run_engine(model_path: Path, requests: Iterator[Workload]) -> None:
    from chatwire_server.engines.llama_cpp import EngineSettings, LlamaCppEngine

    runner = EngineRunner(LlamaCppEngine(model_path, EngineSettings(n_threads=THREADS)))
    await runner.one(Workload("warm", "", 1, 1, max_tokens=8), 0)
    while workload := await asyncio.to_thread(next, requests, None):
        _answer(workload, await runner.run(workload))
    await runner.engine.close()


def _requests(names: str | None) -> Iterator[Workload]:
    """The workloads to run: from --workloads, or one request per line of stdin (--serve)."""
    by_name = {w.name: w for w in [OVERHEAD, *WORKLOADS]}
    if names is not None:
        yield from (by_name[name] for name in names.split(","))
        return
    for line in sys.stdin:
        request = json.loads(line)
        yield dataclasses.replace(by_name[request["workload"]], variant=request.get("variant", 0))


def _answer(workload: Workload, figures: dict[str, Any] | None) -> None:
    """One workload's figures, a line of its own (None: this mode does not run it)."""
    print(json.dumps({"workload": workload.name, "figures": figures}), flush=True)


def _peak_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=Path, required=True)
    parser.add_argument("--mode", choices=("raw", "engine"), default="raw")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--workloads", default=",".join(w.name for w in [OVERHEAD, *WORKLOADS]))
    chosen.add_argument("--serve", action="store_true", help="read the workloads from stdin, one per line")
    args = parser.parse_args()
    requests = _requests(None if args.serve else args.workloads)
    if args.mode == "raw":
        llama_cpp_logger.set_verbose(False)
        loop = RawLoop(args.model_path)
        loop.run(Workload("warm", "", 1, 1, max_tokens=8))
        for workload in requests:
            # The ceiling has no grammar: constrained workloads are compared between servers only.
            _answer(workload, loop.run(workload) if workload.response_format is None else None)
    else:
        asyncio.run(run_engine(args.model_path, requests))
    print(json.dumps({"peak_rss_kb": _peak_rss_kb()}), flush=True)


if __name__ == "__main__":
    main()
