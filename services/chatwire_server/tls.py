"""Transport security: mutual TLS between the edge, internal callers and the replicas' gRPC servers.

With CHATWIRE_MTLS_CA_FILE, CHATWIRE_MTLS_CERT_FILE and CHATWIRE_MTLS_KEY_FILE set (PEM; all three or none), a
gRPC server serves TLS with that certificate and requires client certificates signed by that CA. The files are
read again whenever they change (grpcio asks for the configuration at each new connection), so rotating them needs
no restart; connections already open keep the certificate they started with. Without them the server speaks
plaintext and says so at start-up (fine on a laptop, as open keys are).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

MUTUAL_SETTINGS = ("CHATWIRE_MTLS_CA_FILE", "CHATWIRE_MTLS_CERT_FILE", "CHATWIRE_MTLS_KEY_FILE")


@dataclass(frozen=True)
class Mutual:
    """The CA that signs every party, and this party's own certificate (chain) and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Mutual | None:
        values = [environ.get(name, "") for name in MUTUAL_SETTINGS]
        if not any(values):
            return None
        if not all(values):
            missing = [name for name, value in zip(MUTUAL_SETTINGS, values, strict=True) if not value]
            raise ValueError(f"mutual TLS needs all of {', '.join(MUTUAL_SETTINGS)}; missing {', '.join(missing)}")
        ca, cert, key = (Path(value) for value in values)
        return cls(ca, cert, key)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca_file.read_bytes(), self.cert_file.read_bytes(), self.key_file.read_bytes()

    def _stamp(self) -> tuple[float, ...]:
        return tuple(path.stat().st_mtime_ns for path in (self.ca_file, self.cert_file, self.key_file))

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that require a client certificate of the CA and follow the files as they change."""
        lock = threading.Lock()
        seen = [self._stamp()]

        def configuration() -> Any:
            ca, cert, key = self._read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        def fetch() -> Any:
            # Called by grpcio at each new connection: None keeps the configuration it has.
            with lock:
                try:
                    stamp = self._stamp()
                    if stamp == seen[0]:
                        return None
                    fresh = configuration()
                except (OSError, ValueError):  # mid-replacement or unreadable: keep serving the last good one
                    return None
                seen[0] = stamp
                return fresh

        return grpc.dynamic_ssl_server_credentials(configuration(), fetch, require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for calling a server of this CA with this party's certificate."""
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """Who is calling, by the client certificate it presented: its SPIFFE id (a `spiffe://` URI SAN), else its
    subject's common name; None without mutual TLS."""
    auth = context.auth_context() or {}
    for value in auth.get("x509_subject_alternative_name", ()):
        text = value.decode(errors="replace")
        if text.startswith("spiffe://"):
            return text
    names = auth.get("x509_common_name", ())
    return names[0].decode(errors="replace") if names else None
