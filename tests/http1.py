"""HTTP/1.1 on a raw socket, for framing tests (tests/test_http_framing.py and the fuzzer's `reuse` family).

Requests go out as exact bytes, pipelined on one connection; h11 parses the replies in order. h11 knows that a
reply to HEAD, and a 1xx, 204 or 304, ends with its header section, so a body where none may be, a length that
does not match, or any other stray byte shows up as the next reply failing to parse: exactly what a client that
reuses connections (or a proxy in front of the edge) would trip over.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import h11


class FramingError(Exception):
    """The bytes on the connection are not a well-framed sequence of replies."""


@dataclass
class Reply:
    """One reply as a client parsed it."""

    status: int
    # Names lowercased; a repeated name's values joined by ", ".
    headers: dict[str, str]
    body: bytes
    # The reply said the connection closes after it (or HTTP/1.0 without keep-alive).
    closes: bool


def request(method: str, target: str, headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """An HTTP/1.1 request that keeps the connection open, with a Content-Length when it has a body."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers)]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def exchange(
    port: int, requests: Sequence[tuple[str, bytes]], *, pipelined: bool = False, timeout: float = 30.0
) -> list[Reply]:
    """Send each (method, request bytes) on one connection, as clients reuse one: the next once the last reply
    is in, or `pipelined`, all at once (Envoy answers two pipelined requests; after two of its own replies in a
    row it closes the connection at the third, which RFC 9112 allows). Fewer replies than requests come back
    only when one says the connection closes; bytes that do not parse as the next reply, a reply cut short, or
    bytes after the last one raise FramingError. `method` is what the client asked, which decides whether a
    reply may have a body."""
    parser = h11.Connection(our_role=h11.CLIENT)
    replies: list[Reply] = []
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for i, (method, data) in enumerate(requests):
            if pipelined and i == 0:
                _send(sock, b"".join(data for _, data in requests))
            elif not pipelined:
                _send(sock, data)
            if replies:
                parser.start_next_cycle()
            # h11 tracks our side too: it learns the method (HEAD or not) from a request it wrote itself.
            parser.send(h11.Request(method="HEAD" if method == "HEAD" else "GET", target="/", headers=[("Host", "x")]))
            parser.send(h11.EndOfMessage())
            replies.append(_read_reply(parser, sock, deadline))
            if replies[-1].closes:
                break
        if stray := stray_bytes(parser, sock):
            raise FramingError(f"{len(stray)} bytes after the last reply: {stray[:80]!r}")
    return replies


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the edge may answer, and close, before reading everything a refused request sent


def _read_reply(parser: h11.Connection, sock: socket.socket, deadline: float) -> Reply:
    status, headers, body = 0, {}, bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as error:
            raise FramingError(f"reply {status or ''} unparsable: {error}") from None
        if event is h11.NEED_DATA:
            if time.monotonic() > deadline:
                raise FramingError("no complete reply in time")
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise FramingError("no complete reply in time") from None
            except ConnectionResetError:
                data = b""
            parser.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            continue
        elif isinstance(event, h11.Response):
            status = event.status_code
            for name, value in event.headers:
                key = name.decode().lower()
                headers[key] = (
                    f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
                )
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, bytes(body), closes=parser.their_state is h11.MUST_CLOSE)
        elif isinstance(event, h11.ConnectionClosed):
            raise FramingError(f"connection closed inside reply {status or '(no status line)'}")


def stray_bytes(parser: h11.Connection, sock: socket.socket) -> bytes:
    """What arrives after the last reply, until the connection closes or nothing more comes for 50 ms (stray
    bytes leave Envoy with the reply they follow). Any is a framing error: a body on a reply that may have none,
    or a length that lies."""
    leftover = bytearray(parser.trailing_data[0])
    sock.settimeout(0.05)
    try:
        while data := sock.recv(65536):
            leftover += data
    except (TimeoutError, BlockingIOError, ConnectionResetError):
        pass
    return bytes(leftover)
