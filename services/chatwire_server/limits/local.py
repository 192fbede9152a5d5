"""Budgets held in this process: one replica's own (the default), or a replica's fallback while the shared store
is unreachable."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from chatwire_server.limits.budget import KINDS, Limits, Verdict


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


class LocalBuckets:
    """Token buckets per (key, kind) in a dict; the same arithmetic as the shared store's script."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    async def take(self, key: str, limits: Limits, tokens: int) -> Verdict:
        with self._lock:
            now = time.monotonic()
            buckets = {kind: self._bucket(key, kind, limits, now) for kind in KINDS if limits.of(kind)}
            costs = {"requests": 1.0, "tokens": float(tokens)}
            refused = next((kind for kind, b in buckets.items() if b.level < costs[kind]), None)
            wait = buckets[refused].seconds_until(costs[refused]) if refused else 0.0
            if refused is None:
                for kind, bucket in buckets.items():
                    bucket.level -= costs[kind]
            levels = {kind: (b.level, b.seconds_until(b.capacity)) for kind, b in buckets.items()}
            return Verdict(refused, wait, levels)

    async def give_back(self, key: str, limits: Limits, tokens: int, requests: int = 0) -> None:
        with self._lock:
            for kind, amount in (("tokens", tokens), ("requests", requests)):
                if limits.of(kind) and amount:
                    bucket = self._bucket(key, kind, limits, time.monotonic())
                    bucket.level = min(bucket.capacity, bucket.level + amount)

    def _bucket(self, key: str, kind: str, limits: Limits, now: float) -> _Bucket:
        bucket = self._buckets.get((key, kind))
        if bucket is None:
            capacity = float(limits.of(kind))
            bucket = self._buckets[(key, kind)] = _Bucket(capacity, capacity, now)
        bucket.refill(now)
        return bucket
