"""Cache affinity for chatwire's Python gRPC callers: a channel whose chat calls carry their affinity key.

Envoy's gRPC listener balances ChatService calls over the replicas, and cannot read protobuf bodies: a caller that
wants a conversation's calls to reach the replica whose prefix cache holds it sends the conversation's key as
`x-chatwire-affinity` metadata. The interceptor here does so for CreateChatCompletion and StreamChatCompletion, with
the key the HTTP edge takes from JSON bodies. Needs the stubs `make proto` generates into build/gen/python:

    PYTHONPATH=clients/python:build/gen/python .venv/bin/python
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from chatwire.v1.chat_completion_pb2 import CreateChatCompletionRequest

__all__ = [
    "AFFINITY_HEADER",
    "REPLICA_HEADER",
    "AffinityInterceptor",
    "affinity_key",
    "channel",
    "intercepted",
    "replica",
]

AFFINITY_HEADER = "x-chatwire-affinity"
"""The metadata Envoy hashes onto a replica."""
REPLICA_HEADER = "x-chatwire-replica"
"""The metadata in every reply that names the replica that served it."""

# Longer keys are hashed on their first 256 bytes, as at the HTTP edge: the header stays small.
_MAX_KEY = 256
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def affinity_key(request: CreateChatCompletionRequest) -> str | None:
    """The key a chat request is balanced by: the first of `prompt_cache_key`, `safety_identifier` and `user` (most
    specific first) that is set and printable ASCII, cut to its first 256 bytes; None when none is.

    It is the HTTP edge's rule for JSON bodies, except that the edge also keys by UTF-8 values: gRPC metadata is
    printable ASCII only (grpcio fails the call with "Invalid metadata" otherwise), so here such a value is skipped,
    as the edge skips one with control characters.
    """
    for key in (request.prompt_cache_key, request.safety_identifier, request.user):
        if key and _PRINTABLE_ASCII.fullmatch(key):
            return key[:_MAX_KEY]
    return None


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class AffinityInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends a chat request's `affinity_key` as `x-chatwire-affinity` metadata, unless the call already carries that
    metadata (the caller's own key wins). Other calls pass through untouched."""

    def intercept_unary_unary(
        self, continuation: Callable[[grpc.ClientCallDetails, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        """CreateChatCompletion (and any other unary call)."""
        return continuation(_keyed(client_call_details, request), request)

    def intercept_unary_stream(
        self, continuation: Callable[[grpc.ClientCallDetails, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        """StreamChatCompletion (and any other server-streaming call)."""
        return continuation(_keyed(client_call_details, request), request)


def _keyed(details: Any, request: Any) -> Any:
    key = affinity_key(request) if isinstance(request, CreateChatCompletionRequest) else None
    metadata = list(getattr(details, "metadata", None) or ())
    if key is None or any(name.lower() == AFFINITY_HEADER for name, _ in metadata):
        return details
    # Other interceptors may hand over details without some attributes; grpc reads those as unset.
    return _CallDetails(
        method=details.method,
        timeout=getattr(details, "timeout", None),
        metadata=[*metadata, (AFFINITY_HEADER, key)],
        credentials=getattr(details, "credentials", None),
        wait_for_ready=getattr(details, "wait_for_ready", None),
        compression=getattr(details, "compression", None),
    )


def intercepted(channel: grpc.Channel) -> grpc.Channel:
    """`channel` with the AffinityInterceptor: stubs made on it key their chat calls. Closing it closes `channel`."""
    return grpc.intercept_channel(channel, AffinityInterceptor())


def channel(
    address: str,
    options: Sequence[tuple[str, Any]] | None = None,
    *,
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.Channel:
    """A channel to `address` (host:port; Envoy's gRPC listener is 127.0.0.1:50050) whose chat calls carry their
    affinity key; `options` are grpc channel arguments.

    Plaintext, or with `ca_file` TLS: the server's certificate must chain to a CA in that PEM file (instead of
    grpc's built-in roots) and name the host in `address`. With `cert_file` and `key_file` (PEM, both or neither)
    the client presents that certificate, for servers that require mutual TLS. Any other channel (your own
    credentials) can be passed to `intercepted`."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    if ca_file is None:
        if cert_file is not None:
            # It would otherwise go unused over plaintext.
            raise ValueError("a client certificate needs ca_file too")
        return intercepted(grpc.insecure_channel(address, options=options))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file is not None else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
    )
    return intercepted(grpc.secure_channel(address, credentials, options=options))


def replica(call: grpc.Call) -> str | None:
    """The replica that served a call, from its `x-chatwire-replica` metadata: the reply's initial metadata, or the
    trailing metadata of a call refused before any reply (a `grpc.RpcError` is a call too); None when neither names
    one. On a call still running it waits for the reply's headers and, if they name none, for the call's end."""
    for metadata in (call.initial_metadata, call.trailing_metadata):  # the trailers only if the headers lack it
        for name, value in metadata() or ():
            if name == REPLICA_HEADER:
                return str(value)
    return None
