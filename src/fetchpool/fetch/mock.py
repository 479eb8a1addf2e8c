"""An in-library test double that replaces only the wire (httpx's ``MockTransport``).

:class:`MockTransport` answers each request the policy makes with ``handler(request)``: no
DNS, no socket. Everything above the wire is the real :class:`HttpFetcher` and its
:class:`~fetchpool.fetch.policy.Attempt` — redirects (a 3xx with ``Location`` is followed,
checked and bounded), opt-outs, ``--accept``, limits, decoding, digests and
``--verify-hash-column``, content sniffing, ``Retry-After`` — so a test of the engine or a
writer through the mock exercises the same policy a real run does::

    fetcher = HttpFetcher(config, tmp_dir, transport=MockTransport(lambda request: ...))
    fetcher = MockFetcher(lambda job: MockResponse(body=b"\\xff\\xd8\\xff..."), tmp_dir)

:class:`MockFetcher` is the convenient form, keyed by the job: each request's handler call
gets the job with ``url`` set to the URL that hop asks for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from fetchpool import fsutil
from fetchpool.config import FetchConfig
from fetchpool.fetch.client import HttpFetcher
from fetchpool.fetch.h1 import WireError
from fetchpool.fetch.policy import Attempt, Request
from fetchpool.fetch.transport import Watch
from fetchpool.models import ErrorCode, Job, Record

__all__ = ["MockFetcher", "MockResponse", "MockTransport"]


@dataclass(frozen=True, slots=True)
class MockResponse:
    """What the handler answers: a status, headers and body, or a wire failure (``error``:
    the error code the transport fails with, as a refused connect or a reset would).

    ``final_url``: where the server sent the first request before answering, as a real
    redirect (a 302 to it, followed by the policy like any other), so ``record.final_url``
    and ``record.redirects`` show it.
    """

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    error: ErrorCode | None = None
    final_url: str | None = None

    def header(self, name: str) -> str | None:
        """A header's value, matched case-insensitively."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


class _MockWire:
    """A :class:`~fetchpool.fetch.transport.WireResponse` over a canned body."""

    __slots__ = ("_at", "_body", "headers", "reason", "status")

    def __init__(self, response: MockResponse) -> None:
        self.status = response.status
        self.reason = ""
        headers: dict[str, str] = {}
        for name, value in response.headers.items():
            known = headers.get(name.lower())
            headers[name.lower()] = value if known is None else f"{known}, {value}"
        self.headers = headers
        self._body = response.body
        self._at = 0

    @property
    def length_remaining(self) -> int | None:
        return len(self._body) - self._at

    def get_all(self, name: str) -> list[str]:
        value = self.headers.get(name)
        return [] if value is None else [value]

    def set_timeout(self, seconds: float) -> None:
        pass

    def read1(self, size: int) -> bytes:
        data = self._body[self._at : self._at + size]
        self._at += len(data)
        return data

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class _FileSink:
    """MockFetcher's body sink: a buffered temp file from ``fsutil.create_temp``, as the mock
    always wrote one (tests inject local faults, a full disk, there). Local errors are the
    run's: a full disk stops it (:class:`~fetchpool.errors.DiskFullError`)."""

    sync = False

    def __init__(self, tmp_dir: Path) -> None:
        self._tmp_dir = tmp_dir
        self._handle: BinaryIO | None = None
        self._path = ""

    def open(self) -> None:
        self._handle, self._path = fsutil.create_temp(self._tmp_dir)

    def write(self, data: bytes) -> None:
        assert self._handle is not None, "write() before open()"
        self._local(self._handle.write, data)

    def close(self) -> str:
        assert self._handle is not None, "close() before open()"
        self._local(fsutil.finish_temp, self._handle, sync=False)
        self._handle = None
        return self._path

    def discard(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            fsutil.abandon(handle, self._path)

    def _local(self, operation: Callable[..., object], *args: object, **kwargs: bool) -> None:
        try:
            operation(*args, **kwargs)
        except OSError as exc:
            self.discard()
            raise fsutil.translate_os_error(exc, "cannot write the temp file") from exc


class MockTransport:
    """:class:`~fetchpool.fetch.transport.Transport` backed by ``handler(request) ->
    MockResponse``; ``request.job`` is the item it serves, ``request.target.url`` the URL
    asked for. Thread-safe as long as the handler is."""

    def __init__(self, handler: Callable[[Request], MockResponse]) -> None:
        self._handler = handler

    def send(self, request: Request, attempt: Attempt, watch: Watch | None) -> _MockWire:
        response = self._handler(request)
        if response.error is not None:
            raise attempt.wire_error(WireError(response.error, f"mock {response.error}"))
        url = request.target.url
        if response.final_url and url == request.job.url and response.final_url != url:
            return _MockWire(MockResponse(status=302, headers={"Location": response.final_url}))
        return _MockWire(response)

    def close(self) -> None:
        pass


class MockFetcher:
    """:class:`fetchpool.stages.Fetcher` backed by ``handler(job) -> MockResponse``: a real
    :class:`HttpFetcher` (``config``, default :class:`FetchConfig`) over a
    :class:`MockTransport`.

    Thread-safe as long as the handler is. ``calls`` counts fetches (retries included).
    """

    def __init__(
        self,
        handler: Callable[[Job], MockResponse],
        tmp_dir: Path,
        *,
        config: FetchConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler = handler
        self._lock = threading.Lock()
        self.calls = 0
        self.closed = False
        self._fetcher = HttpFetcher(
            config or FetchConfig(),
            Path(tmp_dir),
            clock=clock,
            transport=MockTransport(self._answer),
            sink=lambda: _FileSink(Path(tmp_dir)),
        )

    def fetch(self, job: Job) -> Record:
        """One attempt, through the real policy, answered by the handler."""
        with self._lock:
            self.calls += 1
        return self._fetcher.fetch(job)

    def close(self) -> None:
        self.closed = True
        self._fetcher.close()

    def _answer(self, request: Request) -> MockResponse:
        job = request.job
        if request.target.url != job.url:  # a later hop: the handler sees the URL it asks for
            job = replace(job, url=request.target.url)
        return self._handler(job)
