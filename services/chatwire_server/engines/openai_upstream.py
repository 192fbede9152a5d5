"""Engine `openai`: serve a model by forwarding its requests to OpenAI-compatible servers (vLLM, SGLang, TGI,
llama-server, Ollama, another chatwire), so that callers keep chatwire's contract, keys, limits and metrics
while another fleet does the inference.

Requests and replies stay OpenAI JSON end to end: every field and content part reaches the upstream as the
client sent it, and replies come back chunk by chunk as the upstream streams them. The servicer decides what
chatwire itself checks (see `convert.relay_request_from_proto`).

Several upstreams are balanced by requests in flight. One that cannot be connected to, or answers 502, 503,
504 or 429, is passed over for the next before anything was generated (a 500 is not: it may be the request
itself that breaks the server, and every upstream would then be tried with it); one that failed that way is
tried last for `down_for_s`. Nothing is retried once the upstream has accepted the request.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from chatwire_server.engines.base import IDLE_STATS, NO_HEADERS
from chatwire_server.errors import ChatwireError, InvalidRequestError, RateLimitError, UpstreamError, quote

log = logging.getLogger(__name__)
# httpx logs every request at INFO; the service's own request log already has one line per call.
logging.getLogger("httpx").setLevel(logging.WARNING)

# An upstream's error body is read up to this many bytes: enough for any error message, bounded against a
# misbehaving server. A whole completion, up to MAX_REPLY_BODY.
MAX_ERROR_BODY = 64 * 1024
MAX_REPLY_BODY = 64 * 1024 * 1024
# Statuses after which another upstream is tried: the upstream took no work (overloaded, down, restarting).
FAIL_OVER_STATUSES = (429, 502, 503, 504)
# Idle pooled connections are dropped sooner than the servers drop theirs (uvicorn, which vLLM, SGLang and
# llama-cpp-python run on, after 5 s): a request never goes out on a connection the server is closing.
KEEPALIVE_EXPIRY_S = 2.0
# SSE lines end in CRLF, LF or CR, and only there: str.splitlines() would also split inside JSON strings at
# U+2028, U+2029 or U+0085, which servers leave unescaped in the text they stream.
_SSE_LINE_END = re.compile(r"\r\n|\n|\r")


@dataclass
class _Upstream:
    """One OpenAI-compatible server."""

    # Its API root, e.g. `http://10.0.0.5:8000/v1`.
    url: str
    # Its own connection pool: an upstream that hangs cannot take the connections of the others.
    client: httpx.AsyncClient | None = None
    # Requests sent to it and not yet finished (counted from before the connection: a unary reply's headers
    # come only when it is complete).
    in_flight: int = 0
    # Until then (time.monotonic()) it is tried last: it refused a connection or answered 502/503/504.
    down_until: float = 0.0


class OpenAIUpstreamEngine:
    """Forwards chat completions to one or more OpenAI-compatible servers (see the module docstring)."""

    def __init__(
        self,
        model: str,
        base_urls: list[str],
        *,
        api_key: str | None = None,
        connect_timeout_s: float = 5.0,
        timeout_s: float = 600.0,
        down_for_s: float = 10.0,
        max_connections: int = 256,
    ) -> None:
        if not base_urls or not all(isinstance(u, str) and re.match(r"https?://[^/]", u) for u in base_urls):
            raise ValueError(f"engine openai needs `base_urls`, a list of http(s) URLs; got {base_urls!r}")
        self._model = model
        self._upstreams = [_Upstream(url.rstrip("/")) for url in base_urls]
        # No compression: a compressing proxy on the way would hold chunks back.
        self._headers = {"accept-encoding": "identity", **({"authorization": f"Bearer {api_key}"} if api_key else {})}
        # `timeout_s` bounds each silence: a unary reply's whole generation, or the gap between two chunks. A
        # request that finds every pooled connection busy waits no longer than a connection attempt.
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=connect_timeout_s)
        self._limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._down_for_s = down_for_s
        self._turn = itertools.count()

    @classmethod
    def from_settings(cls, model_id: str, settings: dict[str, Any]) -> OpenAIUpstreamEngine:
        """From a config entry's `[models.settings]`; see config/models.toml for the keys."""
        key_env = settings.get("api_key_env")
        api_key = os.environ.get(key_env) if key_env else None
        if key_env and not api_key:
            raise ValueError(f"model {model_id!r}: environment variable {key_env} (api_key_env) is not set")
        urls = settings.get("base_urls") or ([settings["base_url"]] if "base_url" in settings else [])
        return cls(
            settings.get("model", model_id),
            [urls] if isinstance(urls, str) else list(urls),
            api_key=api_key,
            connect_timeout_s=float(settings.get("connect_timeout_s", 5.0)),
            timeout_s=float(settings.get("timeout_s", 600.0)),
            down_for_s=float(settings.get("down_for_s", 10.0)),
            max_connections=int(settings.get("max_connections", 256)),
        )

    async def complete(self, body: dict[str, Any], headers: Mapping[str, str] = NO_HEADERS) -> dict[str, Any]:
        """The upstream's whole completion for `body` (OpenAI JSON), as OpenAI JSON."""
        upstream_body = {**body, "model": self._model, "stream": False}
        upstream_body.pop("stream_options", None)  # OpenAI refuses it without `stream`
        async with self._open(upstream_body, headers) as response:
            try:
                reply = json.loads(await _read_at_most(response, MAX_REPLY_BODY))
            except httpx.TimeoutException as exc:
                raise self._timed_out() from exc
            except httpx.HTTPError as exc:
                raise UpstreamError("The upstream server broke off its reply.") from exc
            except ValueError as exc:
                raise UpstreamError("The upstream server's reply is not JSON.") from exc
        if not isinstance(reply, dict):
            raise UpstreamError("The upstream server's reply is not a chat completion.")
        return reply

    async def stream(
        self, body: dict[str, Any], headers: Mapping[str, str] = NO_HEADERS
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The upstream's chunks for `body`, each as it arrives. Usage is always asked for (the last chunk,
        with no choices): chatwire counts tokens for its limits and metrics. Closing the generator closes the
        upstream request, which stops its generation."""
        options = {**body.get("stream_options", {}), "include_usage": True}
        upstream_body = {**body, "model": self._model, "stream": True, "stream_options": options}
        unfinished = set(range(int(body.get("n", 1))))
        async with self._open(upstream_body, headers) as response:
            try:
                async with contextlib.aclosing(_sse_data(response)) as events:
                    async for data in events:
                        if data == "[DONE]":
                            continue  # read on to the body's end, so that the connection is kept for reuse
                        chunk = _event_chunk(data)
                        for choice in chunk.get("choices") or ():
                            if isinstance(choice, dict) and choice.get("finish_reason"):
                                unfinished.discard(choice.get("index"))
                        yield chunk
            except httpx.TimeoutException as exc:
                raise self._timed_out() from exc
            except httpx.HTTPError as exc:
                raise UpstreamError("The upstream server's stream broke off.") from exc
        if unfinished:  # the stream ended (with `[DONE]` or not) before every choice finished
            raise UpstreamError("The upstream server's stream ended before the reply did.")

    def stats(self) -> dict[str, int]:
        """Requests in flight upstream; the queue and KV cache are the upstream's own."""
        return {**IDLE_STATS, "running_requests": sum(u.in_flight for u in self._upstreams)}

    async def close(self) -> None:
        for upstream in self._upstreams:
            if upstream.client is not None:
                await upstream.client.aclose()

    def _client(self, upstream: _Upstream) -> httpx.AsyncClient:
        if upstream.client is None:  # made on first use, inside the server's event loop
            # trust_env off: no proxy or .netrc from the server's environment applies to upstream calls.
            upstream.client = httpx.AsyncClient(
                timeout=self._timeout, limits=self._limits, headers=self._headers, trust_env=False
            )
        return upstream.client

    @contextlib.asynccontextmanager
    async def _open(self, body: dict[str, Any], headers: Mapping[str, str]) -> AsyncIterator[httpx.Response]:
        """A streaming response with status 200 from the first upstream that accepts `body` (sent with
        `headers`, the trace context, on top of the engine's own)."""
        # What to report if every upstream fails: one that answered says more than one that could not be reached.
        answered: ChatwireError | None = None
        busy = False
        for upstream in self._candidates():
            client = self._client(upstream)
            request = client.build_request("POST", f"{upstream.url}/chat/completions", json=body, headers=headers)
            upstream.in_flight += 1
            try:
                try:
                    response = await client.send(request, stream=True)
                except httpx.PoolTimeout:  # this server's own limit (max_connections): try the next
                    busy = True
                    continue
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing reached it: try the next
                    self._mark_down(upstream, f"cannot connect: {type(exc).__name__}")
                    continue
                except httpx.TimeoutException as exc:
                    raise self._timed_out() from exc
                except httpx.HTTPError as exc:  # it may have started work: not repeated elsewhere
                    raise UpstreamError("The upstream server broke off the connection.") from exc
                try:
                    if response.status_code != 200:
                        error_body = await _bounded_body(response)
                        error = error_from_upstream(response.status_code, error_body, response.headers)
                        if response.status_code not in FAIL_OVER_STATUSES:
                            raise error
                        if response.status_code != 429:
                            self._mark_down(upstream, f"answered {response.status_code}")
                        answered = error
                        continue
                    yield response
                    return
                finally:
                    await response.aclose()  # mid-body, this closes the connection: the upstream stops generating
            finally:
                upstream.in_flight -= 1
        if answered is None and busy:
            answered = UpstreamError(
                f"All {self._max_connections} connections to each upstream server are busy.", http_status=503
            )
        raise answered or UpstreamError("The upstream server could not be reached.", http_status=503)

    def _candidates(self) -> list[_Upstream]:
        """Every upstream, in the order to try them: those up, fewest requests in flight first (ties taken in
        turn), then those recently down, soonest back first."""
        now = time.monotonic()
        start = next(self._turn) % len(self._upstreams)
        turned = self._upstreams[start:] + self._upstreams[:start]
        up = sorted((u for u in turned if u.down_until <= now), key=lambda u: u.in_flight)
        return up + sorted((u for u in turned if u.down_until > now), key=lambda u: u.down_until)

    def _mark_down(self, upstream: _Upstream, why: str) -> None:
        upstream.down_until = time.monotonic() + self._down_for_s
        log.warning("upstream down", extra={"upstream": upstream.url, "why": why, "down_for_s": self._down_for_s})

    def _timed_out(self) -> UpstreamError:
        return UpstreamError(f"The upstream server did not answer within {self._timeout_s:g} s.", http_status=504)


async def _sse_data(response: httpx.Response) -> AsyncGenerator[str, None]:
    """The `data` of each server-sent event, as soon as its blank line arrives."""
    data: list[str] = []
    pending = ""
    async for text in response.aiter_text():
        text, held = pending + text, ""
        if text.endswith("\r"):  # perhaps the first half of a CRLF: wait for the next piece
            text, held = text[:-1], "\r"
        *lines, pending = _SSE_LINE_END.split(text)
        pending += held
        for line in lines:
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                yield "\n".join(data)
                data = []
    if pending.strip("\r").startswith("data:"):
        data.append(pending.strip("\r")[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _event_chunk(data: str) -> dict[str, Any]:
    """One stream event as a chunk; the upstream's own error event (OpenAI's `{"error": ...}`, vLLM's older
    `{"object": "error", ...}`) raised as our error."""
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise UpstreamError("The upstream server sent a chunk that is not JSON.") from exc
    if not isinstance(chunk, dict):
        raise UpstreamError("The upstream server sent a chunk that is not an object.")
    if ("error" in chunk and "choices" not in chunk) or chunk.get("object") == "error":
        raise error_from_upstream(_status_of_event(chunk), chunk, {})
    return chunk


async def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    data = bytearray()
    async for piece in response.aiter_bytes():
        data += piece
        if len(data) > limit:
            raise UpstreamError(f"The upstream server's reply is larger than {limit // 2**20} MiB.")
    return bytes(data)


def _status_of_event(event: dict[str, Any]) -> int:
    """The HTTP status a stream's error event stands for: its `code` where that is one (vLLM, SGLang), else by
    its OpenAI error type."""
    error = event.get("error", event)
    if not isinstance(error, dict):
        return 500
    code = error.get("code")
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    return {"invalid_request_error": 400, "rate_limit_error": 429}.get(str(error.get("type")), 500)


async def _bounded_body(response: httpx.Response) -> Any:
    """An error response's JSON body (or its text), read up to MAX_ERROR_BODY bytes."""
    data = b""
    with contextlib.suppress(httpx.HTTPError):
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) >= MAX_ERROR_BODY:
                break
    try:
        return json.loads(data)
    except ValueError:
        return data[:MAX_ERROR_BODY].decode("utf-8", errors="replace")


def error_from_upstream(status: int, body: Any, headers: Any) -> ChatwireError:
    """An upstream's error as ours. Its 4xx for the request (400, 413, 422...) stays a 400 with its message and
    `param`; its 429 stays a 429 with `Retry-After`; its 5xx, and a 401/403/404 (this server's credentials or
    model mapping are wrong, nothing the caller can fix), become 502 `upstream_error`. The upstream's own
    5xx message may describe its internals, so it is logged, not returned."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        message, param, code = error.get("message"), error.get("param"), error.get("code")
    else:  # TGI's `{"error": "...", "error_type": ...}`, or plain text
        message, param, code = error, None, None
    message = str(message) if message else f"The upstream server answered HTTP {status}."
    param = param if isinstance(param, str) else None
    code = code if isinstance(code, str) else None  # vLLM puts the HTTP status there
    if status == 429:
        retry_after = headers.get("retry-after") if headers else None
        metadata = [("retry-after", retry_after)] if retry_after else []
        return RateLimitError(message, code=code or "rate_limit_exceeded", metadata=metadata)
    if status == 408:
        return UpstreamError(f"The upstream server timed out (HTTP {status}).", http_status=504)
    # 424 is TGI's "the generation failed"; 401/403/404/407 mean this server's credentials, proxy or model
    # mapping are wrong.
    if 400 <= status < 500 and status not in (401, 403, 404, 407, 424):
        return InvalidRequestError(message, param=param, code=code)
    log.warning("upstream error", extra={"status": status, "upstream_message": quote(message, 500)})
    return UpstreamError(f"The upstream server failed the request (HTTP {status}).")
