"""The HTTP fetcher: one attempt per call, behind the address guard.

::

    fetch(job)
      └─ for each hop (≤ max_redirects):  parse URL ─▶ guard.resolve (every address checked)
           ─▶ pooled connection pinned to the checked address (fetch.http11) ─▶ GET
           ─▶ 3xx: drain, Location checked like an input URL, next hop │ non-2xx: HTTP_ERROR
           │ 2xx: stream into a temp file, decoded per Content-Encoding (fetch.decoding;
           │      sha256, size caps, deadline, min speed) ─▶ Record

Failures become a failed :class:`Record` with a stable :class:`ErrorCode`; the scheduler decides
about retries (``fetchpool.policies``). Only run-level problems raise: a full disk
(:class:`DiskFullError`) or an unusable temp folder (:class:`OutputError`).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urljoin, urlsplit

from fetchpool import fsutil
from fetchpool.config import FetchConfig
from fetchpool.errors import DiskFullError, FetchError
from fetchpool.fetch.content import HEAD_BYTES, sniff_extension
from fetchpool.fetch.decoding import Decoder, decoder_for
from fetchpool.fetch.digests import expected_digest, new_hash
from fetchpool.fetch.guard import AddressGuard
from fetchpool.fetch.h1 import request_bytes
from fetchpool.fetch.http11 import ConnectionPool, Key, Response, Via, WireError
from fetchpool.fetch.optout import agent_tokens, opt_out
from fetchpool.fetch.transport import Watch, Watchdog
from fetchpool.models import ErrorCode, Hop, Job, Record, Status
from fetchpool.plainurl import host_key, split_plain
from fetchpool.policies import parse_retry_after
from fetchpool.proxies import Proxy, ProxyPolicy, refusal
from fetchpool.redact import redact_text, redact_url

__all__ = [
    "CHUNK_SIZE",
    "ERROR_BODY_LIMIT",
    "HEADER_VALUE_LIMIT",
    "HttpFetcher",
    "clean_header_value",
]

#: Bytes asked for per read: big enough for throughput, small enough to check limits often.
CHUNK_SIZE = 128 * 1024
#: Error and redirect bodies up to this size are read (and dropped) to keep the connection.
ERROR_BODY_LIMIT = 64 * 1024
#: Pools kept alive at once (one per host and address); older ones are closed first.
NUM_POOLS = 1024
#: File descriptors left for everything but fetches: the journal (db, WAL, shm, lock), the
#: run's directory fsyncs, logs, stdio and the image stage's pipes.
FD_RESERVE = 64

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_SCHEMES = ("http", "https")
_MESSAGE_LIMIT = 500
#: A recorded header value (Content-Type) is cut to this many characters.
HEADER_VALUE_LIMIT = 1024
_T = TypeVar("_T")


@dataclass(slots=True)
class _Attempt:
    """The deadline of one attempt (all hops included), on the injected monotonic clock."""

    deadline: float
    clock: Callable[[], float]
    watch: Watch
    #: The digest the input row expects of the body (``--verify-hash-column``), raw.
    expected: bytes | None = None

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def expired(self) -> bool:
        return self.watch.expired or self.remaining() <= 0

    def ensure_time(self, total_timeout: float) -> float:
        left = self.remaining()
        if left <= 0:
            raise FetchError(
                ErrorCode.TOTAL_TIMEOUT, f"attempt exceeded total_timeout={total_timeout:g}s"
            )
        return left


@dataclass(frozen=True, slots=True)
class _Target:
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


#: Request headers by lowercased name: (name as sent, value), in sending order.
_Headers = dict[str, tuple[str, str]]


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


class HttpFetcher:
    """:class:`fetchpool.stages.Fetcher` over HTTP(S); safe to share between threads.

    ``tmp_dir`` receives the temp files (same filesystem as the output). ``guard`` defaults to
    one built from ``config``; ``clock`` is the monotonic clock used for deadlines and speed.
    ``sync_temp``: fsync each body before closing it (``record.temp_synced``), for a writer
    that names the temp file as it is: one fsync on the open file instead of the writer's
    open, fsync, close later. ``hand_back_redirects``: stop at a redirect to another host
    and return the record with ``moved_to`` set (:class:`~fetchpool.models.Hop`), for a
    scheduler that keeps per-host limits; the job's ``hop`` then resumes there.
    """

    def __init__(
        self,
        config: FetchConfig,
        tmp_dir: Path,
        *,
        guard: AddressGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
        sync_temp: bool = False,
        hand_back_redirects: bool = False,
    ) -> None:
        self._config = config
        self._sync_temp = sync_temp
        self._hand_back = hand_back_redirects
        self._tmp_dir = Path(tmp_dir)
        self._guard = guard or AddressGuard(config.allow_private_networks, config.allow_cidrs)
        self._clock = clock
        self._watchdog = Watchdog(clock)
        concurrent, pools = fd_budget(config.threads, config.per_host)
        # More fetches than descriptors would fail items with EMFILE (RELIABILITY.md case
        # 42): the extra threads wait here instead, before their attempt's clock starts.
        self._slots = threading.BoundedSemaphore(concurrent)
        self._pool = ConnectionPool(
            per_host=config.per_host,
            num_pools=pools,
            insecure=config.insecure,
            shared_idle=concurrent,  # one proxy connection per fetch (fetchpool.proxies)
            ca_data=config.ca_pem[1] if config.ca_pem is not None else None,
            ca_directory=config.ca_directory,
        )
        self._base_headers = self._initial_headers(None)
        self._disallowed = frozenset(config.disallowed_header_directives)
        self._agents = agent_tokens(config.user_agent, config.user_agent_token)
        self._proxies = ProxyPolicy.build(config.proxy, config.proxy_environment or ())

    def fetch(self, job: Job) -> Record:
        """Make one attempt at ``job.url`` (redirects followed); never raises for the item."""
        with self._slots:
            record = Record.for_job(job)
            record.started = time.time()
            record.worker = threading.current_thread().name
            deadline = self._clock() + self._config.total_timeout
            try:
                expected = self._expected(record)
                with self._watchdog.watch(deadline) as watch:
                    attempt = _Attempt(deadline, self._clock, watch, expected)
                    self._follow(record, attempt, job.hop)
            except FetchError as exc:
                _fail(record, exc)
            finally:
                record.finished = time.time()
            return record

    def _expected(self, record: Record) -> bytes | None:
        """The digest the row's ``verify_hash_column`` gives; a row without a usable one
        fails ``bad_input`` before anything is fetched (it could not be verified)."""
        column = self._config.verify_hash_column
        if column is None:
            return None
        name = self._config.verify_hash_type or "sha256"
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

    def close(self) -> None:
        """Close every pooled connection and stop the deadline watchdog."""
        self._watchdog.close()
        self._pool.clear()

    # -- hops ---------------------------------------------------------------------------------

    def _follow(self, record: Record, attempt: _Attempt, hop: Hop | None) -> None:
        if hop is None:
            url = record.url
            target = _parse_target(url)
            headers = self._initial_headers(target) if target.auth else self._base_headers
            seen = {url}
        else:  # a leg after a redirect to another host: credentials were dropped then
            url = hop.url
            target = _parse_target(url)
            headers = _without_credentials(self._base_headers)
            seen = set(hop.seen)
            record.redirects = list(hop.redirects)
        leg_start = url  # the URL the scheduler queued this attempt under
        while True:
            response = self._open(target, headers, attempt)
            location = _redirect_location(response)
            if location is None:
                record.final_url = redact_url(url)
                self._receive(response, record, target, attempt)
                return
            self._discard_body(response, attempt)
            next_url = self._next_hop(target, location, record)
            if next_url in seen or len(record.redirects) > self._config.max_redirects:
                raise FetchError(
                    ErrorCode.TOO_MANY_REDIRECTS,
                    f"{len(record.redirects)} redirects"
                    + (" (loop)" if next_url in seen else "")
                    + f", max_redirects={self._config.max_redirects}",
                    http_status=response.status,
                )
            seen.add(next_url)
            if self._hand_back and host_key(next_url) != host_key(leg_start):
                record.moved_to = Hop(next_url, tuple(record.redirects), tuple(seen))
                return
            next_target = _parse_target(next_url)
            if next_target.origin != target.origin:
                headers = _without_credentials(headers)
            url, target = next_url, next_target

    def _initial_headers(self, target: _Target | None) -> _Headers:
        headers: _Headers = {}
        fields = [
            ("User-Agent", self._config.request_user_agent),
            ("Accept-Encoding", self._config.accept_encoding),
            ("Accept", "*/*"),
            *self._config.headers,
        ]
        auth = _basic_auth(target.auth if target is not None else None)
        if auth is not None:
            fields.append(("Authorization", auth))
        for name, value in fields:  # a later field replaces an earlier one of the same name
            headers.pop(name.lower(), None)
            headers[name.lower()] = (name, value)
        return headers

    def _next_hop(self, target: _Target, location: str, record: Record) -> str:
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
                ErrorCode.REDIRECT_REFUSED, f"redirect Location cannot be parsed: {_describe(exc)}"
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

    # -- one request --------------------------------------------------------------------------

    def _open(self, target: _Target, headers: _Headers, attempt: _Attempt) -> Response:
        proxy = self._proxies.route(target.scheme, target.host) if self._proxies.active else None
        if proxy is not None:
            return self._open_via(proxy, target, headers, attempt)
        addresses = self._guard.resolve(target.host, target.port)
        last: FetchError | None = None
        for address in addresses:
            try:
                return self._request(target, str(address), headers, attempt)
            except FetchError as exc:
                # Another address of the same (checked) name may work: dual-stack hosts with
                # a broken IPv6 route are common. Anything past connecting is final.
                if exc.code is not ErrorCode.CONNECT_ERROR:
                    raise
                last = exc
        assert last is not None  # resolve() never returns an empty list
        raise last

    def _open_via(
        self, proxy: Proxy, target: _Target, headers: _Headers, attempt: _Attempt
    ) -> Response:
        """The request through ``proxy`` (docs/security.md, "Proxies"). The guard checks
        the target as if connecting to it, before anything is sent; the proxy is sent the
        name. With every address allowed there is nothing to check, and the name is not
        resolved here at all (as curl: the proxy may be the only one that can)."""
        if not self._guard.allow_private_networks:
            self._guard.resolve(target.host, target.port)
        try:
            addresses = self._guard.lookup(proxy.host, proxy.port)  # the user's choice
        except FetchError as exc:
            raise FetchError(exc.code, f"proxy {proxy.shown}: {exc.message}") from exc
        sent = (("Proxy-Authorization", proxy.authorization),) if proxy.authorization else ()
        last: FetchError | None = None
        for address in addresses:
            via = Via(proxy.shown, str(address), proxy.port, sent)
            try:
                response = self._request(target, "", headers, attempt, via)
            except FetchError as exc:
                if exc.code is not ErrorCode.CONNECT_ERROR:
                    raise
                last = exc
                continue
            if response.status == 407:  # only a proxy says this (a tunnel's 407 fails above)
                self._discard_body(response, attempt)
                what = f"GET {target.scheme}://{target.host_header()}"
                code, message = refusal(proxy.shown, 407, response.reason, what, sent)
                raise FetchError(code, message)
            return response
        assert last is not None  # lookup() never returns an empty list
        raise last

    def _request(
        self,
        target: _Target,
        ip: str,
        headers: _Headers,
        attempt: _Attempt,
        via: Via | None = None,
    ) -> Response:
        left = attempt.ensure_time(self._config.total_timeout)
        key: Key = (target.scheme, target.host.lower(), target.port, ip)
        absolute = False
        if via is not None:
            route = f"via {via.address}:{via.port}"
            if target.scheme == "https":  # a tunnel is one target's
                key = (target.scheme, target.host.lower(), target.port, route)
            else:  # a plain connection to the proxy carries requests for any target
                key, absolute = ("http", "", 0, route), True
                headers = {**headers, **{n.lower(): (n, v) for n, v in via.headers}}
        try:
            return self._pool.request(
                key,
                _request_bytes(target, headers, absolute=absolute),
                connect_timeout=min(self._config.connect_timeout, left),
                read_timeout=min(self._config.read_timeout, left),
                header_budget=self._config.max_header_bytes,
                via=via,
            )
        except (WireError, OSError, ValueError) as exc:
            raise self._translate(exc, attempt) from exc

    # -- the response -------------------------------------------------------------------------

    def _receive(
        self, response: Response, record: Record, target: _Target, attempt: _Attempt
    ) -> None:
        record.http_status = response.status
        record.content_type = clean_header_value(response.headers.get("content-type"))
        if not 200 <= response.status < 300:
            self._refuse_status(response, record, attempt)
        if self._disallowed:
            self._check_opt_out(response, attempt)
        if not self._config.accepts(record.content_type):  # --accept: decided from the head
            response.close()  # the body may be large and is not wanted: no reuse
            shown = record.content_type or "none"
            raise FetchError(
                ErrorCode.UNWANTED_CONTENT_TYPE,
                f"Content-Type {shown} is not in --accept {','.join(self._config.accept)}",
                http_status=response.status,
            )
        try:
            length = self._declared_length(response)
            decoder = decoder_for(response.headers.get("content-encoding"), record.content_type)
            self._save_body(response, record, target, length, attempt, decoder=decoder)
        except BaseException:
            response.close()
            raise
        response.release()

    def _refuse_status(self, response: Response, record: Record, attempt: _Attempt) -> None:
        if response.status in (429, 503):
            record.retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        self._discard_body(response, attempt)
        shown = clean_header_value(response.reason)
        reason = f" {shown}" if shown else ""
        raise FetchError(
            ErrorCode.HTTP_ERROR, f"HTTP {response.status}{reason}", http_status=response.status
        )

    def _check_opt_out(self, response: Response, attempt: _Attempt) -> None:
        """Refuse a response whose head opts out (X-Robots-Tag, tdm-reservation), before any
        byte of its body is read; the body is dropped as an error page's is."""
        reason = opt_out(response.get_all, self._disallowed, self._agents)
        if reason is None:
            return
        self._discard_body(response, attempt)
        raise FetchError(
            ErrorCode.OPTED_OUT,
            f"the server opts out with {reason}: not saved (--disallowed-header-directives)",
            http_status=response.status,
        )

    def _declared_length(self, response: Response) -> int | None:
        headers = response.headers
        if "content-length" in headers and "transfer-encoding" in headers:
            # RFC 9112 6.3: a sender must not send both; it is how requests get smuggled.
            raise FetchError(
                ErrorCode.PROTOCOL_ERROR, "both Content-Length and Transfer-Encoding sent"
            )
        length = response.length_remaining
        if length is not None and length > self._config.max_bytes:
            raise FetchError(
                ErrorCode.TOO_LARGE,
                f"Content-Length {length} exceeds max_bytes={self._config.max_bytes}",
            )
        return length

    def _save_body(
        self,
        response: Response,
        record: Record,
        target: _Target,
        length: int | None,
        attempt: _Attempt,
        *,
        decoder: Decoder | None = None,
    ) -> None:
        fd, path = fsutil.create_temp_fd(self._tmp_dir)
        try:
            digests, size, head = self._stream(response, fd, length, attempt, decoder=decoder)
            if attempt.expected is not None:
                self._verify(digests, attempt.expected)
            # fsynced here only when asked: otherwise the writer does it before naming the
            # file (a shard writer never needs this temp file on disk at all).
            if self._sync_temp:
                _local_io(os.fsync, fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            fsutil.discard(path)
            raise
        try:
            _local_io(os.close, fd)  # the descriptor is released even when close fails
        except BaseException:
            fsutil.discard(path)
            raise
        record.temp_synced = self._sync_temp
        record.temp_path = path
        record.bytes = record.fetched_bytes = size  # as decoded; the CPU stage may change
        record.sha256 = record.fetched_sha256 = digests["sha256"]  # bytes and sha256, never
        record.md5 = digests.get("md5")  # these: they describe what was downloaded
        record.sha512 = digests.get("sha512")
        record.extension = sniff_extension(record.content_type, head, target.url)
        record.status = Status.OK

    def _stream(
        self,
        response: Response,
        fd: int,
        length: int | None,
        attempt: _Attempt,
        *,
        decoder: Decoder | None = None,
    ) -> tuple[dict[str, str], int, bytes]:
        """Write the body (decoded when ``decoder``) to ``fd``: (hex digests by algorithm,
        sha256 and the config's ``digests``; size; head).

        ``max_bytes`` bounds both the bytes received and the bytes written; a decoder hands
        out at most ``CHUNK_SIZE`` bytes at a time, so memory stays flat whatever the ratio.
        """
        hasher = hashlib.sha256()
        extra = [(name, new_hash(name)) for name in self._config.digests]
        meter = _Throughput(self._clock, self._config.min_speed, self._config.min_speed_window)
        limit = self._config.max_bytes
        head = b""
        received = size = 0
        while chunk := self._read_chunk(response, attempt, length, received):
            received += len(chunk)
            if received > limit:
                raise FetchError(ErrorCode.TOO_LARGE, f"body exceeds max_bytes={limit}")
            if decoder is not None:
                decoder.feed(chunk)
                chunk = decoder.read(CHUNK_SIZE)
            while chunk:
                size += len(chunk)
                if decoder is not None:
                    if size > limit:
                        raise FetchError(
                            ErrorCode.TOO_LARGE, f"decoded body exceeds max_bytes={limit}"
                        )
                    decoder.check_ratio(size, received)
                _local_io(fsutil.write_all, fd, chunk)
                hasher.update(chunk)
                for _, more in extra:
                    more.update(chunk)
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                chunk = decoder.read(CHUNK_SIZE) if decoder is not None else b""
            meter.update(received)
        if attempt.watch.expired:  # the watchdog ended the body: EOF is not the real end
            raise FetchError(ErrorCode.TOTAL_TIMEOUT, self._total_timeout_message())
        if length is not None and received < length:
            raise FetchError(ErrorCode.INCOMPLETE_BODY, f"got {received} of {length} bytes")
        if decoder is not None:
            decoder.finish()
        digests = {"sha256": hasher.hexdigest()}
        digests.update((name, more.hexdigest()) for name, more in extra)
        return digests, size, head

    def _verify(self, digests: dict[str, str], expected: bytes) -> None:
        name = self._config.verify_hash_type or "sha256"
        actual = digests[name]
        if bytes.fromhex(actual) != expected:
            raise FetchError(
                ErrorCode.HASH_MISMATCH,
                f"{name} of the downloaded bytes is {actual}, the input's "
                f"{self._config.verify_hash_column!r} says {expected.hex()}: not saved",
            )

    def _read_chunk(
        self, response: Response, attempt: _Attempt, length: int | None, size: int
    ) -> bytes:
        left = attempt.ensure_time(self._config.total_timeout)
        # Narrowed per read, so every blocking recv ends by the attempt's deadline.
        response.set_timeout(min(self._config.read_timeout, left))
        try:
            # read1: return what has arrived (one recv at most) so that the deadline and
            # speed checks run between reads, even on a body that trickles in.
            return response.read1(CHUNK_SIZE)
        except (WireError, OSError, ValueError) as exc:
            error = self._translate(exc, attempt)
            if error.code is ErrorCode.PROTOCOL_ERROR and length is not None:
                # The connection broke before the announced length: a short body (retried).
                error = FetchError(
                    ErrorCode.INCOMPLETE_BODY,
                    f"body ended after {size} of {length} bytes: {_describe(exc)}",
                )
            raise error from exc

    def _discard_body(self, response: Response, attempt: _Attempt) -> None:
        """Read a small unwanted body so the connection can be reused; else close it."""
        length = response.length_remaining
        if length is None or length <= ERROR_BODY_LIMIT:
            budget = ERROR_BODY_LIMIT
            try:
                while budget > 0 and not attempt.expired():
                    response.set_timeout(min(self._config.read_timeout, attempt.remaining()))
                    chunk = response.read1(min(CHUNK_SIZE, budget))
                    if not chunk:
                        response.release()
                        return
                    budget -= len(chunk)
            except (WireError, OSError, ValueError):
                pass
        response.close()

    def _translate(self, exc: BaseException, attempt: _Attempt) -> FetchError:
        """Map a transport or socket error to the item's error code."""
        if attempt.expired() and (isinstance(exc, WireError) or not isinstance(exc, FetchError)):
            # Past the deadline, whatever broke (a timeout, or a socket the watchdog shut
            # down) broke because time ran out.
            return FetchError(ErrorCode.TOTAL_TIMEOUT, self._total_timeout_message())
        if isinstance(exc, FetchError):
            return FetchError(exc.code, redact_text(exc.message), http_status=exc.http_status)
        if isinstance(exc, TimeoutError):
            return FetchError(ErrorCode.READ_TIMEOUT, f"read timed out: {_describe(exc)}")
        return FetchError(ErrorCode.PROTOCOL_ERROR, f"protocol error: {_describe(exc)}")

    def _total_timeout_message(self) -> str:
        return f"attempt exceeded total_timeout={self._config.total_timeout:g}s"


# -- helpers ----------------------------------------------------------------------------------


def fd_budget(threads: int, per_host: int, soft_limit: int | None = None) -> tuple[int, int]:
    """(fetches at once, connection pools kept) that fit in ``ulimit -n`` (``soft_limit``).

    A fetch holds a socket and a temp file; each kept pool may hold ``per_host`` idle
    keep-alive sockets. Two thirds of the spare descriptors go to fetches, the rest to idle
    connections, never fewer than one fetch and one pool.
    """
    if soft_limit is None:
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return threads, NUM_POOLS
    spare = max(0, soft_limit - FD_RESERVE)
    concurrent = max(1, min(threads, spare // 3))
    pools = max(1, min(NUM_POOLS, (spare - 2 * concurrent) // per_host))
    return concurrent, pools


def _describe(exc: BaseException) -> str:
    text = redact_text(str(exc) or type(exc).__name__)
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


def _fail(record: Record, exc: FetchError) -> None:
    message = redact_text(exc.message)
    if exc.code is ErrorCode.TOTAL_TIMEOUT:  # two cases that need different actions
        head = record.http_status is not None or exc.http_status is not None
        message += " while the body was arriving" if head else " before the server answered"
    record.fail(exc.code, message)
    if exc.http_status is not None:
        record.http_status = exc.http_status
    record.status = Status.FAILED
    record.temp_path = None


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


def _parse_target(url: str) -> _Target:
    plain = split_plain(url)
    if plain is not None:  # the common shape, split as parse_url would
        default = 443 if plain.scheme == "https" else 80
        return _Target(
            url, plain.scheme, plain.host, plain.port or default, plain.request_uri, None
        )
    if _SPACE_OR_CONTROL.search(url):
        raise FetchError(ErrorCode.INVALID_URL, "URL contains spaces or control bytes")
    from urllib3.exceptions import LocationValueError  # the general parser, for the rest
    from urllib3.util import parse_url

    try:
        parsed = parse_url(url)
    except LocationValueError as exc:
        raise FetchError(ErrorCode.INVALID_URL, f"cannot parse URL: {_describe(exc)}") from exc
    scheme = (parsed.scheme or "").lower()
    if scheme not in _SCHEMES:
        raise FetchError(ErrorCode.UNSUPPORTED_SCHEME, f"scheme {scheme or '(none)'!r} refused")
    if not parsed.host:
        raise FetchError(ErrorCode.INVALID_URL, "URL has no host")
    port = parsed.port or (443 if scheme == "https" else 80)
    return _Target(url, scheme, parsed.host, port, parsed.request_uri, parsed.auth)


def _redirect_location(response: Response) -> str | None:
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


def _without_credentials(headers: _Headers) -> _Headers:
    return {key: field for key, field in headers.items() if key not in _CREDENTIAL_HEADERS}


def _request_bytes(target: _Target, headers: _Headers, *, absolute: bool = False) -> bytes:
    """The GET request for ``target``; ``absolute``: the request line names the whole URL
    (``GET http://host/path``), as a proxy is asked (RFC 9112 3.2.2); without the URL's
    userinfo, which never leaves here."""
    uri = target.request_uri
    if absolute:
        uri = f"{target.scheme}://{target.host_header()}{uri}"
    return request_bytes(uri, target.host_header(), headers)


def _local_io(operation: Callable[..., _T], *args: object) -> _T:
    """Run a local file operation; a full disk stops the run, other errors fail the item."""
    try:
        return operation(*args)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left writing to {exc.filename or 'temp'}") from exc
        raise FetchError(ErrorCode.IO_ERROR, f"writing the temp file: {exc.strerror}") from exc
