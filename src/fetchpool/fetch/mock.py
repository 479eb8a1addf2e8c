"""An in-library test double for the fetch stage (like httpx's ``MockTransport``).

The engine, writers and CLI are tested without sockets: a handler maps each job to a canned
response, and :class:`MockFetcher` turns it into a :class:`Record` with a real temp file,
hashed and typed exactly as :class:`HttpFetcher` would.

    fetcher = MockFetcher(lambda job: MockResponse(body=b"\\xff\\xd8\\xff..."), tmp_dir)
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fetchpool import fsutil
from fetchpool.fetch.content import HEAD_BYTES, sniff_extension
from fetchpool.models import ErrorCode, Job, Record, Status
from fetchpool.policies import parse_retry_after

__all__ = ["MockFetcher", "MockResponse"]


@dataclass(frozen=True, slots=True)
class MockResponse:
    """What the handler answers: a status and body, or a transport-level ``error`` code."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: ErrorCode | None = None
    final_url: str | None = None

    def header(self, name: str) -> str | None:
        """A header's value, matched case-insensitively."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


class MockFetcher:
    """:class:`fetchpool.stages.Fetcher` backed by ``handler(job) -> MockResponse``.

    Thread-safe as long as the handler is. ``calls`` counts fetches (retries included).
    """

    def __init__(self, handler: Callable[[Job], MockResponse], tmp_dir: Path) -> None:
        self._handler = handler
        self._tmp_dir = Path(tmp_dir)
        self._lock = threading.Lock()
        self.calls = 0
        self.closed = False

    def fetch(self, job: Job) -> Record:
        """One attempt: the handler's response, turned into a record (and temp file)."""
        with self._lock:
            self.calls += 1
        record = Record.for_job(job)
        record.started = time.time()
        record.worker = threading.current_thread().name
        try:
            self._apply(self._handler(job), record)
        finally:
            record.finished = time.time()
        return record

    def close(self) -> None:
        self.closed = True

    def _apply(self, response: MockResponse, record: Record) -> None:
        if response.error is not None:
            record.fail(response.error, f"mock {response.error}")
            return
        record.http_status = response.status
        record.content_type = response.header("Content-Type")
        record.final_url = response.final_url or record.url
        if not 200 <= response.status < 300:
            if response.status in (429, 503):
                record.retry_after = parse_retry_after(response.header("Retry-After"), time.time())
            record.fail(ErrorCode.HTTP_ERROR, f"HTTP {response.status}")
            return
        self._save(response.body, record)

    def _save(self, body: bytes, record: Record) -> None:
        handle, path = fsutil.create_temp(self._tmp_dir)
        try:
            handle.write(body)
            fsutil.finish_temp(handle, sync=False)
        except OSError as exc:  # as HttpFetcher: a full disk stops the run, else io_error
            fsutil.abandon(handle, path)
            raise fsutil.translate_os_error(exc, "cannot write the temp file") from exc
        except BaseException:
            fsutil.abandon(handle, path)
            raise
        record.temp_path = path
        record.bytes = record.fetched_bytes = len(body)
        record.sha256 = record.fetched_sha256 = hashlib.sha256(body).hexdigest()
        record.extension = sniff_extension(record.content_type, body[:HEAD_BYTES], record.url)
        record.status = Status.OK
