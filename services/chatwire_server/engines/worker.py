"""Runs an engine in a child process, so that its death does not take the gRPC server down with it.

The inference code is where a process dies: llama.cpp aborts on a failed assertion or faults, and the
kernel's OOM killer picks the process holding the model. In a child process such a death fails only the
requests in flight, each with an error its client sees (an SSE stream ends with an error event, a gRPC
stream with UNAVAILABLE), instead of resetting every open connection. The server restarts the child;
requests for that model meanwhile get a 503 with `Retry-After`.

Parent and child talk over a socket pair with `multiprocessing.connection` framing (pickled messages).
The child sends its events in batches: an engine that decodes in steps (llama.cpp) sends each step's events of
every request in one message, straight from its scheduler thread; others, one message per turn of the event
loop. The extra hop costs a system call per step, not per token, and no wake-up of the child's event loop.
The child exits when the parent's end closes, so a killed server never leaves a model behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from chatwire_server.domain import ChatRequest, EngineEvent
from chatwire_server.engines.base import IDLE_STATS, StepEvents, SteppingEngine
from chatwire_server.engines.kinds import ENGINE_FACTORIES
from chatwire_server.errors import TRY_ANOTHER_REPLICA, ChatwireError, ServiceUnavailableError

log = logging.getLogger(__name__)

# How long a new worker may take to load its model.
START_TIMEOUT_S = 300.0
# Waits between restarts of a worker that keeps dying at start-up, growing to the last.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# How long a metrics scrape waits for the worker's scheduler state.
STATS_TIMEOUT_S = 1.0
# A worker that has requests in flight but decodes no step (or does not answer) for this long is wedged: it is
# killed and restarted, its requests ending with `engine_failed`, rather than hanging every request for good. A
# step takes well under a second; the bound leaves room for a machine shared with busy neighbours.
STALL_TIMEOUT_S = float(os.environ.get("CHATWIRE_ENGINE_STALL_TIMEOUT_S", "60"))
WATCH_INTERVAL_S = 1.0


@dataclass
class _Pending:
    """A request waiting for the worker's events, and the event loop that waits."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any]


class WorkerEngine:
    """An `Engine` whose work happens in a child process running engine `kind` with `settings`."""

    def __init__(
        self, model: str, kind: str, settings: dict[str, Any], on_restart: Callable[[], None] | None = None
    ) -> None:
        self._model = model
        self._kind = kind
        self._settings = settings
        self._on_restart = on_restart
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._stats = dict(IDLE_STATS)
        self._stats_lock = threading.Lock()
        self._stats_ready = threading.Event()
        self._closing = False
        # Set while a worker is up; None while it is being restarted.
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._start_worker()  # fails the server's start-up if the model cannot load
        self._reader = threading.Thread(target=self._read_forever, name=f"worker-reader-{model}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch_forever, name=f"worker-watchdog-{model}", daemon=True).start()

    def stats(self) -> dict[str, int]:
        """The worker's scheduler state, asked for at scrape time (the last figures if it does not answer in
        time, idle ones while it restarts)."""
        answer = self._ask_stats()
        return answer if answer is not None else self._stats

    def _ask_stats(self) -> dict[str, int] | None:
        """The worker's scheduler state now, or None if it cannot be asked (restarting) or does not answer in
        time. Shared by metrics scrapes and the watchdog."""
        with self._stats_lock:
            self._stats_ready.clear()
            try:
                self._send(("stats",))
            except ServiceUnavailableError:
                return None
            return self._stats if self._stats_ready.wait(STATS_TIMEOUT_S) else None

    async def generate(self, request: ChatRequest) -> AsyncGenerator[EngineEvent, None]:
        request_id = next(self._ids)
        pending = _Pending(asyncio.get_running_loop(), asyncio.Queue())
        self._pending[request_id] = pending
        ended = False
        try:
            self._send(("generate", request_id, request))
            while True:
                message = await pending.events.get()
                if message is None or isinstance(message, BaseException):
                    ended = True  # the worker is done with this request
                    if message is None:
                        return
                    raise message
                yield message
        finally:
            del self._pending[request_id]
            if not ended and self._conn is not None:
                with contextlib.suppress(ServiceUnavailableError):  # the client went away: stop the work too
                    self._send(("cancel", request_id))

    async def close(self) -> None:
        """Let the worker close its engine (requests in flight end with an error), then reap it."""
        self._closing = True
        with contextlib.suppress(ServiceUnavailableError):
            self._send(("close",))
        process = self._process
        if process is not None:
            try:
                await asyncio.to_thread(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)

    # --- the connection -----------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise ServiceUnavailableError(
                f"The model `{self._model}` is restarting after its engine stopped. Retry shortly.",
                code="engine_restarting",
                metadata=[("retry-after", "2"), TRY_ANOTHER_REPLICA],
            )
        try:
            with self._send_lock:
                conn.send(message)
        except OSError:  # the worker died a moment ago; the reader is failing its requests
            raise ServiceUnavailableError(
                f"The engine serving `{self._model}` stopped. Retry shortly.",
                code="engine_restarting",
                metadata=[("retry-after", "2"), TRY_ANOTHER_REPLICA],
            ) from None

    def _start_worker(self) -> None:
        """Start a worker and wait until its model is loaded; raises what the worker failed with."""
        parent_end, child_end = socket.socketpair()
        command = [sys.executable, "-m", "chatwire_server.engines.worker", "--fd", str(child_end.fileno())]
        command += ["--model", self._model, "--log-level", logging.getLevelName(logging.getLogger().level)]
        process = subprocess.Popen(command, pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL)
        child_end.close()
        conn = Connection(parent_end.detach())
        try:
            conn.send((self._kind, self._settings))
            if not conn.poll(START_TIMEOUT_S):
                raise TimeoutError(f"the engine of {self._model!r} did not load in {START_TIMEOUT_S:.0f} s")
            status, detail = conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            conn.close()
            process.kill()
            process.wait()
            if isinstance(exc, TimeoutError):
                raise
            raise RuntimeError(f"the engine worker of {self._model!r} exited with code {process.returncode}") from exc
        if status != "ready":
            conn.close()
            process.wait()
            raise detail
        self._process, self._conn = process, conn
        log.info("engine worker started", extra={"model": self._model, "engine": self._kind, "pid": process.pid})

    def _read_forever(self) -> None:
        """Route the worker's messages to the waiting requests; on its death, fail them and restart it."""
        while True:
            conn = self._conn
            assert conn is not None
            try:
                while True:
                    self._dispatch(conn.recv())
            except (EOFError, OSError):
                pass
            self._conn = None
            conn.close()
            if self._closing:
                self._fail_all(ServiceUnavailableError("The server is shutting down."))
                return
            self._worker_died()
            if not self._restart():
                return

    def _watch_forever(self) -> None:
        """Kill a worker that makes no progress while requests wait on it; the reader then restarts it."""
        steps, progress_at = None, time.monotonic()
        while not self._closing:
            time.sleep(WATCH_INTERVAL_S)
            process = self._process
            if not self._pending or self._conn is None or process is None:
                steps, progress_at = None, time.monotonic()
                continue
            answer = self._ask_stats()
            # An engine that counts no steps (the scripted one) is judged by its answering alone.
            now_steps = answer.get("steps", time.monotonic()) if answer is not None else None
            if now_steps is not None and now_steps != steps:
                steps, progress_at = now_steps, time.monotonic()
            elif time.monotonic() - progress_at > STALL_TIMEOUT_S and process is self._process:
                log.error(
                    "engine worker made no progress; killing it to restart it",
                    extra={
                        "model": self._model,
                        "pid": process.pid,
                        "stalled_s": round(time.monotonic() - progress_at),
                    },
                )
                process.kill()
                steps, progress_at = None, time.monotonic()

    def _dispatch(self, batch: list[tuple[Any, ...]]) -> None:
        """Hand the worker's messages (events, ends, errors) to their requests, from the reader thread: one
        wake-up of each event loop per batch, not per event."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for message in batch:
            if message[0] == "stats":
                self._stats = message[1]
                self._stats_ready.set()
                continue
            _, request_id, payload = message
            pending = self._pending.get(request_id)
            if pending is not None:  # else the request was cancelled and late events are dropped
                by_loop.setdefault(pending.loop, []).append((pending.events, payload))
        for loop, events in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop has closed
                loop.call_soon_threadsafe(_put_each, events)

    def _worker_died(self) -> None:
        assert self._process is not None
        code = self._process.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        log.error(
            "engine worker died; failing its requests and restarting it",
            extra={"model": self._model, "pid": self._process.pid, "exit_code": code, "in_flight": len(self._pending)},
        )
        self._stats = dict(IDLE_STATS)
        self._fail_all(
            ServiceUnavailableError(
                f"The engine serving `{self._model}` stopped unexpectedly (it {how}); this reply is incomplete. "
                "The engine is restarting: retry the request.",
                code="engine_failed",
                metadata=[("retry-after", "2")],
            )
        )
        if self._on_restart is not None:
            self._on_restart()

    def _fail_all(self, error: ChatwireError) -> None:
        self._dispatch([("event", request_id, error) for request_id in list(self._pending)])

    def _restart(self) -> bool:
        for attempt in itertools.count():
            if self._closing:
                return False
            try:
                self._start_worker()
                return True
            except Exception:
                wait = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.exception("engine worker failed to start", extra={"model": self._model, "retry_in_s": wait})
                time.sleep(wait)
        return False  # unreachable: the loop above only ends by returning


# --- the child process ---------------------------------------------------------------------------------


def _put_each(events: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, payload in events:
        queue.put_nowait(payload)


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a plain RuntimeError naming it (the child has logged the trace)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


async def _serve_parent(conn: Connection, model: str) -> None:
    kind, settings = conn.recv()
    try:
        engine = ENGINE_FACTORIES[kind](settings)
    except Exception as exc:
        conn.send(("failed", _portable(exc)))
        return
    conn.send(("ready", os.getpid()))

    loop = asyncio.get_running_loop()
    outbox: list[tuple[Any, ...]] = []
    sending = threading.Lock()  # the event loop and the engine's own thread both send

    def send(batch: list[tuple[Any, ...]]) -> None:
        with sending, contextlib.suppress(OSError):  # the parent is gone; the command reader ends the process
            conn.send(batch)

    def post(message: tuple[Any, ...]) -> None:
        if not outbox:
            loop.call_soon(flush)
        outbox.append(message)

    def flush() -> None:
        batch = outbox.copy()
        outbox.clear()
        send(batch)

    # A stepping engine's requests: their cancel functions, until their last event is sent.
    cancels: dict[Hashable, Callable[[], None]] = {}

    def deliver(batch: StepEvents) -> None:
        """From the engine's thread, after each step: every request's events in one message."""
        send([("event", tag, _portable(e) if isinstance(e, BaseException) else e) for tag, e in batch])
        if ended := [tag for tag, event in batch if event is None]:
            loop.call_soon_threadsafe(forget, ended)

    def forget(request_ids: list[Hashable]) -> None:
        for request_id in request_ids:
            cancels.pop(request_id, None)

    async def run(request_id: int, request: ChatRequest) -> None:
        try:
            if isinstance(engine, SteppingEngine):
                cancels[request_id] = await engine.submit(request, request_id, deliver)
                return
            async with aclosing(engine.generate(request)) as events:
                async for event in events:
                    post(("event", request_id, event))
            post(("event", request_id, None))
        except asyncio.CancelledError:
            pass  # the parent cancelled it and expects nothing more
        except ChatwireError as exc:
            post(("event", request_id, _portable(exc)))
        except Exception as exc:
            log.exception("engine failed", extra={"model": model})
            post(("event", request_id, _portable(exc)))
        finally:
            running.pop(request_id, None)

    commands: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def read_commands() -> None:
        try:
            while True:
                loop.call_soon_threadsafe(commands.put_nowait, conn.recv())
        except (EOFError, OSError):
            loop.call_soon_threadsafe(commands.put_nowait, None)

    running: dict[int, asyncio.Task[None]] = {}
    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    while (command := await commands.get()) is not None:
        if command[0] == "generate":
            running[command[1]] = asyncio.create_task(run(command[1], command[2]))
        elif command[0] == "cancel" and (cancel := cancels.pop(command[1], None)):
            cancel()
        elif command[0] == "cancel" and (task := running.get(command[1])):
            task.cancel()  # still being validated, or an engine without steps
        elif command[0] == "stats":
            post(("stats", engine.stats()))
        elif command[0] == "close":
            await engine.close()  # requests still running end with an error event
            await asyncio.gather(*running.values(), return_exceptions=True)
            flush()
            return
    # The parent died: nobody is left to serve.
    os._exit(0)


def main() -> None:
    """Entry point of the worker process (started by `WorkerEngine`, not by hand)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM reach the whole process group; the server decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from chatwire_server import logs

    logs.configure(args.log_level)
    asyncio.run(_serve_parent(Connection(args.fd), args.model))


if __name__ == "__main__":
    main()
