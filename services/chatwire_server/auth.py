"""API keys: `Authorization: Bearer <key>` on every ChatService call, HTTP (through Envoy) and gRPC alike.

Keys come from CHATWIRE_API_KEYS (comma-separated, for development and tests) and/or the file named by
CHATWIRE_API_KEYS_FILE, which holds only SHA-256 digests (`sha256:<hex>` per line; make one with
`python -m chatwire_server.auth`). Only digests are kept in memory; presented keys are hashed and compared in
constant time against every digest. Keys never reach the logs.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from chatwire_server.errors import AuthenticationError


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class Authenticator:
    """Checks bearer keys against configured digests; with none configured, everyone is let in."""

    def __init__(self, digests: list[bytes]) -> None:
        self._digests = digests

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Authenticator:
        digests = [digest(k.strip()) for k in environ.get("CHATWIRE_API_KEYS", "").split(",") if k.strip()]
        if path := environ.get("CHATWIRE_API_KEYS_FILE"):
            digests += read_digest_file(Path(path))
        return cls(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def key_id(self, metadata: Mapping[str, str]) -> str:
        """A stable, non-secret id of the caller's key ("open" when auth is off); raises if the key is bad."""
        if not self._digests:
            return "open"
        header = metadata.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        presented = digest(key.strip())
        # Compare with every digest, without stopping early, so timing says nothing about which matched.
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(presented, known)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.")
        return presented.hex()[:12]


def read_digest_file(path: Path) -> list[bytes]:
    """`sha256:<hex>` lines; blank lines and `#` comments are skipped."""
    digests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        scheme, _, value = line.partition(":")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if scheme != "sha256" or len(raw) != 32:
            raise ValueError(f"{path}:{number}: expected 'sha256:<64 hex digits>'")
        digests.append(raw)
    return digests


def main() -> None:
    """Print the keys-file line for a key read from stdin (or typed at a prompt)."""
    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("API key: ")
    print(f"sha256:{digest(key).hex()}")


if __name__ == "__main__":
    main()
