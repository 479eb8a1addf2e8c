"""HTTP/1.1 on the wire: pooled connections pinned to checked addresses, bounded parsing.

This is the layer under :class:`~fetchpool.fetch.client.HttpFetcher`: it opens (or reuses) a
connection to exactly the address the guard approved, sends a GET whose bytes the fetcher
built, reads the status line and headers within a byte budget, and hands back a
:class:`Response` whose body is read in pieces (``read1``), framed by Content-Length, chunked
encoding or the connection's end.

Why not urllib3 + http.client, which fetchpool used first: the fetcher needs little of them
(one method, no redirects, no retries, no decoding, no proxies) and paid for all of it on every
request — ``Timeout``/``HTTPHeaderDict``/``Retry`` objects, pool-key tuples, ``email.parser``
for headers — 185 µs of CPU per request for urllib3 and 94 µs for bare http.client, against
~60 µs here (docs/benchmarks.md). Under the GIL that CPU is what caps a run of many small
files. What is kept from urllib3's design: a per-(host, address) pool of idle connections, a
liveness check before reuse, and one transparent retry when a reused connection turns out to
have been closed by the server before it answered (the request is a GET, safe to repeat).

Through a proxy (:class:`Via`), a connection goes to the proxy's address instead: an https
one is a CONNECT tunnel to the target, with TLS to the target's name inside it.

Every failure is a :class:`WireError` (a :class:`~fetchpool.errors.FetchError`) carrying the
item's error code; nothing else escapes, except :class:`KeyboardInterrupt` and friends.
"""

from __future__ import annotations

import collections
import contextlib
import re
import select
import socket
import struct
import sys
import threading
from typing import TYPE_CHECKING, NamedTuple

from fetchpool.errors import FetchError
from fetchpool.fetch import transport
from fetchpool.models import ErrorCode
from fetchpool.proxies import refusal

if TYPE_CHECKING:
    import ssl

__all__ = ["Connection", "ConnectionPool", "Response", "Via", "WireError", "tls_context"]

#: Bytes asked of the kernel per read while looking for the end of the headers: a small
#: response (headers + body) usually arrives in one read.
HEAD_READ = 64 * 1024
#: A chunk-size line longer than this is not a chunk size.
MAX_CHUNK_LINE = 4096
#: What every connection sets: requests are small and written at once, so Nagle only delays.
SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

_NO_BODY_STATUSES = frozenset({204, 304})
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: The longest timeout a socket is given (about a year): config values are checked against
#: it too, since the kernel's timeval and Python's timeouts have finite ranges.
MAX_TIMEOUT = 365 * 86400.0
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

Key = tuple[str, str, int, str]  # (scheme, host lowercased, port, pinned address)


class Via(NamedTuple):
    """The HTTP proxy a connection goes through (chosen by :mod:`fetchpool.proxies`).

    ``name`` is its URL with the password masked (for messages), ``address`` what to connect
    to (the user's own choice: the guard checks the target, not the proxy), ``headers`` the
    fields the proxy itself is sent with a CONNECT (``Proxy-Authorization``).
    """

    name: str
    address: str
    port: int
    headers: tuple[tuple[str, str], ...] = ()


class WireError(FetchError):
    """A transport failure, already classified (connect, TLS, timeout, protocol)."""


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of an answer."""


def _protocol_error(message: str) -> WireError:
    return WireError(ErrorCode.PROTOCOL_ERROR, f"protocol error: {message}")


def _read_timeout() -> WireError:
    return WireError(ErrorCode.READ_TIMEOUT, "read timed out")


def _is_tls_error(exc: OSError) -> bool:
    # ssl.SSLError subclasses OSError; without ssl loaded no TLS connection exists to raise it.
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, ssl.SSLError)


def _tls_error(exc: OSError) -> WireError:
    return WireError(ErrorCode.TLS_ERROR, f"TLS error: {exc}")


#: OpenSSL verify results that a missing trust anchor causes: unable to get the issuer's
#: certificate (2, 20), self-signed leaf or chain (18, 19), cannot verify the leaf (21).
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH = 10, 9, 62


def _verify_error(exc: ssl.SSLCertVerificationError) -> WireError:
    """A certificate that did not verify, with what the user can do about it."""
    code = getattr(exc, "verify_code", None)
    if code in _UNTRUSTED_ISSUER:
        advice = (
            "if the server's certificate comes from a private CA, --ca-certificate FILE "
            "(its PEM) trusts it; --insecure skips the check (recorded)"
        )
    elif code in (_EXPIRED, _NOT_YET_VALID):
        advice = "check this machine's clock; --insecure skips the check (recorded)"
    elif code == _HOSTNAME_MISMATCH:
        advice = "the certificate names another host; --insecure skips the check (recorded)"
    else:
        advice = "--insecure skips the check (recorded)"
    return WireError(ErrorCode.TLS_ERROR, f"TLS error: {exc}; {advice}")


def tls_context(
    *, insecure: bool, ca_data: str | None = None, ca_directory: str | None = None
) -> ssl.SSLContext:
    """The TLS settings of every HTTPS connection: system trust store (``SSL_CERT_FILE`` and
    ``SSL_CERT_DIR`` replace its file and folder, as OpenSSL reads them), name checked,
    TLS ≥ 1.2, ALPN ``http/1.1``; ``insecure`` skips the certificate and name checks
    (``--insecure``). ``ca_data`` (PEM text, ``--ca-certificate``) and ``ca_directory``
    (an OpenSSL hashed folder, ``--ca-directory``) are trusted in addition to the store.

    ``ssl`` is imported here, at the first HTTPS connection: it costs ~10 ms of start-up
    (OpenSSL's libssl) that a plain-HTTP run never needs.
    """
    import ssl

    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if ca_data or ca_directory:
        context.load_verify_locations(cadata=ca_data, capath=ca_directory)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Connection:
    """One TCP (or TLS) connection and the bytes read from it but not yet consumed.

    Timeouts: a plain TCP socket is left in blocking mode and bounded by the kernel's
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` (an expired wait fails with ``EAGAIN``). A Python socket
    timeout would instead poll() before every recv and send, and every settimeout() is an
    ioctl: each a syscall that hands the GIL over to another thread, which is what limits a
    run of many small files. TLS sockets keep Python's timeouts (the ssl module needs them).
    """

    __slots__ = ("buffer", "key", "reused", "sock", "timeout", "tls")

    def __init__(self, sock: socket.socket, key: Key, timeout: float) -> None:
        self.sock = sock
        self.key = key
        self.buffer = b""
        self.reused = False
        self.tls = key[0] == "https"
        self.timeout = -1.0
        if not self.tls:
            sock.settimeout(None)
        self.set_timeout(timeout)

    def set_timeout(self, seconds: float) -> None:
        """Bound each blocking read and write by ``seconds`` (no syscall when unchanged)."""
        seconds = min(max(seconds, 0.001), MAX_TIMEOUT)  # a zero timeval means "forever"
        if seconds == self.timeout:
            return
        self.timeout = seconds
        if self.tls:
            self.sock.settimeout(seconds)
            return
        whole = int(seconds)
        value = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def dropped(self) -> bool:
        """True when an idle connection has something to read: the server closed it, or
        sent bytes nobody asked for (which must never be read as the next answer)."""
        if self.tls and self.sock.pending():  # type: ignore[attr-defined]
            return True  # decrypted bytes that OpenSSL holds, invisible to poll()
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def recv(self, size: int) -> bytes:
        """At most ``size`` bytes (one read); ``b""`` at the end of the stream."""
        try:
            return self.sock.recv(size)
        except (TimeoutError, BlockingIOError):
            raise _read_timeout() from None
        except OSError as exc:
            if _is_tls_error(exc):
                raise _tls_error(exc) from exc
            raise _protocol_error(f"connection broken: {exc}") from exc

    def exchange(self, request: bytes, timeout: float, header_budget: int) -> Response:
        """Send ``request``, read the answer's head; raise :class:`_Stale` when a reused
        connection was closed before it answered anything."""
        self.set_timeout(timeout)
        try:
            self.sock.sendall(request)
        except (TimeoutError, BlockingIOError):
            raise WireError(ErrorCode.READ_TIMEOUT, "write timed out") from None
        except OSError as exc:
            if self.reused:  # closed (or its TLS session ended) while it sat in the pool
                raise _Stale from exc
            if _is_tls_error(exc):
                raise _tls_error(exc) from exc
            raise _protocol_error(f"connection aborted: {exc}") from exc
        budget = header_budget
        while True:
            status, head_bytes, headers, version, reason, repeated = self._read_head(budget)
            budget -= head_bytes
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return Response(self, status, reason, version, headers, repeated=repeated)

    def _read_head(
        self, budget: int
    ) -> tuple[int, int, dict[str, str], int, str, dict[str, list[str]] | None]:
        data = bytearray(self.buffer)
        first = not data
        searched = 0  # the blank line is looked for in new bytes only (and 3 before them)
        while True:
            # The first empty line ends the head; bare LF line ends are tolerated, as
            # http.client does (its readline() takes "\n" and "\r\n" alike).
            blank = _BLANK_LINE.search(data, max(0, searched - 3))
            if blank is not None:
                end, cut = blank.start(), blank.end()
                break
            searched = len(data)
            if len(data) > budget:
                raise _protocol_error("response headers exceed the size limit")
            try:
                chunk = self.recv(min(HEAD_READ, budget + 1 - len(data)))
            except WireError as exc:
                if first and not data and self.reused and exc.code is not ErrorCode.READ_TIMEOUT:
                    raise _Stale from exc
                raise
            if not chunk:
                if first and not data and self.reused:
                    raise _Stale
                what = "without a response" if not data else "in the middle of the headers"
                raise _protocol_error(f"server closed the connection {what}")
            data += chunk
        if cut > budget:
            raise _protocol_error("response headers exceed the size limit")
        self.buffer = bytes(data[cut:])
        status, version, reason, headers, repeated = _parse_head(bytes(data[:end]))
        return status, cut, headers, version, reason, repeated


def _parse_head(
    head: bytes,
) -> tuple[int, int, str, dict[str, str], dict[str, list[str]] | None]:
    """(status, version, reason, headers, repeated): ``headers`` joins a repeated field's
    values with ", " (RFC 9110 5.3); ``repeated`` keeps each line's value apart for the fields
    that came more than once (None when none did), for readers of fields whose values are not
    plain lists (an ``X-Robots-Tag: bot: rule`` scope ends with its line)."""
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(None, 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        shown = lines[0][:60].decode("latin-1")
        raise _protocol_error(f"not an HTTP/1.x status line: {shown!r}")
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or code[0:1] == b"0":
        raise _protocol_error(f"invalid status code {code[:10].decode('latin-1')!r}")
    version = 11 if parts[0] == b"HTTP/1.1" else 10
    reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    repeated: dict[str, list[str]] | None = None
    name = ""
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        if line[0] in b" \t":  # obsolete line folding: a continuation of the previous value
            if not name:
                raise _protocol_error("header continuation without a header")
            more = line.strip().decode("latin-1")
            headers[name] = f"{headers[name]} {more}"
            if repeated is not None and name in repeated:
                repeated[name][-1] = f"{repeated[name][-1]} {more}"
            continue
        field, colon, value = line.partition(b":")
        if not colon or not field or not _TOKEN.issuperset(field):
            raise _protocol_error(f"invalid header line {line[:40].decode('latin-1')!r}")
        name = field.decode("ascii").lower()
        text = value.strip().decode("latin-1")
        known = headers.get(name)
        if known is None:
            headers[name] = text
        elif name == "content-length":
            if known != text:
                raise _protocol_error(f"conflicting Content-Length headers {known!r}, {text!r}")
        else:
            headers[name] = f"{known}, {text}"
            repeated = _repeat(repeated, name, known, text)
    return int(code), version, reason, headers, repeated


def _repeat(
    repeated: dict[str, list[str]] | None, name: str, known: str, text: str
) -> dict[str, list[str]]:
    """Note another line of the field ``name``; ``known`` is its value so far, which at the
    second line is the first line's value."""
    if repeated is None:
        repeated = {}
    values = repeated.get(name)
    if values is None:
        repeated[name] = [known, text]
    else:
        values.append(text)
    return repeated


class Response:
    """A response whose head was read; the body is read with :meth:`read1`.

    ``headers`` maps lowercased names to values (repeated fields joined by ``", "``);
    :meth:`get_all` gives a field's values line by line.
    ``length_remaining`` is the announced Content-Length less what was read, or ``None``
    for a chunked body or one that ends with the connection.
    """

    __slots__ = (
        "_chunk_left",
        "_chunked",
        "_conn",
        "_done",
        "_keep",
        "_left",
        "_pool",
        "_repeated",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        conn: Connection,
        status: int,
        reason: str,
        version: int,
        headers: dict[str, str],
        *,
        repeated: dict[str, list[str]] | None = None,
    ) -> None:
        self._conn: Connection | None = conn
        self._repeated = repeated
        self._pool: ConnectionPool | None = None
        self.status = status
        self.reason = reason
        self.headers = headers
        tokens = headers.get("connection", "").lower()
        self._keep = version == 11 and "close" not in tokens
        self._chunked = False
        self._chunk_left = -1  # -1: the next chunk's size line has not been read
        self._left: int | None = None
        self._done = False
        encoding = headers.get("transfer-encoding")
        if encoding is not None and "content-length" in headers:
            self._keep = False  # ambiguous framing (RFC 9112 6.3): never reuse the connection
        if status in _NO_BODY_STATUSES:
            self._left = 0
        elif encoding is not None:
            self._chunked = encoding.rsplit(",", 1)[-1].strip().lower() == "chunked"
            if not self._chunked:  # RFC 9112 6.3: any other final coding runs to the end
                self._keep = False
        elif "content-length" in headers:
            declared = headers["content-length"]
            if not declared.isdigit() or not declared.isascii():
                raise _protocol_error(f"invalid Content-Length {declared[:20]!r}")
            self._left = int(declared)
        else:
            self._keep = False  # the body ends when the server closes the connection
        if self._left == 0:
            self._done = True

    def get_all(self, name: str) -> list[str]:
        """Every value of the field ``name`` (lowercase), one per header line, in order."""
        if self._repeated is not None and name in self._repeated:
            return list(self._repeated[name])
        value = self.headers.get(name)
        return [] if value is None else [value]

    @property
    def length_remaining(self) -> int | None:
        return None if self._chunked else self._left

    def set_timeout(self, seconds: float) -> None:
        """Bound the next reads of the body by ``seconds`` each."""
        if self._conn is not None:
            self._conn.set_timeout(seconds)

    def read1(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, at most one read from the socket; ``b""`` at its
        end. A body cut short of its Content-Length also ends with ``b""``: the caller
        compares sizes (and the connection is not reused)."""
        conn = self._conn
        if self._done or conn is None:
            return b""
        if self._chunked:
            return self._read_chunked(conn, size)
        if self._left is not None:
            size = min(size, self._left)
        data = self._take(conn, size)
        if not data:
            self._done = True
            if self._left is not None:  # short of the announced length
                self._keep = False
            return b""
        if self._left is not None:
            self._left -= len(data)
            if self._left == 0:
                self._done = True
        return data

    def _take(self, conn: Connection, size: int) -> bytes:
        buffered = conn.buffer
        if buffered:
            data, conn.buffer = buffered[:size], buffered[size:]
            return data
        return conn.recv(size)

    def _read_chunked(self, conn: Connection, size: int) -> bytes:
        if self._chunk_left <= 0:
            # A chunk's data ends with CRLF (_chunk_left is -1 before the first chunk).
            if self._chunk_left == 0 and self._line(conn, 2).strip():
                raise _protocol_error("chunk not followed by CRLF")
            line = self._line(conn, MAX_CHUNK_LINE)
            text = line.split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(text):
                raise _protocol_error(f"invalid chunk size {text[:20]!r}")
            chunk = int(text, 16)
            if chunk == 0:
                self._trailers(conn)
                self._done = True
                return b""
            self._chunk_left = chunk
        data = self._take(conn, min(size, self._chunk_left))
        if not data:
            self._keep = False
            raise _protocol_error("chunked body ended before its last chunk")
        self._chunk_left -= len(data)
        return data

    def _line(self, conn: Connection, limit: int) -> bytes:
        searched = 0
        while True:
            end = conn.buffer.find(b"\n", searched)
            if end != -1:
                line, conn.buffer = conn.buffer[: end + 1], conn.buffer[end + 1 :]
                return line
            searched = len(conn.buffer)
            if len(conn.buffer) > limit:
                raise _protocol_error("chunk framing line too long")
            more = conn.recv(HEAD_READ)
            if not more:
                self._keep = False
                raise _protocol_error("chunked body ended before its last chunk")
            conn.buffer += more

    def _trailers(self, conn: Connection) -> None:
        budget = 64 * 1024
        while True:
            line = self._line(conn, budget)
            budget -= len(line)
            if budget < 0:
                raise _protocol_error("chunked trailers exceed the size limit")
            if not line.strip():
                return

    def release(self) -> None:
        """Give the connection back for reuse when the body was read to its end and the
        server allows it; close it otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        pool = self._pool
        if pool is not None and self._done and self._keep and not conn.buffer:
            # This attempt's deadline must not reach the connection once another uses it.
            transport.detach_current(conn.sock)
            pool.put(conn)  # bytes that arrive after this are caught by dropped() at reuse
        else:
            conn.close()

    def close(self) -> None:
        """Close the connection: it is in an unknown state and never reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _open(ip: str, port: int, timeout: float, name: str) -> socket.socket:
    try:
        return transport.open_socket(ip, port, timeout, SOCKET_OPTIONS)
    except TimeoutError:
        raise WireError(
            ErrorCode.CONNECT_TIMEOUT,
            f"connect timed out: connection to {name} ({ip}) timed out",
        ) from None
    except OSError as exc:
        message = f"cannot connect: to {name} ({ip}): {exc}"
        raise WireError(ErrorCode.CONNECT_ERROR, message) from exc


def _tunnel(sock: socket.socket, authority: str, via: Via, budget: int) -> None:
    """Ask the proxy on ``sock`` for a tunnel to ``authority`` (host:port); close ``sock`` and
    raise unless it answered 2xx. Bounded like any connect: the socket's connect timeout per
    read, ``budget`` bytes of answer, the attempt's deadline (the watchdog holds ``sock``)."""
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{name}: {value}" for name, value in via.headers]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while (blank := _BLANK_LINE.search(data)) is None:
            if len(data) > budget:
                raise _protocol_error(f"proxy {via.name}: CONNECT answer exceeds the size limit")
            chunk = sock.recv(HEAD_READ)
            if not chunk:
                raise WireError(
                    ErrorCode.CONNECT_ERROR,
                    f"cannot connect: proxy {via.name} closed the connection at CONNECT "
                    f"{authority}",
                )
            data += chunk
        status, _, reason, _, _ = _parse_head(data[: blank.start()])
    except BaseException as exc:
        sock.close()
        if isinstance(exc, TimeoutError):
            raise WireError(
                ErrorCode.CONNECT_TIMEOUT,
                f"connect timed out: proxy {via.name} did not answer CONNECT {authority}",
            ) from None
        if isinstance(exc, OSError):
            raise WireError(
                ErrorCode.CONNECT_ERROR,
                f"cannot connect: CONNECT {authority} through proxy {via.name}: {exc}",
            ) from exc
        raise
    if not 200 <= status < 300:
        sock.close()
        code, message = refusal(via.name, status, reason, f"CONNECT {authority}", via.headers)
        raise WireError(code, message)
    if blank.end() != len(data):  # the target speaks first only after our TLS hello
        sock.close()
        raise _protocol_error(f"proxy {via.name} sent bytes after its CONNECT answer")


class ConnectionPool:
    """Idle keep-alive connections by (scheme, host, port, pinned address).

    A connection opened to one address is only ever reused for a request that the guard
    checked against that same address. At most ``per_host`` idle connections are kept per
    key and ``num_pools`` keys (the least recently used key's connections are closed first).
    A key without a host (``("http", "", 0, route)``: plain requests to a proxy, for any
    target) keeps up to ``shared_idle`` (default ``per_host``): every fetch thread may use it.
    Thread-safe.
    """

    def __init__(
        self,
        *,
        per_host: int,
        num_pools: int,
        insecure: bool,
        shared_idle: int | None = None,
        ca_data: str | None = None,
        ca_directory: str | None = None,
    ) -> None:
        self._per_host = per_host
        self._shared_idle = shared_idle or per_host
        self._num_pools = num_pools
        self._insecure = insecure
        self._ca = (ca_data, ca_directory)
        self._tls: ssl.SSLContext | None = None
        self._idle: collections.OrderedDict[Key, list[Connection]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    def request(
        self,
        key: Key,
        request: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
        header_budget: int,
        via: Via | None = None,
    ) -> Response:
        """Send ``request`` on an idle connection for ``key`` or a new one; the response head.

        A reused connection found closed before it answered is replaced once by a new one.
        With ``via``, a new connection goes to that proxy: for ``https`` a CONNECT tunnel to
        the key's host and port, then TLS to that host inside it; for ``http`` the caller's
        request (absolute-form) is the proxy's to forward. The caller's ``key`` says which
        idle connections fit: a tunnel is one target's, a plain proxy connection any's.
        """
        conn = self._take_idle(key)
        if conn is not None:
            transport.attach_current(conn.sock)
            try:
                return self._exchange(conn, request, read_timeout, header_budget)
            except _Stale:
                conn.close()
                self._drop_idle(key)  # its siblings were likely closed at the same time
        conn = self._connect(key, connect_timeout, via, header_budget)
        try:
            return self._exchange(conn, request, read_timeout, header_budget)
        except _Stale:  # a new connection is never stale; defensive only
            conn.close()
            raise _protocol_error("server closed the connection without a response") from None

    def _exchange(
        self, conn: Connection, request: bytes, timeout: float, header_budget: int
    ) -> Response:
        try:
            response = conn.exchange(request, timeout, header_budget)
        except _Stale:
            raise
        except BaseException:
            conn.close()
            raise
        response._pool = self
        return response

    def _connect(
        self, key: Key, timeout: float, via: Via | None = None, header_budget: int = HEAD_READ
    ) -> Connection:
        scheme, host, port, ip = key
        if via is None:
            sock = _open(ip, port, timeout, host)
        else:
            sock = _open(via.address, via.port, timeout, f"proxy {via.name}")
        transport.attach_current(sock)
        if via is not None and scheme == "https":
            _tunnel(sock, f"{host}:{port}", via, header_budget)
        if scheme == "https":
            sock = self._handshake(sock, host, timeout)
        return Connection(sock, key, timeout)

    def _handshake(self, sock: socket.socket, host: str, timeout: float) -> socket.socket:
        import ssl

        try:
            context = self._tls_context()
            tls = context.wrap_socket(
                sock, server_hostname=host.strip("[]"), do_handshake_on_connect=False
            )
        except (ssl.SSLError, OSError, ValueError) as exc:
            sock.close()
            raise WireError(ErrorCode.TLS_ERROR, f"TLS error: {exc}") from exc
        # wrap_socket took the descriptor over (``sock`` is detached now): the attempt's
        # watchdog must hold the TLS socket, or it could not stop a trickling server.
        transport.attach_current(tls)
        try:
            tls.do_handshake()
        except ssl.SSLCertVerificationError as exc:  # ssl.CertificateError is the same class
            tls.close()
            raise _verify_error(exc) from exc
        except (ssl.SSLEOFError, ConnectionError) as exc:
            # A peer that drops the connection during the handshake is a connect failure
            # (transient, retried), not a certificate problem.
            tls.close()
            raise WireError(
                ErrorCode.CONNECT_ERROR, f"cannot connect: TLS handshake with {host} aborted: {exc}"
            ) from exc
        except TimeoutError:
            tls.close()
            raise WireError(
                ErrorCode.CONNECT_TIMEOUT, f"connect timed out: TLS handshake with {host}"
            ) from None
        except ssl.SSLError as exc:
            tls.close()
            raise _tls_error(exc) from exc
        except OSError as exc:
            tls.close()
            raise WireError(
                ErrorCode.CONNECT_ERROR, f"cannot connect: TLS handshake with {host}: {exc}"
            ) from exc
        return tls

    def _tls_context(self) -> ssl.SSLContext:
        # Built at first use, not at start: a plain-HTTP run never loads the trust store.
        with self._lock:
            if self._tls is None:
                self._tls = tls_context(
                    insecure=self._insecure, ca_data=self._ca[0], ca_directory=self._ca[1]
                )
            return self._tls

    def _take_idle(self, key: Key) -> Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
                self._idle.move_to_end(key)
            if not conn.dropped():
                conn.reused = True
                return conn
            conn.close()

    def _drop_idle(self, key: Key) -> None:
        with self._lock:
            idle = self._idle.pop(key, [])
        for conn in idle:
            conn.close()

    def put(self, conn: Connection) -> None:
        """Keep ``conn`` for reuse (or close it when the pool for its key is full)."""
        evicted: list[Connection] = []
        with self._lock:
            if self._closed:
                evicted.append(conn)
            else:
                idle = self._idle.get(conn.key)
                if idle is None:
                    idle = self._idle[conn.key] = []
                    while len(self._idle) > self._num_pools:
                        _, oldest = self._idle.popitem(last=False)
                        evicted.extend(oldest)
                else:
                    self._idle.move_to_end(conn.key)
                if len(idle) < (self._per_host if conn.key[1] else self._shared_idle):
                    idle.append(conn)
                else:
                    evicted.append(conn)
        for extra in evicted:
            extra.close()

    def clear(self) -> None:
        """Close every idle connection; connections in use are closed when released."""
        with self._lock:
            self._closed = True
            pools, self._idle = list(self._idle.values()), collections.OrderedDict()
        for connections in pools:
            for conn in connections:
                conn.close()
