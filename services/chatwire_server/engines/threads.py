"""How many threads llama.cpp decodes with, chosen by measuring.

llama.cpp's threads meet at a barrier after every operation and spin while they wait, so a neighbour that takes
one core stalls all of them: on 2 cores, one stream went from 64 to 15 tokens/s beside a busy process, where one
thread made 42. The tuner starts with every usable CPU and, now and then, decodes a few steps with one thread
fewer (or more, back towards all of them); it keeps the count whose steps were faster. Steps are compared only
with steps of the same batch (the same number of tokens, no prompt in it). Thread counts give bit-identical
logits here (tested), so replies do not depend on the count.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

log = logging.getLogger(__name__)


class ThreadTuner:
    """Decides the thread count for each decode step from the times of the steps before."""

    def __init__(
        self,
        most: int,
        *,
        probe_steps: int = 8,
        first_probe_after: int = 64,
        longest_wait: int = 1024,
        longest_wait_below_most_s: float = 3.0,
        margin: float = 0.15,
    ) -> None:
        self.most = most
        self.threads = most
        self._probe_steps = probe_steps
        self._shortest_wait = first_probe_after
        self._longest_wait = longest_wait
        self._margin = margin
        self._wait = first_probe_after  # steps between probes: doubles while probes lose, resets when one wins
        # Below every usable CPU, the next probe up comes after this much decoding time at most: the neighbour
        # that made fewer threads faster may have left, and then each step is 1.5-2 times slower than it could be.
        self._longest_wait_below_most_s = longest_wait_below_most_s
        self._since_probe = 0
        self._since_probe_s = 0.0
        self._batch = 0  # the batch size the recent times are for
        self._recent: deque[float] = deque(maxlen=probe_steps)  # seconds per step at `threads`
        # Per batch size, the median step time when the count was last confirmed (or changed) at that size.
        self._settled: dict[int, float] = {}
        self._trying: int | None = None  # the count being tried, if a probe is on
        self._tried: list[float] = []
        self._go_up = False  # which way the next probe goes, when both are possible

    def threads_for(self, batch: int | None) -> int:
        """The count for the next step; `batch` is its token count if it decodes only (None with a prompt in it)."""
        if batch is None or self.most == 1:
            return self.threads
        if batch != self._batch:
            # Times of another batch size say nothing about this one; a size not measured yet is probed soon.
            self._batch, self._trying = batch, None
            self._recent.clear()
            self._tried.clear()
            if batch not in self._settled:
                self._wait = self._shortest_wait
        overdue_up = (
            self.threads < self.most
            and self._since_probe >= self._shortest_wait
            and self._since_probe_s >= self._longest_wait_below_most_s
        )
        due = self._since_probe >= self._wait or overdue_up
        if self._trying is None and due and len(self._recent) == self._probe_steps:
            up, down = self.threads < self.most, self.threads > 1
            self._go_up = (up and not down) or (up and (self._go_up or overdue_up))
            self._trying = self.threads + 1 if self._go_up else self.threads - 1
            self._go_up = not self._go_up
            self._tried.clear()
        return self._trying if self._trying is not None else self.threads

    def record(self, batch: int | None, seconds: float) -> None:
        """The time of the step just decoded with the count `threads_for(batch)` gave."""
        if batch is None or batch != self._batch or self.most == 1:
            return
        if self._trying is None:
            self._recent.append(seconds)
            self._since_probe += 1
            self._since_probe_s += seconds
            # Much slower than when last confirmed at this size (a neighbour arrived): look again soon.
            settled = self._settled.get(batch)
            if settled and len(self._recent) == self._probe_steps:
                if statistics.median(self._recent) > 1.5 * settled:
                    self._wait = self._shortest_wait
            return
        self._tried.append(seconds)
        current = statistics.median(self._recent)
        # A probe whose first step took twice as long, or whose first two were both clearly slower, has lost: on
        # a quiet machine one thread fewer is 1.5-2 times slower, beside a busy neighbour one more is 2-3 times,
        # and 8 such steps would cost what most probes can never win back.
        clearly_lost = (len(self._tried) == 1 and self._tried[0] > 2 * current) or (
            len(self._tried) == 2 and min(self._tried) > current * (1 + self._margin)
        )
        if len(self._tried) < self._probe_steps and not clearly_lost:
            return
        tried = statistics.median(self._tried)
        if tried < current * (1 - self._margin):
            log.info(
                "engine threads changed",
                extra={"threads": self._trying, "was": self.threads, "ms_per_step": round(1000 * tried, 2)},
            )
            self.threads, self._wait, self._settled = self._trying, self._shortest_wait, {batch: tried}
            self._recent = deque(self._tried, maxlen=self._probe_steps)
        else:
            self._wait = min(2 * self._wait, self._longest_wait)
            self._settled[batch] = current
        self._trying, self._since_probe, self._since_probe_s = None, 0, 0.0
        self._tried.clear()
