"""HTTP policy as a sans-IO object: one :class:`Attempt` per attempt, no socket, no DNS.

Whatever moves the bytes (the blocking driver in :mod:`fetchpool.fetch.client`, a selector
loop, the in-library mock) drives the same attempt, so redirects, credentials, limits,
opt-outs, digests and speed checks are written once::

    attempt = Attempt(policy, job, clock=clock, sink=TempFileSink(tmp_dir))
    request = attempt.start()                  # a Request: target, proxy route, bytes
    ┌─▶ driver: guard.resolve(target) | proxy ─▶ connect ─▶ send request.data ─▶ head
    │   decision = attempt.on_head(head)
    ├── Follow(request, drain=…)   drain (or close), send the next request ─┘
    │   HandBack(drain=…)         drain (or close); record.moved_to names the next leg
    │   Refuse(error, drain=…)    drain (or close); attempt.fail(error)
    └── Accept                    attempt.on_body(chunk)… ─▶ attempt.finish() ─▶ Record

Timing is the driver's to enforce and the attempt's to decide: :meth:`Attempt.timeouts`
gives each wait its bound (the total deadline included, on the injected clock) and
:meth:`Attempt.wire_error` names what a broken wire means at that point (a watchdog that
cut the socket at the deadline is ``total_timeout``, a short body ``incomplete_body``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

from fetchpool import fsutil
from fetchpool.config import FetchConfig
from fetchpool.errors import DiskFullError, FetchError
from fetchpool.fetch.content import HEAD_BYTES, sniff_extension
from fetchpool.fetch.decoding import Decoder, decoder_for
from fetchpool.fetch.digests import expected_digest, new_hash
from fetchpool.fetch.h1 import WireError, request_bytes
from fetchpool.fetch.optout import agent_tokens, opt_out
from fetchpool.models import ErrorCode, Hop, Job, Record, Status
from fetchpool.plainurl import host_key, split_plain
from fetchpool.policies import parse_retry_after
from fetchpool.proxies import Proxy, ProxyPolicy, refusal
from fetchpool.redact import redact_text, redact_url

__all__ = [
    "ACCEPT",
    "CHUNK_SIZE",
    "ERROR_BODY_LIMIT",
    "HEADER_VALUE_LIMIT",
    "Accept",
    "Attempt",
    "BodySink",
    "Decision",
    "Follow",
    "HandBack",
    "Policy",
    "Refuse",
    "Request",
    "ResponseHead",
    "Target",
    "TempFileSink",
    "clean_header_value",
    "describe",
]

#: Bytes asked for per read: big enough for throughput, small enough to check limits often.
CHUNK_SIZE = 128 * 1024
#: Error and redirect bodies up to this size are read (and dropped) to keep the connection.
ERROR_BODY_LIMIT = 64 * 1024
#: A recorded header value (Content-Type) is cut to this many characters.
HEADER_VALUE_LIMIT = 1024

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_SCHEMES = ("http", "https")
_MESSAGE_LIMIT = 500
_T = TypeVar("_T")

#: Request headers by lowercased name: (name as sent, value), in sending order.
Headers = dict[str, tuple[str, str]]


class ResponseHead(Protocol):
    """What the attempt reads of an answer before its body: the head and its framing."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def length_remaining(self) -> int | None: ...
    def get_all(self, name: str) -> list[str]: ...


class Target(NamedTuple):
    """One hop's URL, parsed once: the host checked is the host connected to."""

    url: str
    scheme: str
    host: str
    port: int
    request_uri: str
    auth: str | None

    @property
    def origin(self) -> tuple[str, int]:
        return (self.host.lower(), self.port)

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


class Request(NamedTuple):
    """One request the attempt wants sent, with everything a driver needs to send it.

    Without ``proxy`` the driver resolves ``target`` and connects only to addresses the
    guard approves. With ``proxy`` (the route :mod:`fetchpool.proxies` chose) it connects
    to the proxy, the target's addresses still checked first unless the guard allows
    every address. ``data`` is the request's bytes as they go on that connection (absolute
    form to a plain proxy), ``proxy_headers`` what a CONNECT to the proxy carries.
    ``job`` is the item the attempt serves (a mock transport answers by it). A tuple, not a
    frozen dataclass: one is made per hop, on the path every request takes.
    """

    target: Target
    data: bytes
    job: Job
    header_budget: int
    proxy: Proxy | None = None
    proxy_headers: tuple[tuple[str, str], ...] = ()


class Follow(NamedTuple):
    """A redirect to follow: drain the body (or close when ``drain`` is False), then send
    ``request``."""

    request: Request
    drain: bool


class HandBack(NamedTuple):
    """A redirect to another host, handed back (``record.moved_to``): the attempt is over."""

    drain: bool


class Refuse(NamedTuple):
    """The answer is refused: drain (or close), then fail the attempt with ``error``."""

    error: FetchError
    drain: bool


class Accept(NamedTuple):
    """The body is wanted: feed it to :meth:`Attempt.on_body`, then :meth:`Attempt.finish`."""


Decision = Follow | HandBack | Refuse | Accept
#: The one Accept there is (it carries nothing).
ACCEPT = Accept()


class BodySink(Protocol):
    """Where an accepted body's bytes go (decoded): a temp file, for fetchpool's writers.
    ``sync``: the file is fsynced at :meth:`close` (``record.temp_synced``)."""

    sync: bool

    def open(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> str:
        """Finish the body; the path it is at."""
        ...

    def discard(self) -> None: ...


class TempFileSink:
    """A temp file in ``tmp_dir`` (same filesystem as the output), fsynced at close when
    ``sync``. A full disk raises :class:`DiskFullError` (it stops the run); other local
    errors fail the item (``io_error``)."""

    __slots__ = ("_fd", "_path", "_tmp_dir", "sync")

    def __init__(self, tmp_dir: Path, *, sync: bool = False) -> None:
        self._tmp_dir = tmp_dir
        self.sync = sync
        self._fd = -1
        self._path: str | None = None

    def open(self) -> None:
        self._fd, self._path = fsutil.create_temp_fd(self._tmp_dir)

    def write(self, data: bytes) -> None:
        try:
            fsutil.write_all(self._fd, data)
        except OSError as exc:
            raise _local_error(exc) from exc

    def close(self) -> str:
        path = self._path
        assert path is not None, "close() before open()"
        try:
            # fsynced here only when asked: otherwise the writer does it before naming the
            # file (a shard writer never needs this temp file on disk at all).
            if self.sync:
                _local_io(os.fsync, self._fd)
        except BaseException:
            self.discard()
            raise
        fd, self._fd = self._fd, -1
        try:
            _local_io(os.close, fd)  # the descriptor is released even when close fails
        except BaseException:
            self.discard()
            raise
        return path

    def discard(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        path, self._path = self._path, None
        fsutil.discard(path)


class Policy:
    """What every attempt of a fetcher shares, computed once from the configuration: the
    base request headers, the opt-out directives and agent tokens, the proxy routes."""

    __slots__ = ("agents", "base_headers", "config", "disallowed", "hand_back", "proxies")

    def __init__(self, config: FetchConfig, *, hand_back_redirects: bool = False) -> None:
        self.config = config
        self.hand_back = hand_back_redirects
        self.base_headers = self.initial_headers(None)
        self.disallowed = frozenset(config.disallowed_header_directives)
        self.agents = agent_tokens(config.user_agent, config.user_agent_token)
        self.proxies = ProxyPolicy.build(config.proxy, config.proxy_environment or ())

    def initial_headers(self, target: Target | None) -> Headers:
        headers: Headers = {}
        fields = [
            ("User-Agent", self.config.request_user_agent),
            ("Accept-Encoding", self.config.accept_encoding),
            ("Accept", "*/*"),
            *self.config.headers,
        ]
        auth = _basic_auth(target.auth if target is not None else None)
        if auth is not None:
            fields.append(("Authorization", auth))
        for name, value in fields:  # a later field replaces an earlier one of the same name
            headers.pop(name.lower(), None)
            headers[name.lower()] = (name, value)
        return headers

    def expected_digest(self, record: Record) -> bytes | None:
        """The digest the row's ``verify_hash_column`` gives; a row without a usable one
        fails ``bad_input`` before anything is fetched (it could not be verified)."""
        column = self.config.verify_hash_column
        if column is None:
            return None
        name = self.config.verify_hash_type or "sha256"
        value = record.meta.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise FetchError(
                ErrorCode.BAD_INPUT,
                f"no {name} in column {column!r} to verify the download against "
                "(--verify-hash-column): not fetched",
            )
        try:
            return expected_digest(value, name)
        except ValueError as exc:
            raise FetchError(
                ErrorCode.BAD_INPUT,
                f"column {column!r} (--verify-hash-column) {exc}: not fetched",
            ) from None


class _Throughput:
    """Minimum speed: bytes per second averaged over consecutive windows of ``window`` s."""

    def __init__(self, clock: Callable[[], float], min_speed: int, window: float) -> None:
        self._clock = clock
        self._min_speed = min_speed
        self._window = window
        self._since = clock()
        self._base = 0

    def update(self, total: int) -> None:
        if self._min_speed <= 0:
            return
        now = self._clock()
        elapsed = now - self._since
        if elapsed < self._window:
            return
        rate = (total - self._base) / elapsed
        if rate < self._min_speed:
            raise FetchError(
                ErrorCode.TOO_SLOW,
                f"{rate:.0f} B/s over {elapsed:.1f}s, below min_speed={self._min_speed} B/s",
            )
        self._since, self._base = now, total


class _Body:
    """The accepted body on its way to the sink: size caps, decoding, digests, speed."""

    __slots__ = ("decoder", "extra", "hasher", "head", "length", "meter", "received", "size")

    def __init__(self, policy: Policy, clock: Callable[[], float], length: int | None) -> None:
        config = policy.config
        self.length = length
        self.decoder: Decoder | None = None
        self.hasher = hashlib.sha256()
        self.extra = [(name, new_hash(name)) for name in config.digests]
        self.meter = _Throughput(clock, config.min_speed, config.min_speed_window)
        self.head = b""
        self.received = self.size = 0


class Attempt:
    """One attempt at ``job`` (redirects included), as a state machine with no I/O.

    ``clock`` is the monotonic clock of the total deadline and the speed check; ``sink``
    receives the accepted body. :attr:`record` is the result, final after :meth:`finish`,
    :meth:`fail` or a :class:`HandBack`.
    """

    __slots__ = (
        "_body",
        "_headers",
        "_leg_start",
        "_request",
        "_seen",
        "_target",
        "_url",
        "clock",
        "config",
        "deadline",
        "expected",
        "job",
        "policy",
        "record",
        "sink",
    )

    def __init__(
        self, policy: Policy, job: Job, *, clock: Callable[[], float], sink: BodySink
    ) -> None:
        self.policy = policy
        self.config = policy.config
        self.job = job
        self.clock = clock
        self.sink = sink
        self.record = record = Record.for_job(job)
        record.started = time.time()
        record.worker = threading.current_thread().name
        self.deadline = clock() + self.config.total_timeout
        self.expected: bytes | None = None
        self._seen: set[str] = set()
        self._leg_start = job.url
        self._url = job.url
        self._target: Target | None = None
        self._headers: Headers = policy.base_headers
        self._request: Request | None = None
        self._body: _Body | None = None

    # -- requests -----------------------------------------------------------------------------

    def start(self) -> Request:
        """The first request (or a :class:`FetchError` for an item that cannot be fetched)."""
        if self.config.verify_hash_column is not None:
            self.expected = self.policy.expected_digest(self.record)
        hop = self.job.hop
        if hop is None:
            target = parse_target(self._url)
            self._seen = {self._url}
            if target.auth:
                self._headers = self.policy.initial_headers(target)
        else:  # a leg after a redirect to another host: credentials were dropped then
            self._url = self._leg_start = hop.url
            target = parse_target(hop.url)
            self._headers = _without_credentials(self.policy.base_headers)
            self._seen = set(hop.seen)  # the hop's URL among them
            self.record.redirects = list(hop.redirects)
        return self._request_for(target)

    def _request_for(self, target: Target) -> Request:
        self._target = target
        policy = self.policy
        proxy = policy.proxies.route(target.scheme, target.host) if policy.proxies.active else None
        budget = self.config.max_header_bytes
        if proxy is None:
            data = request_bytes(target.request_uri, target.host_header(), self._headers)
            request = Request(target, data, self.job, budget)
        else:
            sent = (("Proxy-Authorization", proxy.authorization),) if proxy.authorization else ()
            if target.scheme == "https":  # inside a tunnel: as to the server itself
                data = request_bytes(target.request_uri, target.host_header(), self._headers)
            else:  # a plain proxy is asked for the whole URL (RFC 9112 3.2.2)
                uri = f"{target.scheme}://{target.host_header()}{target.request_uri}"
                fields = {**self._headers, **{n.lower(): (n, v) for n, v in sent}}
                data = request_bytes(uri, target.host_header(), fields)
            request = Request(target, data, self.job, budget, proxy, sent)
        self._request = request
        return request

    def read_timeout(self) -> float:
        """The bound of the next read: ``read_timeout`` cut to the time left;
        ``total_timeout`` when none is left."""
        left = self.deadline - self.clock()
        if left <= 0:
            raise FetchError(ErrorCode.TOTAL_TIMEOUT, self._total_timeout_message())
        return min(self.config.read_timeout, left)

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) bounds for the next wait: the configured ones, cut to the time
        left; ``total_timeout`` when none is left."""
        left = self.deadline - self.clock()
        if left <= 0:
            raise FetchError(ErrorCode.TOTAL_TIMEOUT, self._total_timeout_message())
        config = self.config
        return min(config.connect_timeout, left), min(config.read_timeout, left)

    def expired(self, *, cut_off: bool = False) -> bool:
        """Past the deadline (``cut_off``: the driver's watchdog already ended the wire)."""
        return cut_off or self.deadline - self.clock() <= 0

    def wire_error(self, exc: BaseException, *, cut_off: bool = False) -> FetchError:
        """What a transport or socket error means for the item."""
        if self.expired(cut_off=cut_off) and (
            isinstance(exc, WireError) or not isinstance(exc, FetchError)
        ):
            # Past the deadline, whatever broke (a timeout, or a socket the watchdog shut
            # down) broke because time ran out.
            return FetchError(ErrorCode.TOTAL_TIMEOUT, self._total_timeout_message())
        if isinstance(exc, FetchError):
            return FetchError(exc.code, redact_text(exc.message), http_status=exc.http_status)
        if isinstance(exc, TimeoutError):
            return FetchError(ErrorCode.READ_TIMEOUT, f"read timed out: {describe(exc)}")
        return FetchError(ErrorCode.PROTOCOL_ERROR, f"protocol error: {describe(exc)}")

    def _total_timeout_message(self) -> str:
        return f"attempt exceeded total_timeout={self.config.total_timeout:g}s"

    # -- the head -----------------------------------------------------------------------------

    def on_head(self, response: ResponseHead) -> Decision:
        """Decide from the head: follow, hand back, refuse or accept the body."""
        request = self._request
        assert request is not None and self._target is not None, "on_head() before start()"
        proxy = request.proxy
        if proxy is not None and response.status == 407:
            # Only a proxy says this (a tunnel's 407 fails in the wire, at CONNECT).
            what = f"GET {request.target.scheme}://{request.target.host_header()}"
            sent = request.proxy_headers
            code, message = refusal(proxy.shown, 407, response.reason, what, sent)
            return Refuse(FetchError(code, message), _small(response))
        location = _redirect_location(response)
        if location is None:
            self.record.final_url = redact_url(self._url)
            return self._receive(response)
        try:
            return self._redirect(response, location)
        except FetchError as exc:
            return Refuse(exc, _small(response))

    def _redirect(self, response: ResponseHead, location: str) -> Decision:
        target = self._target
        assert target is not None
        record = self.record
        next_url = next_hop(target, location, record)
        max_redirects = self.config.max_redirects
        if next_url in self._seen or len(record.redirects) > max_redirects:
            raise FetchError(
                ErrorCode.TOO_MANY_REDIRECTS,
                f"{len(record.redirects)} redirects"
                + (" (loop)" if next_url in self._seen else "")
                + f", max_redirects={max_redirects}",
                http_status=response.status,
            )
        self._seen.add(next_url)
        if self.policy.hand_back and host_key(next_url) != host_key(self._leg_start):
            record.moved_to = Hop(next_url, tuple(record.redirects), tuple(self._seen))
            return HandBack(_small(response))
        next_target = parse_target(next_url)
        if next_target.origin != target.origin:
            self._headers = _without_credentials(self._headers)
        self._url = next_url
        return Follow(self._request_for(next_target), _small(response))

    def _receive(self, response: ResponseHead) -> Decision:
        record, config = self.record, self.config
        record.http_status = response.status
        record.content_type = clean_header_value(response.headers.get("content-type"))
        if not 200 <= response.status < 300:
            if response.status in (429, 503):
                retry_after = response.headers.get("retry-after")
                record.retry_after = parse_retry_after(retry_after, time.time())
            shown = clean_header_value(response.reason)
            reason = f" {shown}" if shown else ""
            error = FetchError(
                ErrorCode.HTTP_ERROR, f"HTTP {response.status}{reason}", http_status=response.status
            )
            return Refuse(error, _small(response))
        if self.policy.disallowed:
            opted = opt_out(response.get_all, self.policy.disallowed, self.policy.agents)
            if opted is not None:
                message = (
                    f"the server opts out with {opted}: not saved (--disallowed-header-directives)"
                )
                error = FetchError(ErrorCode.OPTED_OUT, message, http_status=response.status)
                return Refuse(error, _small(response))
        if not config.accepts(record.content_type):  # --accept: decided from the head
            shown = record.content_type or "none"
            message = f"Content-Type {shown} is not in --accept {','.join(config.accept)}"
            error = FetchError(
                ErrorCode.UNWANTED_CONTENT_TYPE, message, http_status=response.status
            )
            return Refuse(error, False)  # the body may be large and is not wanted: no reuse
        try:
            length = self._declared_length(response)
            body = _Body(self.policy, self.clock, length)
            body.decoder = decoder_for(
                response.headers.get("content-encoding"), record.content_type
            )
        except FetchError as exc:
            return Refuse(exc, False)
        self.sink.open()
        self._body = body
        return ACCEPT

    def _declared_length(self, response: ResponseHead) -> int | None:
        headers = response.headers
        if "content-length" in headers and "transfer-encoding" in headers:
            # RFC 9112 6.3: a sender must not send both; it is how requests get smuggled.
            raise FetchError(
                ErrorCode.PROTOCOL_ERROR, "both Content-Length and Transfer-Encoding sent"
            )
        length = response.length_remaining
        if length is not None and length > self.config.max_bytes:
            raise FetchError(
                ErrorCode.TOO_LARGE,
                f"Content-Length {length} exceeds max_bytes={self.config.max_bytes}",
            )
        return length

    # -- the body -----------------------------------------------------------------------------

    def on_body(self, chunk: bytes) -> None:
        """Take the next piece of the accepted body (as received, before decoding).

        ``max_bytes`` bounds both the bytes received and the bytes written; a decoder hands
        out at most ``CHUNK_SIZE`` bytes at a time, so memory stays flat whatever the ratio.
        """
        body = self._body
        assert body is not None, "on_body() without Accept"
        limit = self.config.max_bytes
        body.received += len(chunk)
        if body.received > limit:
            raise FetchError(ErrorCode.TOO_LARGE, f"body exceeds max_bytes={limit}")
        decoder = body.decoder
        if decoder is not None:
            decoder.feed(chunk)
            chunk = decoder.read(CHUNK_SIZE)
        while chunk:
            body.size += len(chunk)
            if decoder is not None:
                if body.size > limit:
                    raise FetchError(ErrorCode.TOO_LARGE, f"decoded body exceeds max_bytes={limit}")
                decoder.check_ratio(body.size, body.received)
            self.sink.write(chunk)
            body.hasher.update(chunk)
            for _, more in body.extra:
                more.update(chunk)
            if len(body.head) < HEAD_BYTES:
                body.head += chunk[: HEAD_BYTES - len(body.head)]
            chunk = decoder.read(CHUNK_SIZE) if decoder is not None else b""
        body.meter.update(body.received)

    def body_error(self, exc: BaseException, *, cut_off: bool = False) -> FetchError:
        """What a wire error while the body arrives means: a connection that broke before
        the announced length is a short body (retried)."""
        error = self.wire_error(exc, cut_off=cut_off)
        body = self._body
        if error.code is ErrorCode.PROTOCOL_ERROR and body is not None and body.length is not None:
            return FetchError(
                ErrorCode.INCOMPLETE_BODY,
                f"body ended after {body.received} of {body.length} bytes: {describe(exc)}",
            )
        return error

    def finish(self, *, cut_off: bool = False) -> Record:
        """The body ended: check it whole (length, decoding, digest) and fill the record."""
        body, record = self._body, self.record
        assert body is not None, "finish() without Accept"
        if cut_off:  # the watchdog ended the body: the end of the stream is not the real end
            raise FetchError(ErrorCode.TOTAL_TIMEOUT, self._total_timeout_message())
        if body.length is not None and body.received < body.length:
            raise FetchError(
                ErrorCode.INCOMPLETE_BODY, f"got {body.received} of {body.length} bytes"
            )
        if body.decoder is not None:
            body.decoder.finish()
        digests = {"sha256": body.hasher.hexdigest()}
        digests.update((name, more.hexdigest()) for name, more in body.extra)
        if self.expected is not None:
            self._verify(digests, self.expected)
        record.temp_path = self.sink.close()
        record.temp_synced = self.sink.sync
        record.bytes = record.fetched_bytes = body.size  # as decoded; the CPU stage may change
        record.sha256 = record.fetched_sha256 = digests["sha256"]  # bytes and sha256, never
        record.md5 = digests.get("md5")  # these: they describe what was downloaded
        record.sha512 = digests.get("sha512")
        target = self._target
        assert target is not None
        record.extension = sniff_extension(record.content_type, body.head, target.url)
        record.status = Status.OK
        return record

    def _verify(self, digests: dict[str, str], expected: bytes) -> None:
        name = self.config.verify_hash_type or "sha256"
        actual = digests[name]
        if bytes.fromhex(actual) != expected:
            raise FetchError(
                ErrorCode.HASH_MISMATCH,
                f"{name} of the downloaded bytes is {actual}, the input's "
                f"{self.config.verify_hash_column!r} says {expected.hex()}: not saved",
            )

    # -- the end ------------------------------------------------------------------------------

    def fail(self, exc: FetchError) -> Record:
        """End the attempt failed with ``exc`` (any temp file removed)."""
        self.discard()
        record = self.record
        message = redact_text(exc.message)
        if exc.code is ErrorCode.TOTAL_TIMEOUT:  # two cases that need different actions
            head = record.http_status is not None or exc.http_status is not None
            message += " while the body was arriving" if head else " before the server answered"
        record.fail(exc.code, message)
        if exc.http_status is not None:
            record.http_status = exc.http_status
        record.status = Status.FAILED
        record.temp_path = None
        return record

    def discard(self) -> None:
        """Drop whatever the sink holds (an exception that is not the item's ends it)."""
        if self._body is not None and self.record.temp_path is None:
            self.sink.discard()


# -- helpers ----------------------------------------------------------------------------------


def _small(response: ResponseHead) -> bool:
    """Whether an unwanted body is small enough to read (and drop) to keep the connection."""
    length = response.length_remaining
    return length is None or length <= ERROR_BODY_LIMIT


def describe(exc: BaseException) -> str:
    text = redact_text(str(exc) or type(exc).__name__)
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


_SPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
#: Kept as they are when a redirect target is percent-encoded: printable ASCII but space.
_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def clean_header_value(value: str | None) -> str | None:
    """A response header value fit to record: each run of control characters (NUL, CR, ESC,
    C1 controls) becomes one space, as RFC 9110 (5.5) allows for NUL, CR and LF; cut to
    :data:`HEADER_VALUE_LIMIT` characters. The journal, the CSV manifest, logs and
    terminals then never receive a server's control bytes."""
    if value is None:
        return None
    if value.isprintable() and len(value) <= HEADER_VALUE_LIMIT:
        return value
    return _CONTROL.sub(" ", value[:HEADER_VALUE_LIMIT]).strip()


def next_hop(target: Target, location: str, record: Record) -> str:
    """The URL a Location leads to, checked like an input URL; refused otherwise.

    The header's bytes are read as UTF-8 (latin-1 when they are not UTF-8), and what
    HTTP cannot carry is percent-encoded outside the host, as browsers and curl do; a
    Unicode host becomes IDNA. Then the URL must pass the input URLs' validation
    (:func:`fetchpool.inputs.urls.validate_url`: scheme, length, characters, port range,
    no backslash in the authority), so a hop can reach nothing an input URL could not.
    """
    from fetchpool.inputs.urls import MAX_URL_LENGTH, InvalidURLError, preview, validate_url

    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in location):
        raise FetchError(ErrorCode.REDIRECT_REFUSED, "redirect Location has control bytes")
    text, charset = _header_text(location.strip())
    try:
        joined = _encode_outside_host(urljoin(target.url, text), charset)
        scheme = urlsplit(joined).scheme.lower()
    except ValueError as exc:  # e.g. "//[::1": an unbalanced bracket in the host
        raise FetchError(
            ErrorCode.REDIRECT_REFUSED, f"redirect Location cannot be parsed: {describe(exc)}"
        ) from exc
    if scheme not in _SCHEMES:
        record.redirects.append(redact_url(joined[:MAX_URL_LENGTH]))
        raise FetchError(
            ErrorCode.REDIRECT_REFUSED, f"redirect to a {scheme or 'relative'}: URL refused"
        )
    if target.scheme == "https" and scheme == "http":
        record.redirects.append(redact_url(joined[:MAX_URL_LENGTH]))
        raise FetchError(
            ErrorCode.REDIRECT_REFUSED,
            f"https to http downgrade refused: {preview(joined)}",
        )
    try:
        next_url = validate_url(joined)
    except InvalidURLError as exc:
        # Not recorded in the chain: an invalid URL (a backslash, a bad port) would be
        # recorded as something else than it is; the message shows it, redacted.
        raise FetchError(
            ErrorCode.REDIRECT_REFUSED, f"redirect to an invalid URL refused: {exc.message}"
        ) from None
    record.redirects.append(redact_url(next_url))  # as requested: encoded, IDNA host
    return next_url


def _header_text(value: str) -> tuple[str, str]:
    """A header value (its bytes as latin-1, as the wire layer reads them) as text: UTF-8 when
    its bytes are UTF-8, else latin-1. Returns (text, that charset)."""
    if value.isascii():
        return value, "utf-8"
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return value, "latin-1"


def _encode_outside_host(url: str, charset: str) -> str:
    """``url`` with spaces and non-ASCII characters percent-encoded (in ``charset``, so the
    server's own bytes come back) everywhere but the host, which stays for IDNA."""
    if url.isascii() and " " not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return quote(url, safe=_URL_SAFE, encoding=charset)
    end = min([rest.find(c) for c in "/?#" if c in rest] or [len(rest)])
    userinfo, at, hostport = rest[:end].rpartition("@")
    userinfo = quote(userinfo, safe=_URL_SAFE, encoding=charset)
    tail = quote(rest[end:], safe=_URL_SAFE, encoding=charset)
    return f"{scheme}://{userinfo}{at}{hostport}{tail}"


def parse_target(url: str) -> Target:
    """``url`` split for a request; ``invalid_url``/``unsupported_scheme`` when it cannot be."""
    plain = split_plain(url)
    if plain is not None:  # the common shape, split as parse_url would
        default = 443 if plain.scheme == "https" else 80
        return Target(url, plain.scheme, plain.host, plain.port or default, plain.request_uri, None)
    if _SPACE_OR_CONTROL.search(url):
        raise FetchError(ErrorCode.INVALID_URL, "URL contains spaces or control bytes")
    from urllib3.exceptions import LocationValueError  # the general parser, for the rest
    from urllib3.util import parse_url

    try:
        parsed = parse_url(url)
    except LocationValueError as exc:
        raise FetchError(ErrorCode.INVALID_URL, f"cannot parse URL: {describe(exc)}") from exc
    scheme = (parsed.scheme or "").lower()
    if scheme not in _SCHEMES:
        raise FetchError(ErrorCode.UNSUPPORTED_SCHEME, f"scheme {scheme or '(none)'!r} refused")
    if not parsed.host:
        raise FetchError(ErrorCode.INVALID_URL, "URL has no host")
    port = parsed.port or (443 if scheme == "https" else 80)
    return Target(url, scheme, parsed.host, port, parsed.request_uri, parsed.auth)


def _redirect_location(response: ResponseHead) -> str | None:
    if response.status not in _REDIRECT_STATUSES:
        return None
    location = response.headers.get("location")
    return location if location else None


def _basic_auth(userinfo: str | None) -> str | None:
    if not userinfo:
        return None
    user, _, password = userinfo.partition(":")
    token = f"{unquote(user)}:{unquote(password)}".encode()
    return "Basic " + base64.b64encode(token).decode("ascii")


def _without_credentials(headers: Headers) -> Headers:
    return {key: field for key, field in headers.items() if key not in _CREDENTIAL_HEADERS}


def _local_io(operation: Callable[..., _T], *args: object) -> _T:
    """Run a local file operation; a full disk stops the run, other errors fail the item."""
    try:
        return operation(*args)
    except OSError as exc:
        raise _local_error(exc) from exc


def _local_error(exc: OSError) -> DiskFullError | FetchError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left writing to {exc.filename or 'temp'}")
    return FetchError(ErrorCode.IO_ERROR, f"writing the temp file: {exc.strerror}")
