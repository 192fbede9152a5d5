"""Speculative decoding's drafts: where the next few tokens of a reply are guessed from, and how many to verify.

A draft is a guess at the reply's next tokens; the engine evaluates them in one step with the token it already
has and keeps them while they equal what it samples from the verified logits, so the reply is the one it would
have written without the guess (the batch-invariant attention kernel makes a k-token step give the logits of k
single steps). Two sources:

- `PredictionAligner`: the request's `prediction` (OpenAI's Predicted Outputs). It follows the reply through
  the predicted text, and when the reply diverges, finds where the reply's last tokens rejoin it.
- `PromptLookup`: the prompt and the reply so far (prompt-lookup decoding): the tokens that followed the last
  earlier occurrence of the reply's last few tokens. Editing, extracting and quoting repeat the prompt.

`plan_draft_lengths` decides how many tokens each sequence verifies in a step from its acceptance so far and
what a step costs, so that drafting runs where it pays and stops under a full batch. Nothing here knows
llama.cpp: token ids in, draft lengths out.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

# Longest draft one sequence verifies in a step.
MAX_DRAFT = 32
# Longest tail of the reply matched against the prediction when realigning (a longer match is more certain).
MAX_REALIGN_TOKENS = 8
# Prompt lookup matches the reply's last 4, 3 or 2 tokens (longest first); a single token matches too much.
LOOKUP_NGRAMS = (4, 3, 2)
# How fast a sequence's acceptance estimate forgets: its counts are multiplied by this at every verification.
ACCEPTANCE_MEMORY = 0.9
# How much a new sequence's estimate trusts the engine's so far, in draft tokens' worth.
PRIOR_WEIGHT = 4
# A prediction is drafted from once the reply has followed it for this many tokens in a row: a realignment on
# one shared token (a space, a bracket) is a guess too weak to spend rows on.
MIN_FOLLOWED = 2


class PredictionAligner:
    """Where one choice's reply stands in the predicted tokens, and the prediction tokens it has used.

    Fed every token of the reply. While the reply follows the prediction, each token that equals the next
    predicted one is accepted; when the reply diverges, the prediction is searched for the reply's last tokens
    (longest match first, then the match nearest after where the reply left it, then the nearest before), the
    matched predicted tokens are accepted too, and the alignment resumes after them. A predicted token counts
    once, however often the reply repeats it; the rest are rejected. A pure function of the reply's tokens: how
    the engine batched its verification does not change the counts.
    """

    def __init__(self, predicted: Sequence[int]) -> None:
        self._predicted = list(predicted)
        # Where each token occurs in the prediction, for realigning without a scan.
        self._where: dict[int, list[int]] = {}
        for i, token in enumerate(self._predicted):
            self._where.setdefault(token, []).append(i)
        self._reply: list[int] = []
        # Index of the predicted token expected next; None while the reply is off the prediction.
        self._next: int | None = 0 if self._predicted else None
        # Where the reply last left the prediction (realignment prefers to resume after it).
        self._left_at = 0
        # Predicted tokens the reply has used: one that the reply repeats counts once.
        self._used = bytearray(len(self._predicted))
        # Tokens the reply has followed the prediction for, in a row (the start counts as followed).
        self._followed = MIN_FOLLOWED
        self.accepted = 0

    @property
    def rejected(self) -> int:
        """Predicted tokens that did not appear in the reply (OpenAI's `rejected_prediction_tokens`)."""
        return len(self._predicted) - self.accepted

    def feed(self, token: int) -> None:
        self._reply.append(token)
        expected = self._next
        if expected is not None and expected < len(self._predicted) and self._predicted[expected] == token:
            self.accepted += not self._used[expected]
            self._used[expected] = 1
            self._next = expected + 1
            self._followed += 1
            return
        if expected is not None:
            self._left_at = expected
        match = self._realign()
        self._next, self._followed = None, 0
        if match is not None:  # the reply's last `length` tokens are predicted ones: they appeared in it
            end, length = match
            for i in range(end - length + 1, end + 1):
                self.accepted += not self._used[i]
                self._used[i] = 1
            self._next, self._followed = end + 1, length

    def draft(self, limit: int) -> list[int]:
        """The predicted tokens expected next, at most `limit` (none until the reply follows it again)."""
        if self._next is None or self._followed < MIN_FOLLOWED:
            return []
        return self._predicted[self._next : self._next + limit]

    def _realign(self) -> tuple[int, int] | None:
        """Where the best match of the reply's tail ends in the prediction, and its length; None if none."""
        reply, predicted = self._reply, self._predicted
        best: tuple[int, int, int] | None = None  # (match length, ahead of where it left, -distance)
        match = None
        for end in self._where.get(reply[-1], ()):
            length = 1
            while (
                length < MAX_REALIGN_TOKENS
                and length < len(reply)
                and length <= end
                and predicted[end - length] == reply[-1 - length]
            ):
                length += 1
            ahead = end >= self._left_at
            key = (length, ahead, -abs(end - self._left_at))
            if best is None or key > best:
                best, match = key, (end, length)
        return match


class PromptLookup:
    """Drafts from the prompt and the reply so far: the tokens after the latest earlier occurrence of the
    reply's last few tokens. The prompt's n-grams are indexed once per request and shared by its choices."""

    def __init__(self, prompt_index: PromptIndex) -> None:
        self._prompt = prompt_index
        self._reply: list[int] = []
        # n-gram -> index in the reply just after its latest occurrence.
        self._reply_index: dict[tuple[int, ...], int] = {}

    def feed(self, token: int) -> None:
        self._reply.append(token)
        end = len(self._reply)
        for n in LOOKUP_NGRAMS:
            if end > n:  # index the n-gram before the new token: what followed it is known now
                self._reply_index[tuple(self._reply[end - 1 - n : end - 1])] = end - 1

    def draft(self, limit: int) -> list[int]:
        reply = self._reply
        for n in LOOKUP_NGRAMS:
            tail = tuple((self._prompt.tokens[-n:] + reply[-n:])[-n:])  # a short reply's tail begins in the prompt
            if len(tail) < n:
                continue
            start = self._reply_index.get(tail)
            if start is not None:
                return reply[start : start + limit]
            start = self._prompt.after.get(tail)
            if start is not None:
                continuation = self._prompt.tokens[start : start + limit]
                return continuation + reply[: limit - len(continuation)]
        return []


@dataclass
class PromptIndex:
    """A prompt's n-grams: each maps to the index just after its latest occurrence."""

    tokens: list[int]
    after: dict[tuple[int, ...], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokens = self.tokens
        for n in LOOKUP_NGRAMS:
            for end in range(n, len(tokens)):
                self.after[tuple(tokens[end - n : end])] = end


@dataclass
class Acceptance:
    """A running estimate of the chance that a sequence's next draft token is accepted: decayed counts of draft
    tokens accepted and of drafts cut short. A sequence's starts from the engine's estimate for its source
    (`like`), which learns from every sequence: a server whose lookups mostly fail starts new ones cautious."""

    accepted: float
    rejected: float
    memory: float = ACCEPTANCE_MEMORY
    # The engine-wide estimate of the same source, which every record also goes to.
    shared: Acceptance | None = None

    @classmethod
    def like(cls, shared: Acceptance) -> Acceptance:
        """A new sequence's estimate: `shared`'s rate, weighing as much as PRIOR_WEIGHT draft tokens."""
        rate = shared.rate
        return cls(PRIOR_WEIGHT * rate, PRIOR_WEIGHT * (1 - rate), shared=shared)

    @property
    def rate(self) -> float:
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def record(self, drafted: int, accepted: int) -> None:
        self.accepted = self.accepted * self.memory + accepted
        self.rejected = self.rejected * self.memory + (accepted < drafted)
        if self.shared is not None:
            self.shared.record(drafted, accepted)


@dataclass(frozen=True)
class StepCost:
    """A decode step's time as `fixed + per_row * rows` (reading the weights once, then each row's arithmetic)."""

    fixed: float
    per_row: float


class StepTimer:
    """Learns `StepCost` from the steps the engine times: a least-squares line through recent (rows, seconds),
    older steps weighing less. Both terms grow with the context (a row's attention reads every cell before it),
    so a measurement at start alone would make drafts look cheaper than they are in a long reply. Starts from
    `prior`, which weighs as much as a few steps."""

    def __init__(self, prior: StepCost, memory: float = 0.98) -> None:
        self._memory = memory
        self._sums = [0.0] * 5  # weight, rows, seconds, rows^2, rows * seconds
        for rows in (1, 9):
            self.record(rows, prior.fixed + prior.per_row * rows)
        self._prior = prior

    def record(self, rows: int, seconds: float) -> None:
        decay = self._memory
        self._sums = [
            total * decay + value
            for total, value in zip(self._sums, (1.0, rows, seconds, rows * rows, rows * seconds), strict=True)
        ]

    @property
    def cost(self) -> StepCost:
        weight, rows, seconds, squares, products = self._sums
        spread = weight * squares - rows * rows
        if spread <= 1e-9 * weight * weight:
            return self._prior
        per_row = (weight * products - rows * seconds) / spread
        per_row = max(per_row, 1e-6)
        return StepCost(fixed=max((seconds - per_row * rows) / weight, 0.0), per_row=per_row)


def plan_draft_lengths(
    rows: int, producing: int, candidates: Sequence[tuple[float, int]], cost: StepCost, max_rows: int
) -> list[int]:
    """How many draft tokens each candidate verifies in a step of `rows` other rows, `producing` of which yield a
    token. A candidate is (acceptance rate, draft tokens available). The i-th token of a draft adds rate**i
    tokens on average and one row's cost, so draft tokens are taken best first while they raise the expected
    tokens per second of the step: a lone stream drafts long, a full batch (whose rows already keep the CPU busy)
    drafts only near-certain tokens, and a sequence whose drafts keep failing stops drafting."""
    lengths = [0] * len(candidates)
    tokens, seconds = float(producing), cost.fixed + cost.per_row * rows
    heap = [(-rate, i, rate) for i, (rate, available) in enumerate(candidates) if available > 0]
    heapq.heapify(heap)
    while heap and rows < max_rows:
        gain, i, rate = heapq.heappop(heap)
        gain = -gain
        if gain * seconds <= tokens * cost.per_row:  # this token would lower the step's tokens per second
            break
        lengths[i] += 1
        rows += 1
        tokens += gain
        seconds += cost.per_row
        if lengths[i] < min(candidates[i][1], MAX_DRAFT):
            heapq.heappush(heap, (-gain * rate, i, rate))
    return lengths
