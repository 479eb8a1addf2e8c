"""Per-host politeness for the download pipeline: who may be fetched now.

Pure bookkeeping, owned by the pipeline's loop thread (no locks): each host has a queue of
waiting jobs, a count of active fetches, and a time before which it must not be contacted
(rate limit, ``Retry-After``). A host that is slow or rate-limited holds only its own slots;
the dispatcher round-robins over the hosts that are ready, so one host never starves another.
Retries wait in a time-ordered heap, not in a sleeping thread.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fetchpool.plainurl import host_key

__all__ = ["HostScheduler", "host_key"]

T = TypeVar("T")


@dataclass(slots=True)
class _Host(Generic[T]):
    waiting: deque[T] = field(default_factory=deque)
    active: int = 0
    not_before: float = 0.0


class HostScheduler(Generic[T]):
    """Queues of work per host, handed out under a per-host concurrency cap and rate."""

    def __init__(self, per_host: int, rate_per_host: float | None = None) -> None:
        self._per_host = per_host
        self._interval = 1.0 / rate_per_host if rate_per_host else 0.0
        self._hosts: dict[str, _Host[T]] = {}
        self._ready: deque[str] = deque()  # hosts with waiting work, in round-robin order
        self._delayed: list[tuple[float, int, str, T]] = []
        self._seq = itertools.count()
        self.waiting = 0  # items queued or delayed, not yet handed out

    def add(self, host: str, item: T, *, front: bool = False) -> None:
        state = self._hosts.setdefault(host, _Host())
        if not state.waiting:
            self._ready.append(host)
        if front:
            state.waiting.appendleft(item)
        else:
            state.waiting.append(item)
        self.waiting += 1

    def add_later(self, host: str, item: T, at: float) -> None:
        """Queue a retry: it becomes eligible at time ``at``, ahead of the host's new work."""
        heapq.heappush(self._delayed, (at, next(self._seq), host, item))
        self.waiting += 1

    def slow_down(self, host: str, until: float) -> None:
        """Contact ``host`` again no earlier than ``until`` (a 429/503 with Retry-After)."""
        state = self._hosts.setdefault(host, _Host())
        state.not_before = max(state.not_before, until)

    def release(self, host: str, now: float) -> None:
        """One fetch of ``host`` finished; forget hosts with nothing left, so memory stays flat."""
        state = self._hosts.get(host)
        if state is None:
            return
        state.active -= 1
        if state.active <= 0 and not state.waiting and state.not_before <= now:
            del self._hosts[host]

    def take(self, now: float, budget: int) -> Iterator[tuple[str, T]]:
        """Hand out up to ``budget`` items that may start now, one host at a time in turn."""
        self._promote(now)
        skipped: list[str] = []
        while budget > 0 and self._ready:
            host = self._ready.popleft()
            state = self._hosts[host]
            if state.active >= self._per_host or state.not_before > now:
                skipped.append(host)
                continue
            item = state.waiting.popleft()
            state.active += 1
            self.waiting -= 1
            if self._interval:
                state.not_before = now + self._interval
            budget -= 1
            if state.waiting:
                self._ready.append(host)
            yield host, item
        self._ready.extendleft(reversed(skipped))

    def next_wakeup(self, now: float) -> float | None:
        """Seconds until a delayed item or a slowed-down host may become ready, if any."""
        times = [self._delayed[0][0]] if self._delayed else []
        times += [self._hosts[h].not_before for h in self._ready if self._hosts[h].not_before > now]
        return max(0.0, min(times) - now) if times else None

    def drain(self) -> Iterator[T]:
        """Remove and return every queued or delayed item (used when a run stops early)."""
        for _, _, _, item in self._delayed:
            yield item
        self._delayed.clear()
        for state in self._hosts.values():
            yield from state.waiting
            state.waiting.clear()
        self._ready.clear()
        self.waiting = 0

    def _promote(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, host, item = heapq.heappop(self._delayed)
            self.waiting -= 1  # add() counts it again
            self.add(host, item, front=True)
