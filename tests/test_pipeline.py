"""The download pipeline without sockets: the in-library MockFetcher stands in for HTTP.

Real SQLite journal, real files; only the network is replaced.
"""

from __future__ import annotations

import errno
import io
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fetchpool import MockFetcher, MockResponse, download
from fetchpool.config import Options
from fetchpool.engine.pipeline import Pipeline
from fetchpool.events import Event, ItemFinished
from fetchpool.models import ErrorCode, Job, Status


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


#: A real JPEG: WebDataset and Parquet outputs refuse a body that is not an image.
JPEG = _tiny_jpeg()


def fake(handler: Callable[[Job], MockResponse]) -> Callable[[Path], MockFetcher]:
    return lambda tmp: MockFetcher(handler, tmp)


def urls(n: int, host: str = "a.example") -> list[str]:
    return [f"http://{host}/img/{i}.jpg" for i in range(n)]


def test_every_item_ends_in_exactly_one_terminal_record(tmp_path: Path) -> None:
    source = [*urls(5), "ftp://a.example/x", "not a url", urls(1)[0]]
    report = download(source, tmp_path / "out", fetcher=fake(lambda job: MockResponse(body=JPEG)))
    records = list(report.records())
    assert [r.position for r in records] == list(range(8))
    assert Counter(r.status for r in records) == {"ok": 5, "failed": 2, "skipped": 1}
    assert report.exit_code == 1
    assert report.errors == {"unsupported_scheme": 1, "invalid_url": 1, "duplicate": 1}


def test_transient_errors_are_retried_until_success(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    def handler(job: Job) -> MockResponse:
        calls[job.url] += 1
        return MockResponse(status=503) if calls[job.url] < 3 else MockResponse(body=JPEG)

    report = download(
        urls(3), tmp_path / "out", fetcher=fake(handler), attempts=3, backoff_base=0.01
    )
    assert report.ok == 3
    assert set(calls.values()) == {3}
    assert {r.attempts for r in report.records()} == {3}


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    def handler(job: Job) -> MockResponse:
        calls[job.url] += 1
        return MockResponse(status=404, body=b"<html>not found</html>")

    report = download(urls(2), tmp_path / "out", fetcher=fake(handler), backoff_base=0.01)
    assert report.failed == 2
    assert set(calls.values()) == {1}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != ".fetchpool"]


def test_retries_stop_at_the_attempt_budget(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    def handler(job: Job) -> MockResponse:
        calls[job.url] += 1
        return MockResponse(error=ErrorCode.CONNECT_ERROR)

    report = download(
        urls(1), tmp_path / "out", fetcher=fake(handler), attempts=4, backoff_base=0.001
    )
    (record,) = report.records()
    assert record.error_code == ErrorCode.CONNECT_ERROR and record.attempts == 4
    assert calls[urls(1)[0]] == 4


def test_retry_after_slows_only_that_host(tmp_path: Path) -> None:
    seen: list[tuple[str, float]] = []
    limited_calls = itertools.count()

    def handler(job: Job) -> MockResponse:
        seen.append((job.url, time.monotonic()))
        if "limited" in job.url and next(limited_calls) == 0:
            return MockResponse(status=429, headers={"Retry-After": "1"})
        return MockResponse(body=JPEG)

    source = ["http://limited.example/a.jpg", *urls(20, "free.example")]
    start = time.monotonic()
    report = download(source, tmp_path / "out", fetcher=fake(handler), threads=4)
    assert report.ok == 21
    free_done = max(t for u, t in seen if "free" in u) - start
    limited_retry = max(t for u, t in seen if "limited" in u) - start
    assert limited_retry >= 0.9  # Retry-After: 1 honoured
    assert free_done < limited_retry  # the other host was not held back


def test_per_host_limit_is_never_exceeded(tmp_path: Path) -> None:
    active: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(job: Job) -> MockResponse:
        host = job.url.split("/")[2]
        with lock:
            active[host] += 1
            peak[host] = max(peak[host], active[host])
        time.sleep(0.01)
        with lock:
            active[host] -= 1
        return MockResponse(body=JPEG)

    pairs = zip(urls(30, "a.example"), urls(30, "b.example"), strict=True)
    source = [u for pair in pairs for u in pair]
    report = download(source, tmp_path / "out", fetcher=fake(handler), threads=16, per_host=3)
    assert report.ok == 60
    assert peak["a.example"] == 3 and peak["b.example"] == 3


def test_input_is_read_lazily_within_the_window(tmp_path: Path) -> None:
    read = itertools.count()
    done = itertools.count()
    ahead: list[int] = []

    def source() -> Iterator[str]:
        for i in range(5000):
            next(read)
            yield f"http://h{i % 50}.example/{i}.jpg"

    class Watch:
        def on_event(self, event: Event) -> None:
            if isinstance(event, ItemFinished):
                finished = next(done) + 1
                ahead.append(read.__reduce__()[1][0] - finished)

    report = download(
        source(),
        tmp_path / "out",
        fetcher=fake(lambda job: MockResponse(body=JPEG)),
        observers=[Watch()],
        threads=8,
        window=64,
    )
    assert report.ok == 5000
    assert max(ahead) <= 64 + 1


def test_resume_skips_finished_items_without_fetching(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = MockFetcher(lambda job: MockResponse(body=JPEG + job.url.encode()), out)
    download(urls(10), out, fetcher=lambda tmp: first)
    second = MockFetcher(lambda job: MockResponse(body=JPEG), out)
    report = download(urls(10), out, fetcher=lambda tmp: second)
    assert second.calls == 0
    assert report.resumed == 10 and report.ok == 10 and report.exit_code == 0


def test_resume_refetches_an_ok_item_whose_file_disappeared(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download(urls(3), out, fetcher=fake(lambda job: MockResponse(body=JPEG)))
    victim = next(r for r in report.records() if r.position == 1)
    assert victim.path is not None
    (out / victim.path).unlink()
    again = MockFetcher(lambda job: MockResponse(body=JPEG), out)
    download(urls(3), out, fetcher=lambda tmp: again)
    assert again.calls == 1
    assert (out / victim.path).exists()


def test_failures_stay_failed_unless_retry_failed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    download(urls(2), out, fetcher=fake(lambda job: MockResponse(status=404)))
    plain = MockFetcher(lambda job: MockResponse(body=JPEG), out)
    assert download(urls(2), out, fetcher=lambda tmp: plain).failed == 2
    assert plain.calls == 0
    retry = MockFetcher(lambda job: MockResponse(body=JPEG), out)
    report = download(urls(2), out, fetcher=lambda tmp: retry, retry_failed=True)
    assert retry.calls == 2 and report.ok == 2 and report.exit_code == 0


def test_duplicates_are_fetched_once_and_point_at_the_first(tmp_path: Path) -> None:
    fetcher_calls: Counter[str] = Counter()

    def handler(job: Job) -> MockResponse:
        fetcher_calls[job.url] += 1
        time.sleep(0.01)
        return MockResponse(body=JPEG)

    source = urls(3) * 4
    report = download(source, tmp_path / "out", fetcher=fake(handler))
    assert set(fetcher_calls.values()) == {1}
    records = list(report.records())
    dups = [r for r in records if r.status is Status.SKIPPED]
    assert len(dups) == 9 and {r.error_code for r in dups} == {ErrorCode.DUPLICATE}
    firsts = {r.url: r.path for r in records if r.status is Status.OK}
    assert all(d.path == firsts[d.url] for d in dups)


def test_webdataset_shards_larger_than_the_window_do_not_stall(tmp_path: Path) -> None:
    report = download(
        urls(300),
        tmp_path / "out",
        fetcher=fake(lambda job: MockResponse(body=JPEG + job.url.encode())),
        format="webdataset",
        shard_size=1000,
        threads=4,
        window=16,
    )
    assert report.ok == 300
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]


def test_stop_keeps_finished_work_and_resume_completes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pipeline_box: list[Pipeline] = []
    seen = itertools.count()

    def handler(job: Job) -> MockResponse:
        if next(seen) == 20:
            pipeline_box[0].stop()
        time.sleep(0.002)
        return MockResponse(body=JPEG + job.url.encode())

    options = Options.from_kwargs(threads=4)
    pipeline = Pipeline(out, options, fetcher=fake(handler))
    pipeline_box.append(pipeline)
    report = pipeline.run(urls(200))
    assert report.interrupted and report.exit_code == 130
    assert 20 <= report.ok < 200
    done = MockFetcher(lambda job: MockResponse(body=JPEG + job.url.encode()), out)
    final = download(urls(200), out, fetcher=lambda tmp: done)
    assert final.ok == 200 and done.calls == 200 - report.ok


def test_unexpected_fetcher_exception_costs_one_item(tmp_path: Path) -> None:
    def handler(job: Job) -> MockResponse:
        if job.position == 2:
            raise RuntimeError("boom")
        return MockResponse(body=JPEG)

    report = download(urls(5), tmp_path / "out", fetcher=fake(handler))
    assert report.ok == 4
    assert report.errors == {"internal_error": 1}


def test_unknown_option_is_a_config_error(tmp_path: Path) -> None:
    from fetchpool.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown option"):
        download(urls(1), tmp_path / "out", thread=3)


class _FullDisk(io.BytesIO):
    """A temp file on a full disk: writes fail, and so does the flush on close."""

    def write(self, data: object) -> int:  # type: ignore[override]
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_stops_the_run_and_is_not_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetchpool import fsutil

    real = fsutil.create_temp
    calls = itertools.count()

    def create_temp(directory: object, suffix: str = fsutil.TEMP_SUFFIX) -> object:
        handle, path = real(directory, suffix)  # type: ignore[arg-type]
        if next(calls) == 3:
            handle.close()
            return _FullDisk(), path
        return handle, path

    monkeypatch.setattr(fsutil, "create_temp", create_temp)
    report = download(
        urls(10), tmp_path / "out", threads=1, fetcher=fake(lambda job: MockResponse(body=JPEG))
    )
    assert report.fatal and report.exit_code == 2 and report.fatal_kind == "disk_full"
    # The item that met the full disk did nothing wrong: unfinished, neither failed nor
    # journaled, so the next run (space freed) fetches it without --retry-failed.
    assert report.errors == {} and report.unfinished == 1
    assert {r.status for r in report.records()} == {Status.OK}
    assert not list((tmp_path / "out" / ".fetchpool" / "tmp").iterdir())


def test_a_journal_that_cannot_grow_stops_the_run_as_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from fetchpool.state.journal import Journal

    class FullDatabase:
        """The journal's connection once the disk is full: reads work, writes do not."""

        def __init__(self, conn: sqlite3.Connection) -> None:
            self._conn = conn

        def execute(self, sql: str, *args: object) -> object:
            if not sql.startswith("INSERT INTO records"):
                return self._conn.execute(sql, *args)  # type: ignore[arg-type]
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = 13  # type: ignore[attr-defined]
            raise exc

        def __getattr__(self, name: str) -> object:
            return getattr(self._conn, name)

        def __enter__(self) -> object:
            return self._conn.__enter__()

        def __exit__(self, *exc: object) -> object:
            return self._conn.__exit__(*exc)  # type: ignore[arg-type]

    real_open = Journal.open

    def open_full(out: Path, **kwargs: object) -> Journal:
        journal = real_open(out, **kwargs)  # type: ignore[arg-type]
        journal._conn = FullDatabase(journal._conn)  # type: ignore[assignment]
        return journal

    monkeypatch.setattr(Journal, "open", open_full)
    report = download(urls(3), tmp_path / "out", fetcher=fake(lambda job: MockResponse(body=JPEG)))
    assert report.fatal is not None and "journal" in report.fatal
    assert report.exit_code == 2


# ------------------------------------------------------------ case 44: one folder, one input


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_a_different_input_into_the_same_folder_is_refused_before_any_fetch(
    tmp_path: Path, fmt: str
) -> None:
    fetched: list[str] = []

    def handler(job: Job) -> MockResponse:
        fetched.append(job.url)
        return MockResponse(body=JPEG + job.url.encode())

    out = tmp_path / "out"
    first = tmp_path / "a.txt"
    first.write_text("".join(f"{u}\n" for u in urls(10)))
    assert download(first, out, fetcher=fake(handler), format=fmt).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    fetched.clear()
    other = tmp_path / "b.txt"
    other.write_text("".join(f"{u}\n" for u in urls(10, "b.example")))
    report = download(other, out, fetcher=fake(handler), format=fmt)
    assert report.exit_code == 2 and report.fatal_kind == "input_mismatch"
    assert fetched == [], "nothing of the other input is fetched"
    message = report.fatal or ""
    assert "a.txt" in message and "another output folder" in message
    assert "line 1" in message and "b.example" in message
    assert [r.url for r in report.records()] == urls(10), "the first input's records stay"
    assert sorted(p.name for p in out.iterdir()) == before
    # The same input again resumes; the same input with lines appended fetches just those.
    assert download(first, out, fetcher=fake(handler), format=fmt).exit_code == 0
    assert fetched == []
    first.write_text("".join(f"{u}\n" for u in urls(13)))
    again = download(first, out, fetcher=fake(handler), format=fmt)
    assert again.exit_code == 0 and again.resumed == 10
    # The three are fetched at once, on different threads: in any order, each once.
    assert sorted(fetched) == urls(13)[10:]


def test_a_changed_bad_line_is_a_different_input_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok = fake(lambda job: MockResponse(body=JPEG))
    assert download([urls(1)[0], "not a url"], out, fetcher=ok).exit_code == 1
    kept = download([urls(1)[0], "not a url"], out, fetcher=ok)
    assert kept.exit_code == 1 and kept.resumed == 2, "a bad line already journaled is kept"
    report = download([urls(1)[0], "still not a url"], out, fetcher=ok)
    assert report.fatal_kind == "input_mismatch" and "item 1" in (report.fatal or "")
    assert [r.url for r in report.records()] == [urls(1)[0], "not a url"]


def test_the_loop_schedules_by_its_injected_clock(tmp_path: Path) -> None:
    """A Retry-After of ten minutes costs no real waiting when the loop's clock runs fast:
    backoff and Retry-After are scheduled by the injected clock, never by sleeping."""
    calls: Counter[str] = Counter()

    def handler(job: Job) -> MockResponse:
        calls[job.url] += 1
        if calls[job.url] == 1:
            return MockResponse(status=503, headers={"Retry-After": "600"})
        return MockResponse(body=JPEG)

    ticks = itertools.count()
    options = Options.from_kwargs(retry_after_max=600.0, backoff_base=0.0)
    pipeline = Pipeline(
        tmp_path / "out", options, fetcher=fake(handler), clock=lambda: 100.0 * next(ticks)
    )
    started = time.monotonic()
    report = pipeline.run(urls(2))
    assert report.ok == 2 and set(calls.values()) == {2}
    assert time.monotonic() - started < 60, "the ten minutes passed on the injected clock"
