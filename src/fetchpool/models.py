"""Plain values that flow through the pipeline.

Bottom layer: imports nothing else from the package.

    input reader ──Job / BadInput──▶ scheduler ──Job──▶ fetcher ──Record(temp_path)──▶
    processor ──Record(temp_path)──▶ writer ──Record(path)──▶ journal ──▶ report

A :class:`Record` is created by the fetch stage and completed by the later stages; it is the
one row per input item that the state journal stores and the manifest exports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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
