"""RetryPolicy and Retry-After parsing: pure functions, no clock, no sleeping."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from fetchpool.config import FetchConfig
from fetchpool.errors import FetchpoolError
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.policies import RetriesExhausted, RetryPolicy, parse_retry_after

NOW = 1_700_000_000.0


def failed(code: ErrorCode, status: int | None = None, retry_after: float | None = None) -> Record:
    record = Record(position=0, url="http://example.com/")
    record.fail(code, "x")
    record.http_status = status
    record.retry_after = retry_after
    return record


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.CONNECT_ERROR,
        ErrorCode.CONNECT_TIMEOUT,
        ErrorCode.READ_TIMEOUT,
        ErrorCode.TOTAL_TIMEOUT,
        ErrorCode.TOO_SLOW,
        ErrorCode.PROTOCOL_ERROR,
        ErrorCode.INCOMPLETE_BODY,
    ],
)
def test_transient_codes_are_retryable(code: ErrorCode) -> None:
    assert RetryPolicy.retryable(failed(code))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    assert RetryPolicy.retryable(failed(ErrorCode.HTTP_ERROR, status))


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 418, 451, 501])
def test_other_statuses_never_retried(status: int) -> None:
    record = failed(ErrorCode.HTTP_ERROR, status)
    assert not RetryPolicy.retryable(record)
    with pytest.raises(RetriesExhausted):
        RetryPolicy().increment(record)


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.BLOCKED_ADDRESS,
        ErrorCode.TLS_ERROR,
        ErrorCode.TOO_LARGE,
        ErrorCode.TOO_MANY_REDIRECTS,
        ErrorCode.REDIRECT_REFUSED,
        ErrorCode.INVALID_URL,
    ],
)
def test_permanent_codes_not_retried(code: ErrorCode) -> None:
    assert not RetryPolicy.retryable(failed(code))


def test_success_is_not_retryable() -> None:
    assert not RetryPolicy.retryable(Record(position=0, url="u", status=Status.OK))


def test_increment_until_exhausted() -> None:
    record = failed(ErrorCode.CONNECT_ERROR)
    policy = RetryPolicy(attempts=3)
    assert policy.remaining == 2
    policy = policy.increment(record)
    policy = policy.increment(record)
    assert policy.retries == 2 and policy.remaining == 0
    with pytest.raises(RetriesExhausted) as info:
        policy.increment(record)
    assert isinstance(info.value, FetchpoolError)


def test_single_attempt_never_retries() -> None:
    with pytest.raises(RetriesExhausted):
        RetryPolicy(attempts=1).increment(failed(ErrorCode.CONNECT_ERROR))


def test_policy_is_immutable_value() -> None:
    policy = RetryPolicy()
    nxt = policy.increment(failed(ErrorCode.READ_TIMEOUT))
    assert policy.retries == 0 and nxt.retries == 1
    with pytest.raises(AttributeError):
        policy.retries = 5  # type: ignore[misc]


def test_from_config() -> None:
    config = FetchConfig(attempts=5, backoff_base=1.0, backoff_max=4.0, retry_after_max=9.0)
    assert RetryPolicy.from_config(config) == RetryPolicy(5, 1.0, 4.0, 9.0)


def test_full_jitter_bounds_grow_and_cap() -> None:
    rng = random.Random(1)
    record = failed(ErrorCode.CONNECT_ERROR)
    for retries, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0), (99, 30.0)]:
        policy = RetryPolicy(attempts=100, retries=retries)
        delays = [policy.delay(record, rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # actually jittered over the whole range


def test_retry_after_honoured_and_capped() -> None:
    rng = random.Random(2)
    policy = RetryPolicy(backoff_base=0.5, retry_after_max=120.0)
    assert policy.delay(failed(ErrorCode.HTTP_ERROR, 429, 7.0), rng) >= 7.0
    assert policy.delay(failed(ErrorCode.HTTP_ERROR, 503, 999_999_999.0), rng) == 120.0
    assert 0.0 <= policy.delay(failed(ErrorCode.HTTP_ERROR, 503, 0.0), rng) <= 0.5


def test_zero_backoff() -> None:
    policy = RetryPolicy(backoff_base=0.0)
    assert policy.delay(failed(ErrorCode.CONNECT_ERROR), random.Random()) == 0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("-5", 0.0),
        ("999999999", 999999999.0),
        ("99999999999999999999999", 99999999999999999999999.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("1.5", None),
        ("5s", None),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_http_date() -> None:
    future = formatdate(NOW + 30, usegmt=True)
    assert parse_retry_after(future, NOW) == pytest.approx(30.0)
    past = formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after(past, NOW) == 0.0


def test_parse_retry_after_naive_date_is_utc() -> None:
    value = formatdate(NOW + 60).replace("+0000", "-0000")
    assert parse_retry_after(value, NOW) == pytest.approx(60.0)
