"""Per-key rate limits, requests and tokens per minute: the one seam into the request path is `Limiter.admit`,
before any work, and `Admission.settle` when the request ends (the RPC boundary calls both).

One replica keeps its budgets in process (`local`). With CHATWIRE_REDIS_URL set they live in the shared store
(`shared`), so every replica answers from the same state. If the store fails (no answer within
CHATWIRE_RATE_LIMIT_STORE_TIMEOUT_MS per read, twice that per call), CHATWIRE_RATE_LIMIT_STORE_FAILURE decides:
`open` (the default) admits by this replica's own buckets meanwhile, with a log line and a metric, and tries the
store again after STORE_RETRY_S; `closed` answers 503 until the store is back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from functools import partial

from chatwire_server import metrics
from chatwire_server.errors import ServiceUnavailableError
from chatwire_server.limits.budget import (
    Admission,
    BackgroundTasks,
    Buckets,
    Limits,
    Reservation,
    Verdict,
    headers,
    refusal,
)
from chatwire_server.limits.local import LocalBuckets
from chatwire_server.limits.shared import RedisBuckets, StoreError

__all__ = ["Admission", "Limiter", "Limits", "Reservation"]

log = logging.getLogger(__name__)
# After a failed call, the store is left alone this long (requests meanwhile take the policy at once, rather than
# each waiting out the timeout), then tried again.
STORE_RETRY_S = 1.0
STORE_FAILURE_POLICIES = ("open", "closed")


class Limiter:
    """Admits requests against their key's budgets and settles their token reservations."""

    def __init__(self, limits: Limits, store: RedisBuckets | None = None, *, fail_closed: bool = False) -> None:
        self.limits = limits
        self._store = store
        self._local = LocalBuckets()
        self._fail_closed = fail_closed
        self._store_down_until: float | None = None  # monotonic time; None while the store answers
        self._settlements = BackgroundTasks()
        metrics.RATE_LIMIT_STORE_UP.set(1 if store is not None else 0)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Limiter:
        limits = Limits.from_environment(environ)
        url = environ.get("CHATWIRE_REDIS_URL", "")
        policy = environ.get("CHATWIRE_RATE_LIMIT_STORE_FAILURE", "open")
        if policy not in STORE_FAILURE_POLICIES:
            raise ValueError(f"CHATWIRE_RATE_LIMIT_STORE_FAILURE must be `open` or `closed`, not {policy!r}")
        timeout_s = int(environ.get("CHATWIRE_RATE_LIMIT_STORE_TIMEOUT_MS", "50")) / 1000
        store = RedisBuckets(url, timeout_s) if url and limits.enabled else None
        return cls(limits, store, fail_closed=policy == "closed")

    @property
    def enabled(self) -> bool:
        return self.limits.enabled

    @property
    def where(self) -> str:
        """Where the budgets live, for the start-up log."""
        if not self.enabled:
            return "off"
        return f"shared ({_without_password(self._store.url)})" if self._store else "this replica"

    async def admit(self, key: str, reservation: Reservation) -> Admission:
        """Take one request and reserve `reservation` from `key`'s budgets, or raise the 429 (or, with the store
        down and failing closed, the 503)."""
        if not self.enabled:
            return Admission(key)
        buckets, verdict = await self._take(key, reservation.tokens)
        if verdict.refused:
            raise refusal(self.limits, verdict)
        settle = partial(self._give_back, buckets, key)
        return Admission(key, headers(self.limits, verdict), reservation, _settle=settle)

    def settle_later(self, admission: Admission) -> None:
        """Settle `admission` off the reply's path."""
        if self.enabled:
            self._settlements.start(admission)

    async def _take(self, key: str, tokens: int) -> tuple[Buckets, Verdict]:
        """The store's verdict if it answers, else the policy's: this replica's buckets, or a 503."""
        store = self._store
        if store is not None and (self._store_down_until is None or time.monotonic() >= self._store_down_until):
            try:
                verdict = await store.take(key, self.limits, tokens)
            except StoreError as exc:
                self._store_failed(exc)
            else:
                self._store_answered()
                return store, verdict
        if store is not None and self._fail_closed:
            raise ServiceUnavailableError(
                "The rate limit store is unavailable; please retry shortly.", code="rate_limit_store_unavailable"
            )
        return self._local, await self._local.take(key, self.limits, tokens)

    def _store_answered(self) -> None:
        if self._store_down_until is not None:
            log.warning("rate-limit store back: budgets are shared again", extra={"store": self.where})
        self._store_down_until = None
        metrics.RATE_LIMIT_STORE_UP.set(1)

    def _store_failed(self, error: StoreError) -> None:
        metrics.RATE_LIMIT_STORE_FAILURES.inc()
        metrics.RATE_LIMIT_STORE_UP.set(0)
        if self._store_down_until is None:
            policy = "503 until it is back" if self._fail_closed else "each replica's own budgets until it is back"
            log.error("rate-limit store failed: %s", policy, extra={"store": self.where, "error": str(error)})
        self._store_down_until = time.monotonic() + STORE_RETRY_S

    async def _give_back(self, buckets: Buckets, key: str, tokens: int, requests: int) -> None:
        try:
            await buckets.give_back(key, self.limits, tokens, requests)
        except StoreError as exc:  # the reservation (at most a minute's budget) stays charged until it refills
            self._store_failed(exc)

    async def open(self) -> None:
        """Connect to the store ahead of the first request, if there is one."""
        if self._store is not None:
            await self._store.connect()

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"
