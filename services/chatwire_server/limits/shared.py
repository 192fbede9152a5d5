"""Budgets in a Redis-protocol store, shared by every replica (CHATWIRE_REDIS_URL).

Each check is one Lua script run atomically by the store, on the store's clock (`TIME`), so replicas with
skewed clocks or many requests at once see one budget. A bucket is a hash {level, at} under
`chatwire:budget:{<key id>}:<kind>` (the braces keep a key's buckets in one Redis Cluster slot); it expires when
it would have refilled, as a missing bucket is a full one, so idle keys cost no memory and no persistence is
needed (a restarted store refills everyone's budget once).

Why a token bucket (rather than GCRA or a sliding window): it is the same model as the in-process limiter and as
OpenAI's continuously replenished limits, it charges and refunds variable amounts (token reservations settled
after the reply) with two numbers per key, and its level is the `x-ratelimit-remaining-*` figure as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from chatwire_server.limits.budget import KINDS, Limits, Verdict


class StoreError(Exception):
    """The store did not answer in time, or failed."""


# KEYS: the requests and tokens buckets. ARGV: requests per minute, tokens per minute (0: unlimited), tokens to
# reserve (at most the tokens per minute). Refills both buckets to now, admits when they hold one request and the
# reservation, then charges both.
# Returns the refused kind (or ""), the wait, and each bucket's level and seconds until full, as strings.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local caps = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local reserve = tonumber(ARGV[3])
local levels = {}
for i = 1, 2 do
  if caps[i] > 0 then
    local saved = redis.call('HMGET', KEYS[i], 'level', 'at')
    local level, at = tonumber(saved[1]), tonumber(saved[2])
    if level == nil then
      levels[i] = caps[i]
    else
      levels[i] = math.min(caps[i], level + math.max(0, now - at) * caps[i] / 60)
    end
  end
end
local costs = {1, reserve}
local refused, wait = '', 0
for i, kind in ipairs({'requests', 'tokens'}) do
  if caps[i] > 0 and refused == '' and levels[i] < costs[i] then
    refused, wait = kind, (costs[i] - levels[i]) * 60 / caps[i]
  end
end
local reply = {refused, tostring(wait)}
for i = 1, 2 do
  if caps[i] > 0 then
    if refused == '' then levels[i] = levels[i] - costs[i] end
    local to_full = (caps[i] - levels[i]) * 60 / caps[i]
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'at', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil(to_full * 1000) + 1000)
    reply[#reply + 1] = tostring(levels[i])
    reply[#reply + 1] = tostring(to_full)
  end
end
return reply
"""

# KEYS: one bucket. ARGV: its capacity per minute, the amount to give back (negative: charge). Up to capacity.
_GIVE_BACK = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local cap, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
local saved = redis.call('HMGET', KEYS[1], 'level', 'at')
local level, at = tonumber(saved[1]), tonumber(saved[2])
if level == nil then level, at = cap, now end
level = math.min(cap, level + math.max(0, now - at) * cap / 60 + amount)
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) * 60000 / cap) + 1000)
return tostring(level)
"""


class RedisBuckets:
    """The buckets in Redis; every call fails with StoreError after `timeout_s`, never hangs."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self._timeout = timeout_s
        # The connection (and the scripts' handles) are made on first use, inside the server's event loop.
        self._client: redis.Redis | None = None
        self._take: AsyncScript | None = None
        self._give_back: AsyncScript | None = None

    def _scripts(self) -> tuple[AsyncScript, AsyncScript]:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                # No retries: a store that failed once is skipped for a while instead (`Limiter`).
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
            self._take = self._client.register_script(_TAKE)
            self._give_back = self._client.register_script(_GIVE_BACK)
        assert self._take is not None and self._give_back is not None
        return self._take, self._give_back

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            # The client's socket timeouts bound each read and connect; this bounds the whole call, a wait for a
            # pooled connection included (a NOSCRIPT after a store restart costs two more round trips). A call
            # cut off here may still run on the store later (a stopped store that resumes): its charge then stays
            # until the bucket refills.
            return await asyncio.wait_for(script(keys=keys, args=args), 2 * self._timeout)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc

    async def take(self, key: str, limits: Limits, tokens: int) -> Verdict:
        take, _ = self._scripts()
        args = [limits.requests_per_minute, limits.tokens_per_minute, tokens]
        reply = await self._run(take, [_bucket(key, kind) for kind in KINDS], args)
        refused, wait, *numbers = reply
        limited = [kind for kind in KINDS if limits.of(kind)]
        levels = {kind: (float(numbers[2 * i]), float(numbers[2 * i + 1])) for i, kind in enumerate(limited)}
        return Verdict(refused or None, float(wait), levels)

    async def give_back(self, key: str, limits: Limits, tokens: int, requests: int = 0) -> None:
        _, give_back = self._scripts()
        for kind, amount in (("tokens", tokens), ("requests", requests)):
            if limits.of(kind) and amount:
                await self._run(give_back, [_bucket(key, kind)], [limits.of(kind), amount])

    async def connect(self) -> None:
        """Open a connection ahead of the first request (a failure here is not counted: requests will retry)."""
        self._scripts()
        assert self._client is not None
        with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._client.ping(), 1.0)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _bucket(key: str, kind: str) -> str:
    return f"chatwire:budget:{{{key}}}:{kind}"
