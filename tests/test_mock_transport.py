"""The in-library mock replaces only the wire: fetches through it run the real policy.

Redirects (followed, bounded, loops refused, credentials dropped across hosts), opt-out
headers, ``--accept``, ``max_bytes``, decoding, hash verification, content sniffing and
``Retry-After`` all come from :class:`~fetchpool.fetch.policy.Attempt`, whatever moves the
bytes. No test here opens a socket or resolves a name (``spy_connect`` and the guard's
resolver prove it).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from fetchpool.config import FetchConfig
from fetchpool.fetch import HttpFetcher, MockFetcher, MockResponse, MockTransport
from fetchpool.fetch.policy import Request
from fetchpool.models import ErrorCode, Hop, Job, Record

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8


@pytest.fixture(autouse=True)
def no_network(
    spy_connect: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Every test: no connection attempted, no name resolved."""

    def no_dns(*args: object, **kwargs: object) -> object:
        raise AssertionError("the mock transport resolved a name")

    monkeypatch.setattr("socket.getaddrinfo", no_dns)
    yield
    assert spy_connect == []


def fetch(fetcher: MockFetcher | HttpFetcher, url: str, **meta: str) -> Record:
    return fetcher.fetch(Job(position=0, url=url, meta=meta))


def by_url(answers: dict[str, MockResponse], tmp_dir: Path, **config: object) -> MockFetcher:
    return MockFetcher(
        lambda job: answers.get(job.url, MockResponse(status=404)),
        tmp_dir,
        config=FetchConfig(**config),  # type: ignore[arg-type]
    )


def assert_no_temp(tmp_dir: Path) -> None:
    assert os.listdir(tmp_dir) == []


def test_a_redirect_is_followed_and_recorded(tmp_dir: Path) -> None:
    answers = {
        "http://a.test/start": MockResponse(status=301, headers={"Location": "/next"}),
        "http://a.test/next": MockResponse(status=302, headers={"Location": "http://b.test/img"}),
        "http://b.test/img": MockResponse(body=JPEG),
    }
    record = fetch(by_url(answers, tmp_dir), "http://a.test/start")
    assert record.ok, record.error_message
    assert record.final_url == "http://b.test/img"
    assert record.redirects == ["http://a.test/next", "http://b.test/img"]
    assert Path(record.temp_path or "").read_bytes() == JPEG
    assert record.extension == ".jpg"  # sniffed from the body: no Content-Type was sent


def test_a_redirect_loop_is_refused(tmp_dir: Path) -> None:
    answers = {
        "http://a.test/1": MockResponse(status=302, headers={"Location": "/2"}),
        "http://a.test/2": MockResponse(status=302, headers={"Location": "/1"}),
    }
    record = fetch(by_url(answers, tmp_dir), "http://a.test/1")
    assert record.error_code is ErrorCode.TOO_MANY_REDIRECTS
    assert "(loop)" in (record.error_message or "")
    assert_no_temp(tmp_dir)


def test_a_long_chain_stops_at_max_redirects(tmp_dir: Path) -> None:
    def handler(job: Job) -> MockResponse:
        n = int(job.url.rsplit("/", 1)[1])
        return MockResponse(status=302, headers={"Location": f"/{n + 1}"})

    fetcher = MockFetcher(handler, tmp_dir, config=FetchConfig(max_redirects=3))
    record = fetch(fetcher, "http://a.test/0")
    assert record.error_code is ErrorCode.TOO_MANY_REDIRECTS
    assert record.error_message == "4 redirects, max_redirects=3"


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("file:///etc/passwd", "redirect to a file: URL refused"),
        ("http://a.test/", "https to http downgrade refused: 'http://a.test/'"),
    ],
)
def test_redirects_the_policy_refuses(tmp_dir: Path, location: str, message: str) -> None:
    answers = {"https://a.test/": MockResponse(status=302, headers={"Location": location})}
    record = fetch(by_url(answers, tmp_dir), "https://a.test/")
    assert (record.error_code, record.error_message) == (ErrorCode.REDIRECT_REFUSED, message)


def test_credentials_are_dropped_on_a_redirect_to_another_host(tmp_dir: Path) -> None:
    """The transport sees each request's bytes: the userinfo's Authorization goes to the
    first host only, as RELIABILITY.md case 28 asks."""
    sent: list[bytes] = []

    def handler(request: Request) -> MockResponse:
        sent.append(request.data)
        if request.target.host == "a.test":
            return MockResponse(status=302, headers={"Location": "http://b.test/x"})
        return MockResponse(body=JPEG)

    fetcher = HttpFetcher(FetchConfig(), tmp_dir, transport=MockTransport(handler))
    try:
        record = fetch(fetcher, "http://user:pw@a.test/x")
    finally:
        fetcher.close()
    assert record.ok, record.error_message
    assert b"Authorization: Basic dXNlcjpwdw==" in sent[0]
    assert sent[1].startswith(b"GET /x HTTP/1.1\r\nHost: b.test\r\n")
    assert b"Authorization" not in sent[1]


def test_a_redirect_to_another_host_is_handed_back(tmp_dir: Path) -> None:
    def handler(request: Request) -> MockResponse:
        return MockResponse(status=302, headers={"Location": "http://b.test/x"})

    transport = MockTransport(handler)
    fetcher = HttpFetcher(FetchConfig(), tmp_dir, transport=transport, hand_back_redirects=True)
    try:
        record = fetch(fetcher, "http://a.test/x")
    finally:
        fetcher.close()
    moved = record.moved_to
    assert moved is not None and record.temp_path is None
    assert (moved.url, moved.redirects) == ("http://b.test/x", ("http://b.test/x",))
    assert set(moved.seen) == {"http://a.test/x", "http://b.test/x"}


def test_an_opt_out_header_is_honoured(tmp_dir: Path) -> None:
    answers = {"http://a.test/x": MockResponse(body=JPEG, headers={"X-Robots-Tag": "noai"})}
    record = fetch(by_url(answers, tmp_dir), "http://a.test/x")
    assert record.error_code is ErrorCode.OPTED_OUT
    assert "noai" in (record.error_message or "")
    assert_no_temp(tmp_dir)


def test_accept_refuses_other_content_types(tmp_dir: Path) -> None:
    answers = {
        "http://a.test/x": MockResponse(body=b"<html>", headers={"Content-Type": "text/html"})
    }
    record = fetch(by_url(answers, tmp_dir, accept=("image/*",)), "http://a.test/x")
    assert record.error_code is ErrorCode.UNWANTED_CONTENT_TYPE
    assert record.error_message == "Content-Type text/html is not in --accept image/*"


def test_max_bytes_refuses_a_large_body(tmp_dir: Path) -> None:
    answers = {"http://a.test/x": MockResponse(body=JPEG)}
    record = fetch(by_url(answers, tmp_dir, max_bytes=100), "http://a.test/x")
    assert record.error_code is ErrorCode.TOO_LARGE
    assert record.error_message == f"Content-Length {len(JPEG)} exceeds max_bytes=100"
    assert_no_temp(tmp_dir)


def test_a_gzip_body_is_decoded_and_capped(tmp_dir: Path) -> None:
    packed = gzip.compress(JPEG)
    answers = {"http://a.test/x": MockResponse(body=packed, headers={"Content-Encoding": "gzip"})}
    record = fetch(by_url(answers, tmp_dir, accept_encoding="gzip"), "http://a.test/x")
    assert record.ok, record.error_message
    assert Path(record.temp_path or "").read_bytes() == JPEG
    assert record.sha256 == hashlib.sha256(JPEG).hexdigest()


def test_hash_verification(tmp_dir: Path) -> None:
    answers = {"http://a.test/x": MockResponse(body=JPEG)}
    fetcher = by_url(answers, tmp_dir, verify_hash_column="sha")
    good = fetch(fetcher, "http://a.test/x", sha=hashlib.sha256(JPEG).hexdigest())
    assert good.ok, good.error_message
    os.unlink(good.temp_path or "")
    bad = fetch(fetcher, "http://a.test/x", sha=hashlib.sha256(b"other").hexdigest())
    assert bad.error_code is ErrorCode.HASH_MISMATCH
    assert_no_temp(tmp_dir)
    missing = fetch(fetcher, "http://a.test/x")
    assert missing.error_code is ErrorCode.BAD_INPUT
    assert fetcher.calls == 3


def test_retry_after_and_status_refusal(tmp_dir: Path) -> None:
    answers = {
        "http://a.test/busy": MockResponse(status=503, body=b"busy", headers={"Retry-After": "7"}),
        "http://a.test/gone": MockResponse(status=410, body=b"<html>gone</html>"),
    }
    fetcher = by_url(answers, tmp_dir)
    busy = fetch(fetcher, "http://a.test/busy")
    assert (busy.error_code, busy.http_status, busy.retry_after) == (ErrorCode.HTTP_ERROR, 503, 7.0)
    gone = fetch(fetcher, "http://a.test/gone")
    assert (gone.error_message, gone.http_status) == ("HTTP 410", 410)
    assert_no_temp(tmp_dir)


def test_a_wire_error_and_a_final_url(tmp_dir: Path) -> None:
    def handler(job: Job) -> MockResponse:
        if "down" in job.url:
            return MockResponse(error=ErrorCode.CONNECT_ERROR)
        return MockResponse(body=JPEG, final_url="http://cdn.test/1.jpg")

    fetcher = MockFetcher(handler, tmp_dir)
    down = fetch(fetcher, "http://a.test/down")
    assert down.error_code is ErrorCode.CONNECT_ERROR and down.temp_path is None
    moved = fetch(fetcher, "http://a.test/x")
    assert moved.ok and moved.final_url == "http://cdn.test/1.jpg"
    assert moved.redirects == ["http://cdn.test/1.jpg"]


def test_min_speed_runs_on_the_injected_clock(tmp_dir: Path) -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # each look at the clock: one second later
        return now[0]

    config = FetchConfig(min_speed=10_000, min_speed_window=1.0, total_timeout=1000)
    fetcher = MockFetcher(lambda job: MockResponse(body=JPEG), tmp_dir, config=config, clock=clock)
    record = fetch(fetcher, "http://a.test/x")
    assert record.error_code is ErrorCode.TOO_SLOW, record.error_message
    assert_no_temp(tmp_dir)


def test_a_hop_job_resumes_at_its_leg(tmp_dir: Path) -> None:
    seen: list[str] = []

    def handler(job: Job) -> MockResponse:
        seen.append(job.url)
        return MockResponse(body=JPEG)

    hop = Hop("http://b.test/y", ("http://b.test/y",), ("http://a.test/x", "http://b.test/y"))
    record = MockFetcher(handler, tmp_dir).fetch(replace(Job(0, "http://a.test/x"), hop=hop))
    assert record.ok and record.final_url == "http://b.test/y"
    assert seen == ["http://b.test/y"] and record.redirects == ["http://b.test/y"]


def test_the_mock_runs_as_many_fetches_at_once_as_it_is_given(tmp_dir: Path) -> None:
    """A run with more threads than a default FetchConfig's 32 must reach the handler with
    all of them at once (a handler that waits for its peers, as a test of per-host limits or
    of backpressure does, would otherwise wait for fetches that never start)."""
    threads = 40
    gathered = threading.Barrier(threads, timeout=5)

    def handler(job: Job) -> MockResponse:
        gathered.wait()  # every fetch in flight at once, or BrokenBarrierError
        return MockResponse(body=JPEG)

    fetcher = MockFetcher(handler, tmp_dir)
    try:
        with ThreadPoolExecutor(threads) as pool:
            jobs = [Job(i, f"http://h{i}.test/x.jpg") for i in range(threads)]
            records = list(pool.map(fetcher.fetch, jobs))
    except threading.BrokenBarrierError:
        records = []
    finally:
        fetcher.close()
    assert len(records) == threads and all(record.ok for record in records)
