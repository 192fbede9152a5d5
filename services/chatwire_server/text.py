"""Streaming text helpers: stop sequences that may span tokens."""

from __future__ import annotations


class StopMatcher:
    """Cuts streamed text before the first stop sequence, even when it arrives split across pieces.

    Text that could still turn out to be the start of a stop sequence is held back until it cannot.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return what is safe to emit now, and whether a stop sequence was reached."""
        if not self._stops:
            return text, False
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            emit, self._pending = self._pending[:cut], ""
            return emit, True
        hold = self._longest_partial_stop()
        emit = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(emit) :]
        return emit, False

    def flush(self) -> str:
        """Release held-back text once generation has ended without a stop sequence."""
        rest, self._pending = self._pending, ""
        return rest

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:size]):
                    best = size
                    break
        return best
