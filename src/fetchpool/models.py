"""Plain values that flow through the pipeline.

Bottom layer: imports nothing else from the package.

    input reader ──Job / BadInput──▶ scheduler ──Job──▶ fetcher ──Record(temp_path)──▶
    processor ──Record(temp_path)──▶ writer ──Record(path)──▶ journal ──▶ report

A :class:`Record` is created by the fetch stage and completed by the later stages; it is the
one row per input item that the state journal stores and the manifest exports. A
:class:`Report` is what a whole run did: counts by status and error, and, through the records
source its builder attaches, every record.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol


class Status(StrEnum):
    """Terminal state of one input item."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class ErrorCode(StrEnum):
    """Stable, documented error codes: one per way an item can fail or be skipped."""

    # input
    INVALID_URL = "invalid_url"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    BAD_INPUT = "bad_input"
    # network
    CONNECT_ERROR = "connect_error"
    CONNECT_TIMEOUT = "connect_timeout"
    READ_TIMEOUT = "read_timeout"
    TOTAL_TIMEOUT = "total_timeout"
    TOO_SLOW = "too_slow"
    TLS_ERROR = "tls_error"
    PROTOCOL_ERROR = "protocol_error"
    BLOCKED_ADDRESS = "blocked_address"
    PROXY_ERROR = "proxy_error"  # the proxy refused the request (407, 403...): not retried
    # HTTP
    HTTP_ERROR = "http_error"
    TOO_MANY_REDIRECTS = "too_many_redirects"
    REDIRECT_REFUSED = "redirect_refused"
    TOO_LARGE = "too_large"
    INCOMPLETE_BODY = "incomplete_body"
    BAD_CONTENT_ENCODING = "bad_content_encoding"
    UNWANTED_CONTENT_TYPE = "unwanted_content_type"  # not in --accept
    OPTED_OUT = "opted_out"  # X-Robots-Tag noai (...) or tdm-reservation: 1
    # content / CPU stage
    HASH_MISMATCH = "hash_mismatch"  # the body's digest differs from the input row's
    NOT_AN_IMAGE = "not_an_image"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    IMAGE_AREA_TOO_SMALL = "image_area_too_small"
    IMAGE_AREA_TOO_LARGE = "image_area_too_large"
    ASPECT_RATIO_TOO_LARGE = "aspect_ratio_too_large"
    PROCESS_FAILED = "process_failed"
    # local
    IO_ERROR = "io_error"
    DISK_FULL = "disk_full"
    # skips
    DUPLICATE = "duplicate"
    ALREADY_DONE = "already_done"
    CANCELLED = "cancelled"
    # a bug in fetchpool itself: reported, never hidden
    INTERNAL_ERROR = "internal_error"


#: Codes whose failure is transient: a retry inside the same run may succeed.
RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.CONNECT_ERROR,
        ErrorCode.CONNECT_TIMEOUT,
        ErrorCode.READ_TIMEOUT,
        ErrorCode.TOTAL_TIMEOUT,
        ErrorCode.TOO_SLOW,
        ErrorCode.PROTOCOL_ERROR,
        ErrorCode.INCOMPLETE_BODY,
    }
)

#: Record fields with a digest of the downloaded bytes, named after their algorithm as
#: img2dataset names its ``compute_hash`` column, filled when asked (``--hash``); the sha256
#: of the download is always in ``fetched_sha256``.
DOWNLOAD_DIGESTS = ("md5", "sha512")

#: HTTP statuses that are retried (RELIABILITY.md: 408/429/500/502/503/504).
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Hop:
    """Where an attempt goes on after a redirect to another host.

    The fetcher stops at such a redirect and hands the item back; the scheduler queues it
    under the new host, so a host that many others redirect to (a CDN) keeps its per-host
    limit. The next leg starts at ``url`` with the chain so far (``redirects``, as recorded;
    ``seen``, as requested, for loop detection) and without credentials.
    """

    url: str
    redirects: tuple[str, ...] = ()
    seen: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Job:
    """One URL to fetch, as read from the input.

    ``position`` is the 0-based index of the item in the input (its identity in the journal);
    ``line`` the 1-based line (or row) number in the source file, for error messages.
    ``meta`` holds the input's other columns (caption, id, ...), passed through to outputs.
    """

    position: int
    url: str
    line: int | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    hop: Hop | None = None  # set when the attempt goes on after a redirect to another host


@dataclass(frozen=True, slots=True)
class BadInput:
    """An input line that is not a usable URL: it becomes a failed record, the run goes on."""

    position: int
    line: int | None
    raw: str
    code: ErrorCode
    message: str


InputItem = Job | BadInput


@dataclass(slots=True)
class Record:
    """Everything known about one input item; the journal's row and the manifest's line."""

    position: int
    url: str
    status: Status = Status.FAILED
    error_code: ErrorCode | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    bytes: int = 0
    sha256: str | None = None
    content_type: str | None = None
    final_url: str | None = None
    path: str | None = None
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    line: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    redirects: list[str] = field(default_factory=list)
    # Image facts, filled by the CPU stage when images are processed.
    width: int | None = None
    height: int | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    image_format: str | None = None
    # What was downloaded, when the CPU stage wrote something else (``bytes`` and ``sha256``
    # always describe the output); equal to them otherwise.
    fetched_bytes: int | None = None
    fetched_sha256: str | None = None
    # Digests of what was downloaded too, when asked for (``--hash``, ``--verify-hash-type``).
    md5: str | None = None
    sha512: str | None = None
    # The original's EXIF tags as a JSON object text (``--save-exif``; ``{}`` when the image
    # has none), None when not asked for.
    exif: str | None = None
    # Transient: the fetched (or processed) body waiting to be published. Never persisted.
    temp_path: str | None = None
    # Transient: the file extension chosen for the body (".jpg"), set by fetch or process.
    extension: str | None = None
    # Transient: seconds the server asked us to wait (Retry-After), for the retry scheduler.
    retry_after: float | None = None
    # Transient: temp_path's bytes were fsynced by whoever wrote them (the writer then skips it).
    temp_synced: bool = False
    # Transient: the attempt reached a redirect to another host and goes on from there, under
    # that host's limits (see Hop); nothing was fetched yet.
    moved_to: Hop | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.OK

    @property
    def elapsed(self) -> float:
        if self.started is None or self.finished is None:
            return 0.0
        return max(0.0, self.finished - self.started)

    def fail(self, code: ErrorCode, message: str) -> Record:
        """Mark this record failed (in place) and return it."""
        self.status = Status.FAILED
        self.error_code = code
        self.error_message = message
        return self

    def cancel(self, message: str) -> Record:
        """Mark this record cancelled (in place) and drop its temp file's name; return it.

        The run stopped before the item finished: the pipeline does not journal it."""
        self.temp_path = None
        self.status = Status.SKIPPED
        self.error_code = ErrorCode.CANCELLED
        self.error_message = message
        return self

    @classmethod
    def for_job(cls, job: Job) -> Record:
        return cls(position=job.position, url=job.url, line=job.line, meta=dict(job.meta))

    @classmethod
    def for_bad_input(cls, bad: BadInput) -> Record:
        return cls(
            position=bad.position,
            url=bad.raw,
            line=bad.line,
            status=Status.FAILED,
            error_code=bad.code,
            error_message=bad.message,
        )


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """What the generic runner records for each task (the lab's and timeline's raw data)."""

    index: int
    start: float
    end: float
    worker: str
    thread: str
    ok: bool = True
    label: str = ""


class RecordSource(Protocol):
    """Streams a run's records (``state.journal.iter_journal`` bound to a folder, or
    ``state.exported.iter_cluster_records`` bound to a cluster run's destination)."""

    def __call__(self, *, status: Status | None = None) -> Iterator[Record]: ...


class Destination(Protocol):
    """A cluster run's destination as a report shows it (``storage.Store``)."""

    def display(self, name: str) -> str:
        """``name`` inside the destination, as the user would write it."""
        ...


@dataclass(slots=True)
class Report:
    """What a run did. Partial failure is a value: the CLI maps it to an exit code."""

    out: Path
    counts: dict[str, int] = field(default_factory=dict)  # by status
    errors: dict[str, int] = field(default_factory=dict)  # failed/skipped by error code
    #: Failures of one code that call for different actions, by code then detail:
    #: ``http_error`` by status ("404", "500"), ``total_timeout`` by whether the response head
    #: had arrived ("no response", "in the body").
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)
    bytes: int = 0  # downloaded by this run (as fetched, before any CPU-stage work)
    wall: float = 0.0
    busy: float = 0.0  # sum of per-attempt fetch times
    items: int = 0
    resumed: int = 0  # items already finished by an earlier run, not touched this time
    resumed_failed: int = 0  # of those, failures kept as they are (no --retry-failed)
    resumed_errors: dict[str, int] = field(default_factory=dict)  # their error codes
    interrupted: bool = False
    fatal: str | None = None  # a run-level failure that stopped the run early
    fatal_kind: str | None = None  # its stable word: "disk_full", "input_mismatch"
    #: Items that were under way when the run stopped early (disk full, a stop, a worker
    #: gone while stopping): not journaled, so the next run fetches them like any other.
    unfinished: int = 0
    #: A cluster run's destination (a local folder or an fsspec URL; a ``storage.Store``).
    store: Destination | None = None
    #: Where :meth:`records` reads, attached by whoever builds the report (the pipeline: the
    #: run's journal; the cluster driver: every part's records). It must pickle: a cluster
    #: part's report travels to the driver.
    source: RecordSource | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> int:
        return self.counts.get(Status.OK, 0)

    @property
    def failed(self) -> int:
        return self.counts.get(Status.FAILED, 0)

    @property
    def skipped(self) -> int:
        return self.counts.get(Status.SKIPPED, 0)

    @property
    def gain(self) -> float:
        """Concurrency gain: sum of per-item times over wall time (the notebook's comparison)."""
        return self.busy / self.wall if self.wall > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.fatal:
            return 2
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def records(self, status: Status | None = None) -> Iterator[Record]:
        """Every per-item record of the output folder, from its journal (streamed); for a
        cluster run, of every part, merged in position order, paths relative to the
        destination."""
        if self.source is None:
            raise ValueError(f"this report of {self.out} has no records source to read")
        return self.source(status=status)

    def fail_run(self, kind: str, reason: str) -> None:
        """A run-level failure (``kind``: its stable word): the first one is kept."""
        if self.fatal is None:
            self.fatal = reason
            self.fatal_kind = kind

    def add(self, record: Record, *, resumed: bool = False) -> None:
        self.items += 1
        self.counts[record.status] = self.counts.get(record.status, 0) + 1
        code = record.error_code
        if code is not None:
            self.errors[code] = self.errors.get(code, 0) + 1
            detail = _detail(record)
            if detail is not None:
                counts = self.breakdown.setdefault(code, {})
                counts[detail] = counts.get(detail, 0) + 1
        if resumed:
            self.resumed += 1
            self.resumed_failed += record.status is Status.FAILED
            if code is not None:
                self.resumed_errors[code] = self.resumed_errors.get(code, 0) + 1
        elif record.status is Status.OK:
            fetched = record.fetched_bytes
            self.bytes += record.bytes if fetched is None else fetched


def _detail(record: Record) -> str | None:
    """What tells apart failures of one code that need different actions (see ``breakdown``)."""
    if record.error_code is ErrorCode.HTTP_ERROR and record.http_status is not None:
        return str(record.http_status)
    if record.error_code is ErrorCode.TOTAL_TIMEOUT:
        return "no response" if record.http_status is None else "in the body"
    return None
