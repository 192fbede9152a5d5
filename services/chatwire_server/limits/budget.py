"""Per-key budgets, requests and tokens per minute: what a request is charged, and how a verdict becomes OpenAI's
`x-ratelimit-*` headers or a 429.

Each limit is a token bucket holding a minute's allowance that refills continuously, as OpenAI's limits do
("replenished continuously", not reset each minute). A request takes one request and **reserves** the tokens it
may cost when it is admitted, so that a key opening many streams at once cannot overrun its token budget; when
it ends the reservation is settled to what it really used (see `Admission`). Where the buckets live is the
store's business (`local`: this process; `shared`: Redis, for replicas that must share them).
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from chatwire_server.errors import RateLimitError

Headers = list[tuple[str, str]]
KINDS = ("requests", "tokens")
# OpenAI's rule of thumb, for a prompt not yet tokenized: about 4 bytes of text per token.
BYTES_PER_TOKEN = 4
# What a request without `max_tokens` (or `max_completion_tokens`) reserves per choice for its reply.
DEFAULT_REPLY_RESERVE = 512


@dataclass(frozen=True)
class Limits:
    """A key's allowance per minute; 0 is no limit."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    # Reserved per choice for a reply whose request sets no maximum.
    reply_reserve: int = DEFAULT_REPLY_RESERVE

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        return cls(
            requests_per_minute=int(environ.get("CHATWIRE_RATE_LIMIT_RPM", "0")),
            tokens_per_minute=int(environ.get("CHATWIRE_RATE_LIMIT_TPM", "0")),
            reply_reserve=int(environ.get("CHATWIRE_RATE_LIMIT_REPLY_RESERVE", str(DEFAULT_REPLY_RESERVE))),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def of(self, kind: str) -> int:
        return self.requests_per_minute if kind == "requests" else self.tokens_per_minute

    def reservation(self, request_bytes: int, max_reply_tokens: int | None, choices: int) -> Reservation:
        """What a request may cost: its prompt estimated from its size, plus its replies' maximum (or the default
        reserve) for each choice."""
        prompt = math.ceil(request_bytes / BYTES_PER_TOKEN)
        reply = max_reply_tokens if max_reply_tokens is not None else self.reply_reserve
        tokens = prompt + reply * max(1, choices)
        if self.tokens_per_minute:  # never more than a minute's budget: what it uses beyond is charged at the end
            tokens = min(tokens, self.tokens_per_minute)
        return Reservation(min(prompt, tokens), tokens)


@dataclass(frozen=True)
class Reservation:
    """The tokens a request reserves at admission, and the part of them that is its prompt's estimate."""

    prompt: int
    tokens: int


@dataclass(frozen=True)
class Verdict:
    """A store's answer: the refused kind (None: admitted and charged), how long until that bucket could admit
    it, and each limited bucket's level and seconds until full, after the charge."""

    refused: str | None
    wait_s: float
    levels: dict[str, tuple[float, float]]


class Buckets(Protocol):
    """Where the buckets live. Both calls are atomic per key."""

    async def take(self, key: str, limits: Limits, tokens: int) -> Verdict:
        """Take one request and reserve `tokens` if the key's buckets hold them. `tokens` is at most a minute's
        budget (`Limits.reservation` caps it), so a large request waits for a full bucket but is never refused
        forever."""
        ...

    async def give_back(self, key: str, limits: Limits, tokens: int, requests: int = 0) -> None:
        """Return `tokens` (negative: charge more) and `requests` to the key's buckets, up to their capacity."""
        ...


def headers(limits: Limits, verdict: Verdict) -> Headers:
    """OpenAI's `x-ratelimit-*` headers for each limited kind."""
    out: Headers = []
    for kind, (level, to_full) in verdict.levels.items():
        out += [
            (f"x-ratelimit-limit-{kind}", str(limits.of(kind))),
            (f"x-ratelimit-remaining-{kind}", str(max(0, int(level)))),
            (f"x-ratelimit-reset-{kind}", duration(to_full)),
        ]
    return out


def refusal(limits: Limits, verdict: Verdict) -> RateLimitError:
    """The 429 for a refused verdict, saying when to retry."""
    kind = verdict.refused
    assert kind is not None
    return RateLimitError(
        f"Rate limit reached for {kind} per minute (limit {limits.of(kind)}). "
        f"Please try again in {duration(verdict.wait_s)}.",
        code="rate_limit_exceeded",
        error_type=kind,
        metadata=[("retry-after", str(max(1, round(verdict.wait_s + 0.5)))), *headers(limits, verdict)],
    )


@dataclass
class Admission:
    """An admitted request's charge, settled once when it ends.

    What it used is, in order: the usage its reply reported (`charge`, prompt + completion tokens); else, when it
    failed or was cancelled after producing output, the prompt's estimate plus the tokens it produced
    (`produced`); else nothing (it failed before any work reached the caller, and costs nothing, as at OpenAI).
    The reservation is at most a minute's budget; what a reply uses beyond it is charged here.
    """

    key: str
    headers: Headers = field(default_factory=list)
    reservation: Reservation = Reservation(0, 0)
    used: int | None = None
    partial: int = 0
    # Refused before any work so that another replica may serve it (the edge retries it there): its request is
    # given back too, or the retry would count it twice.
    passed_on: bool = False
    _settle: Settler | None = None

    def charge(self, tokens: int) -> None:
        """The usage the reply reported, added up over its parts."""
        self.used = (self.used or 0) + tokens

    def produced(self, tokens: int = 1) -> None:
        """Tokens sent to the caller so far (what a cancelled request is charged for its reply)."""
        self.partial += tokens

    def spent(self) -> int:
        if self.used is not None:
            return self.used
        return self.reservation.prompt + self.partial if self.partial else 0

    async def settle(self) -> None:
        """Give back what was reserved and not used (or charge the excess); once."""
        settle, self._settle = self._settle, None
        if settle is not None:
            await settle(self.reservation.tokens - self.spent(), 1 if self.passed_on else 0)


class Settler(Protocol):
    async def __call__(self, unused_tokens: int, unused_requests: int) -> None: ...


class BackgroundTasks:
    """Settlements run after the reply, off its path; kept referenced until they finish."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, admission: Admission) -> None:
        task = asyncio.ensure_future(admission.settle())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def duration(seconds: float) -> str:
    """OpenAI's style: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
