"""API keys: `Authorization: Bearer <key>` on every ChatService call, HTTP (through Envoy) and gRPC alike.

Keys come from CHATWIRE_API_KEYS (comma-separated, for development and tests) and/or the file named by
CHATWIRE_API_KEYS_FILE, which holds only SHA-256 digests: `sha256:<hex>` per line, optionally followed by
`models=<id>,<id>` to limit the key to those models (make the line with `python -m chatwire_server.api.auth`).
Only digests are kept in memory; presented keys are hashed and compared in constant time against every
digest. Keys never reach the logs.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from chatwire_server.errors import AuthenticationError, PermissionDeniedError


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class Authenticator:
    """Checks bearer keys against configured digests; with none configured, everyone is let in."""

    def __init__(self, digests: list[bytes], models: dict[bytes, frozenset[str]] | None = None) -> None:
        self._digests = digests
        # Keys limited to some models: digest -> the model ids it may use (absent: every model).
        self._models = {d.hex()[:12]: allowed for d, allowed in (models or {}).items()}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Authenticator:
        digests = [digest(k.strip()) for k in environ.get("CHATWIRE_API_KEYS", "").split(",") if k.strip()]
        models: dict[bytes, frozenset[str]] = {}
        if path := environ.get("CHATWIRE_API_KEYS_FILE"):
            for key_digest, allowed in read_digest_file(Path(path)):
                digests.append(key_digest)
                if allowed is not None:
                    models[key_digest] = allowed
        return cls(digests, models)

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

    def may_use(self, key_id: str, model: str) -> bool:
        """Whether the key may use `model` (keys without a `models=` list may use every model)."""
        allowed = self._models.get(key_id)
        return allowed is None or model in allowed

    def check_model(self, key_id: str, model: str) -> None:
        if not self.may_use(key_id, model):
            raise PermissionDeniedError(
                f"This API key may not use the model `{model}`.", param="model", code="model_not_allowed"
            )


def read_digest_file(path: Path) -> list[tuple[bytes, frozenset[str] | None]]:
    """`sha256:<hex>` lines, optionally followed by `models=<id>,<id>` to limit the key to those models;
    blank lines and `#` comments are skipped."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        line, _, option = line.partition(" ")
        option = option.strip()
        if option and not option.startswith("models="):
            raise ValueError(f"{path}:{number}: unknown option {option!r} (expected models=<id>,<id>)")
        models = frozenset(m for m in option.removeprefix("models=").split(",") if m) if option else None
        scheme, _, value = line.partition(":")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
        if scheme != "sha256" or len(raw) != 32:
            raise ValueError(f"{path}:{number}: expected 'sha256:<64 hex digits>'")
        entries.append((raw, models))
    return entries


def main() -> None:
    """Print the keys-file line for a key read from stdin (or typed at a prompt)."""
    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("API key: ")
    print(f"sha256:{digest(key).hex()}")


if __name__ == "__main__":
    main()
