"""Streaming text helpers: stop sequences that may span tokens."""

from __future__ import annotations


class StopMatcher:
    """Cuts streamed text before the first stop sequence, even when it arrives split across pieces.

    Text that could still turn out to be the start of a stop sequence is held back until it cannot. With
    `repeated_block` (open, close), every block between those delimiters becomes a stop sequence once written:
    the text ends before a word-for-word repeat of it.
    """

    def __init__(self, stops: tuple[str, ...], repeated_block: tuple[str, str] | None = None) -> None:
        # Each stop with the earliest offset in the whole text where it may start (a block is no repeat of itself).
        self._stops = [(s, 0) for s in stops if s]
        self._block = repeated_block
        self._text = ""  # everything fed, kept only to find blocks
        self._scanned = 0
        self._pending = ""
        self._emitted = 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return what is safe to emit now, and whether a stop sequence was reached."""
        if not self._stops and not self._block:
            return text, False
        self._pending += text
        found = (self._pending.find(stop, max(0, start - self._emitted)) for stop, start in self._stops)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            emit, self._pending = self._pending[:cut], ""
            return emit, True
        if self._block:
            self._text += text
            self._note_blocks(*self._block)
        hold = self._longest_partial_stop()
        emit = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(emit) :]
        self._emitted += len(emit)
        return emit, False

    def flush(self) -> str:
        """Release held-back text once generation has ended without a stop sequence."""
        rest, self._pending = self._pending, ""
        return rest

    def _note_blocks(self, open_: str, close: str) -> None:
        while (start := self._text.find(open_, self._scanned)) >= 0:
            end = self._text.find(close, start + len(open_))
            if end < 0:
                return
            self._scanned = end + len(close)
            self._stops.append((self._text[start : self._scanned], self._scanned))

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop sequence."""
        best = 0
        end = self._emitted + len(self._pending)  # offset of the pending text's end in the whole text
        for stop, start in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending), end - start), best, -1):
                if self._pending.endswith(stop[:size]):
                    best = size
                    break
        return best
