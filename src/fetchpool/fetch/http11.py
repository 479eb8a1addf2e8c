"""HTTP/1.1 on the wire, blocking: pooled connections pinned to checked addresses.

This is the layer under :class:`~fetchpool.fetch.client.HttpFetcher`: it opens (or reuses) a
connection to exactly the address the guard approved, sends a GET whose bytes the fetcher
built, and drives a :class:`~fetchpool.fetch.h1.ResponseParser` (framing and limits live
there, with no socket) with what each ``recv`` brings: the head within a byte budget, then a
:class:`Response` whose body is read in pieces (``read1``).

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

import contextlib
import select
import socket
import struct
import sys
import threading
from typing import TYPE_CHECKING, NamedTuple

from fetchpool.fetch import transport
from fetchpool.fetch.h1 import (
    BLANK_LINE,
    HEAD_READ,
    Head,
    ResponseParser,
    WireError,
    parse_head,
    protocol_error,
)
from fetchpool.fetch.idle import IdleConnections
from fetchpool.models import ErrorCode
from fetchpool.proxies import refusal

if TYPE_CHECKING:
    import ssl

__all__ = ["Connection", "ConnectionPool", "Response", "Via", "WireError", "tls_context"]

#: What every connection sets: requests are small and written at once, so Nagle only delays.
SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

#: The longest timeout a socket is given (about a year): config values are checked against
#: it too, since the kernel's timeval and Python's timeouts have finite ranges.
MAX_TIMEOUT = 365 * 86400.0

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


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of an answer."""


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
    """One TCP (or TLS) connection.

    Timeouts: a plain TCP socket is left in blocking mode and bounded by the kernel's
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` (an expired wait fails with ``EAGAIN``). A Python socket
    timeout would instead poll() before every recv and send, and every settimeout() is an
    ioctl: each a syscall that hands the GIL over to another thread, which is what limits a
    run of many small files. TLS sockets keep Python's timeouts (the ssl module needs them).
    """

    __slots__ = ("key", "reused", "sock", "timeout", "tls")

    def __init__(self, sock: socket.socket, key: Key, timeout: float) -> None:
        self.sock = sock
        self.key = key
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
            raise protocol_error(f"connection broken: {exc}") from exc

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
            raise protocol_error(f"connection aborted: {exc}") from exc
        parser = ResponseParser(header_budget)
        return Response(self, parser, self.read_head(parser))

    def read_head(self, parser: ResponseParser) -> Head:
        """Feed ``parser`` until it has the final head (interim 1xx answers skipped)."""
        # A fresh parser has nothing to parse yet: read first, then look for the head.
        head = parser.next_head() if parser.received else None
        while head is None:
            try:
                chunk = self.recv(parser.want(HEAD_READ))
            except WireError as exc:
                if self.reused and not parser.received and exc.code is not ErrorCode.READ_TIMEOUT:
                    raise _Stale from exc
                raise
            if chunk:
                parser.feed(chunk)
            elif self.reused and not parser.received:
                raise _Stale
            else:
                parser.feed_eof()
            head = parser.next_head()
        return head


class Response:
    """A response whose head was read; the body is read with :meth:`read1`.

    The blocking driver of a :class:`~fetchpool.fetch.h1.ResponseParser`: each read of the
    body feeds the parser what one ``recv`` brought. ``headers`` maps lowercased names to
    values (repeated fields joined by ``", "``); :meth:`get_all` gives a field's values line
    by line. ``length_remaining`` is the announced Content-Length less what was read, or
    ``None`` for a chunked body or one that ends with the connection.
    """

    __slots__ = ("_conn", "_parser", "_pool", "_watch", "head", "headers", "reason", "status")

    def __init__(self, conn: Connection, parser: ResponseParser, head: Head) -> None:
        self._conn: Connection | None = conn
        self._parser = parser
        self._pool: ConnectionPool | None = None
        self._watch: transport.Watch | None = None
        self.head = head
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers

    def get_all(self, name: str) -> list[str]:
        """Every value of the field ``name`` (lowercase), one per header line, in order."""
        repeated = self.head.repeated  # as Head.get_all: a call less on every request
        if repeated is not None and name in repeated:
            return list(repeated[name])
        value = self.headers.get(name)
        return [] if value is None else [value]

    @property
    def length_remaining(self) -> int | None:
        return self._parser.length_remaining

    def set_timeout(self, seconds: float) -> None:
        """Bound the next reads of the body by ``seconds`` each."""
        if self._conn is not None:
            self._conn.set_timeout(seconds)

    def read1(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body, ``b""`` at its end. One ``recv`` at most, but
        for a chunked body whose framing lines need more: the caller's deadline and speed
        checks run between reads, even on a body that trickles in. A body cut short of its
        Content-Length raises ``incomplete_body``."""
        conn = self._conn
        if conn is None:
            return b""
        parser = self._parser
        while (data := parser.read(size)) is None:
            chunk = conn.recv(parser.want(size))
            if chunk:
                parser.feed(chunk)
            else:
                parser.feed_eof()
        return data

    def release(self) -> None:
        """Give the connection back for reuse when the body was read to its end and the
        server allows it; close it otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        pool = self._pool
        if pool is not None and self._parser.reusable:
            # This attempt's deadline must not reach the connection once another uses it.
            if self._watch is not None:
                self._watch.detach(conn.sock)
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
        while (blank := BLANK_LINE.search(data)) is None:
            if len(data) > budget:
                raise protocol_error(f"proxy {via.name}: CONNECT answer exceeds the size limit")
            chunk = sock.recv(HEAD_READ)
            if not chunk:
                raise WireError(
                    ErrorCode.CONNECT_ERROR,
                    f"cannot connect: proxy {via.name} closed the connection at CONNECT "
                    f"{authority}",
                )
            data += chunk
        status, _, reason, _, _ = parse_head(data[: blank.start()])
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
        raise protocol_error(f"proxy {via.name} sent bytes after its CONNECT answer")


class ConnectionPool:
    """Idle keep-alive connections by (scheme, host, port, pinned address).

    A connection opened to one address is only ever reused for a request that the guard
    checked against that same address. At most ``per_host`` idle connections are kept per
    key and ``max_idle`` over all keys: past it, the least recently used key's oldest
    connection is closed first, so a run over many hosts keeps a few for each.
    A key without a host (``("http", "", 0, route)``: plain requests to a proxy, for any
    target) keeps up to ``shared_idle`` (default ``per_host``): every fetch thread may use it.
    Thread-safe.
    """

    def __init__(
        self,
        *,
        per_host: int,
        max_idle: int,
        insecure: bool,
        shared_idle: int | None = None,
        ca_data: str | None = None,
        ca_directory: str | None = None,
    ) -> None:
        self._per_host = per_host
        self._shared_idle = shared_idle or per_host
        self._insecure = insecure
        self._ca = (ca_data, ca_directory)
        self._tls: ssl.SSLContext | None = None
        self._idle: IdleConnections[Connection] = IdleConnections(max_idle)
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
        watch: transport.Watch | None = None,
    ) -> Response:
        """Send ``request`` on an idle connection for ``key`` or a new one; the response head.

        ``watch`` (the attempt's deadline) holds the connection's socket while the
        attempt uses it: from the connect until the response is released or closed.

        A reused connection found closed before it answered is replaced once by a new one.
        With ``via``, a new connection goes to that proxy: for ``https`` a CONNECT tunnel to
        the key's host and port, then TLS to that host inside it; for ``http`` the caller's
        request (absolute-form) is the proxy's to forward. The caller's ``key`` says which
        idle connections fit: a tunnel is one target's, a plain proxy connection any's.
        """
        conn = self._take_idle(key)
        if conn is not None:
            if watch is not None:
                watch.attach(conn.sock)
            try:
                return self._exchange(conn, request, read_timeout, header_budget, watch)
            except _Stale:
                conn.close()
                self._drop_idle(key)  # its siblings were likely closed at the same time
        conn = self._connect(key, connect_timeout, via, header_budget, watch)
        try:
            return self._exchange(conn, request, read_timeout, header_budget, watch)
        except _Stale:  # a new connection is never stale; defensive only
            conn.close()
            raise protocol_error("server closed the connection without a response") from None

    def _exchange(
        self,
        conn: Connection,
        request: bytes,
        timeout: float,
        header_budget: int,
        watch: transport.Watch | None,
    ) -> Response:
        try:
            response = conn.exchange(request, timeout, header_budget)
        except _Stale:
            raise
        except BaseException:
            conn.close()
            raise
        response._pool = self
        response._watch = watch
        return response

    def _connect(
        self,
        key: Key,
        timeout: float,
        via: Via | None = None,
        header_budget: int = HEAD_READ,
        watch: transport.Watch | None = None,
    ) -> Connection:
        scheme, host, port, ip = key
        if via is None:
            sock = _open(ip, port, timeout, host)
        else:
            sock = _open(via.address, via.port, timeout, f"proxy {via.name}")
        if watch is not None:
            watch.attach(sock)
        if via is not None and scheme == "https":
            _tunnel(sock, f"{host}:{port}", via, header_budget)
        if scheme == "https":
            sock = self._handshake(sock, host, timeout, watch)
        return Connection(sock, key, timeout)

    def _handshake(
        self, sock: socket.socket, host: str, timeout: float, watch: transport.Watch | None
    ) -> socket.socket:
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
        if watch is not None:
            watch.attach(tls)
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
                conn = self._idle.take(key)
            if conn is None:
                return None
            if not conn.dropped():
                conn.reused = True
                return conn
            conn.close()

    def _drop_idle(self, key: Key) -> None:
        with self._lock:
            idle = self._idle.pop_key(key)
        for conn in idle:
            conn.close()

    def put(self, conn: Connection) -> None:
        """Keep ``conn`` for reuse (or close it when the pool for its key is full)."""
        cap = self._per_host if conn.key[1] else self._shared_idle
        with self._lock:
            evicted = [conn] if self._closed else self._idle.put(conn.key, conn, cap)
        for extra in evicted:
            extra.close()

    def clear(self) -> None:
        """Close every idle connection; connections in use are closed when released."""
        with self._lock:
            self._closed = True
            idle = self._idle.clear()
        for conn in idle:
            conn.close()
