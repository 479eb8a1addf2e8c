"""Retry policy: an immutable value that computes its next state. Bottom layer.

Imports only :mod:`fetchpool.models`, :mod:`fetchpool.errors` and :mod:`fetchpool.config`.
Nothing here sleeps: the scheduler asks for a delay and does the waiting itself (and only for
the item concerned, never by blocking a fetch thread), so backoff is testable without a clock.

Typical use by the scheduler (after each failed attempt)::

    policy = RetryPolicy.from_config(config)        # once per item
    ...
    record = fetcher.fetch(job)
    if not record.ok:
        try:
            following = policy.increment(record)    # raises when this record is terminal
        except RetriesExhausted:
            finish(record)
        else:
            schedule(job, after=policy.delay(record, rng))   # delay from the failed state
            policy = following
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC
from random import Random

from fetchpool.config import FetchConfig
from fetchpool.errors import FetchpoolError
from fetchpool.models import RETRYABLE_CODES, RETRYABLE_STATUSES, ErrorCode, Record

__all__ = ["RetriesExhausted", "RetryPolicy", "parse_retry_after"]

# RFC 9110 delay-seconds is 1*DIGIT; a sign is tolerated so that "-5" means "now", not garbage.
_DELTA_SECONDS = re.compile(r"[+-]?\d+")


class RetriesExhausted(FetchpoolError):
    """No further attempt will be made: the failure is permanent or the budget is spent."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many attempts an item gets and how long to wait between them.

    ``attempts`` counts every try, the first included. ``retries`` is the number of retries
    already granted (0 before the first retry); :meth:`increment` returns the next state.
    """

    attempts: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    retries: int = 0

    @classmethod
    def from_config(cls, config: FetchConfig) -> RetryPolicy:
        """The initial policy for one item, from the fetch configuration."""
        return cls(
            attempts=config.attempts,
            backoff_base=config.backoff_base,
            backoff_max=config.backoff_max,
            retry_after_max=config.retry_after_max,
        )

    @property
    def remaining(self) -> int:
        """Attempts still allowed after the current one."""
        return max(0, self.attempts - 1 - self.retries)

    @staticmethod
    def retryable(record: Record) -> bool:
        """True when the failure in ``record`` is transient (another attempt may succeed)."""
        code = record.error_code
        if record.ok or code is None:
            return False
        if code is ErrorCode.HTTP_ERROR:
            # Only the listed statuses: retrying a 404 or 403 never helps and hammers the host.
            return record.http_status in RETRYABLE_STATUSES
        return code in RETRYABLE_CODES

    def increment(self, record: Record) -> RetryPolicy:
        """Account for the failed attempt in ``record``; return the policy for the next one.

        Raises :class:`RetriesExhausted` when the failure is not retryable or no attempt is left.
        """
        if not self.retryable(record):
            raise RetriesExhausted(f"{record.error_code or 'success'} is not retried")
        if self.remaining <= 0:
            raise RetriesExhausted(f"gave up after {self.attempts} attempts")
        return replace(self, retries=self.retries + 1)

    def backoff(self, rng: Random) -> float:
        """Full-jitter exponential backoff: ``uniform(0, min(max, base * 2**retries))``."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0**self.retries)
        return rng.uniform(0.0, ceiling)

    def delay(self, record: Record, rng: Random) -> float:
        """Seconds to wait before retrying the failed attempt in ``record``.

        Call it on the policy that saw the failure (before :meth:`increment`): the first
        retry waits up to ``backoff_base``, the second up to twice that, and so on.

        A server's ``Retry-After`` is honoured up to ``retry_after_max``; jitter still applies
        so that many items throttled by one host do not come back in lock-step.
        """
        jitter = self.backoff(rng)
        if record.retry_after is None:
            return jitter
        return max(min(max(0.0, record.retry_after), self.retry_after_max), jitter)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (delta-seconds or HTTP-date).

    ``now`` is the wall-clock time (``time.time()``) the date is compared with. Dates in the
    past and negative deltas give 0; anything unparseable gives None. Huge values are returned
    as they are: capping is the policy's job.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        return max(0.0, float(int(text)))
    import email.utils  # an HTTP date: rare, and the module costs start-up time

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" dates: RFC 5322 says UTC with unknown origin
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
