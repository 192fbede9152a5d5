"""Per-key rate limits: requests and tokens per minute, with OpenAI's `x-ratelimit-*` headers.

Enforced in the service, not in Envoy: the service knows each request's key and how many tokens it really
used (Envoy's local rate limit counts requests only, and its global one needs a separate rate-limit service).
Each limit is a token bucket that refills continuously: a minute's allowance, spent as requests start (one
each) and as replies finish (prompt + completion tokens). The token bucket may go negative after a large
reply; the key then waits until it refills.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from chatwire_server.errors import RateLimitError

Headers = list[tuple[str, str]]


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.capacity / 60.0)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        """How long until the level reaches `amount`."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


class RateLimiter:
    """Requests and tokens per minute per key; a limit of 0 is off."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0) -> None:
        self._limits = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return any(self._limits.values())

    def admit(self, key: str) -> Headers:
        """Take one request from `key`'s allowance, or raise a 429 that says when to retry."""
        with self._lock:
            now = time.monotonic()
            buckets = {kind: self._bucket(key, kind, now) for kind, limit in self._limits.items() if limit}
            for kind, needed in (("requests", 1.0), ("tokens", 1.0)):
                bucket = buckets.get(kind)
                if bucket is not None and bucket.level < needed:
                    wait = bucket.seconds_until(needed)
                    raise RateLimitError(
                        f"Rate limit reached for {kind} per minute (limit {self._limits[kind]}). "
                        f"Please try again in {_duration(wait)}.",
                        code="rate_limit_exceeded",
                        error_type=kind,
                        metadata=[("retry-after", str(max(1, round(wait + 0.5)))), *self._headers(buckets)],
                    )
            if "requests" in buckets:
                buckets["requests"].level -= 1
            return self._headers(buckets)

    def spend(self, key: str, tokens: int) -> None:
        """Charge a finished request's prompt + completion tokens."""
        if not self._limits["tokens"]:
            return
        with self._lock:
            self._bucket(key, "tokens", time.monotonic()).level -= tokens

    def _bucket(self, key: str, kind: str, now: float) -> _Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            limit = float(self._limits[kind])
            bucket = self._buckets[(key, kind)] = _Bucket(limit, limit, now)
        bucket.refill(now)
        return bucket

    def _headers(self, buckets: dict[str, _Bucket]) -> Headers:
        headers: Headers = []
        for kind, bucket in buckets.items():
            headers += [
                (f"x-ratelimit-limit-{kind}", str(self._limits[kind])),
                (f"x-ratelimit-remaining-{kind}", str(max(0, int(bucket.level)))),
                (f"x-ratelimit-reset-{kind}", _duration(bucket.seconds_until(bucket.capacity))),
            ]
        return headers


def _duration(seconds: float) -> str:
    """OpenAI's style: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
