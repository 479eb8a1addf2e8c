"""urllib3 plumbing for the fetcher: connections pinned to a checked address, bounded headers.

Why subclasses: urllib3 resolves the host again in ``HTTPConnection._new_conn``. Between the
guard's check and that second lookup a hostile DNS server can change its answer (rebinding),
so our connections never resolve anything: ``_new_conn`` connects to the address the guard
approved (``pinned_ip``) while ``host`` (Host header, SNI, certificate check) stays the name.

Pools are keyed by ``(scheme, host, port, pinned_ip, ...)``: a connection opened to one
address is never handed out for a request that was checked against another.

Headers are bounded in bytes as a whole (``max_header_bytes``), not only per line and count as
http.client does (64 KiB x 100), so a hostile server cannot make each response cost megabytes.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.poolmanager import key_fn_by_scheme
from urllib3.util.timeout import Timeout

__all__ = ["HeadersTooLarge", "Watch", "Watchdog", "build_pool_manager", "open_socket"]

# Pool-context keys that are ours, not urllib3's: they go to our connections' constructors.
_OUR_KEYS = ("pinned_ip", "max_header_bytes")


class HeadersTooLarge(http.client.HTTPException):
    """The status line and headers together exceed the configured byte limit."""


class _CountingReader:
    """Wraps a response's file while headers are parsed, counting the bytes read."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def readline(self, size: int = -1) -> bytes:
        # Never ask for more than the budget left (+1 to detect the overflow): memory stays
        # bounded by the limit, not by http.client's 64 KiB per line.
        want = self._left + 1 if size < 0 else min(size, self._left + 1)
        line = self._raw.readline(want)
        self._left -= len(line)
        if self._left < 0:
            raise HeadersTooLarge("response headers exceed the size limit")
        return line

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _BoundedResponse(http.client.HTTPResponse):
    max_header_bytes = 64 * 1024

    def begin(self) -> None:
        raw = self.fp
        self.fp = _CountingReader(raw, self.max_header_bytes)  # type: ignore[assignment]
        try:
            super().begin()
        finally:
            if self.fp is not None:  # http.client sets fp to None when it closes early
                self.fp = raw


@functools.lru_cache(maxsize=16)
def _response_class(max_header_bytes: int) -> type[http.client.HTTPResponse]:
    return type("BoundedResponse", (_BoundedResponse,), {"max_header_bytes": max_header_bytes})


def open_socket(
    ip: str,
    port: int,
    timeout: float | None,
    options: Sequence[tuple[int, int, int | bytes]] | None,
) -> socket.socket:
    """Open a TCP connection to exactly ``ip``: no name resolution happens here.

    Module level so that tests can observe (or forbid) every connection attempt.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for option in options or ():
            sock.setsockopt(*option)
        sock.settimeout(timeout)
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_pinned(conn: HTTPConnection, ip: str) -> socket.socket:
    """``_new_conn`` for our connections: the pinned address, urllib3's exceptions."""
    timeout = Timeout.resolve_default_timeout(conn.timeout)
    try:
        sock = open_socket(ip, conn.port, timeout, conn.socket_options)
    except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
        raise ConnectTimeoutError(conn, f"connection to {conn.host} ({ip}) timed out") from exc
    except OSError as exc:
        raise NewConnectionError(conn, f"cannot connect to {conn.host} ({ip}): {exc}") from exc
    _attach_current(sock)
    return sock


class _Pinned:
    """What both pinned connection classes add: connect to a checked address, bound headers.

    A mixin placed before urllib3's connection class, so ``super()`` reaches it.
    """

    sock: socket.socket | None

    def __init__(self, *args: Any, pinned_ip: str, max_header_bytes: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pinned_ip = pinned_ip
        self.response_class = _response_class(max_header_bytes)

    def _new_conn(self) -> socket.socket:
        connection: Any = self
        return _connect_pinned(connection, self.pinned_ip)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current(self.sock)  # a pooled connection now serves this thread's attempt
        super().request(*args, **kwargs)  # type: ignore[misc]


class PinnedHTTPConnection(_Pinned, HTTPConnection):
    """An HTTP connection to a pre-resolved, checked address."""


class PinnedHTTPSConnection(_Pinned, HTTPSConnection):
    """An HTTPS connection to a pre-resolved, checked address; TLS checks use the name."""

    def connect(self) -> None:
        try:
            super().connect()
        except (ssl.SSLCertVerificationError, ssl.CertificateError):
            raise
        except (ssl.SSLEOFError, ConnectionError) as exc:
            # A peer that drops the connection during the handshake is a connect failure
            # (transient, retried), not a certificate problem.
            raise NewConnectionError(
                self, f"TLS handshake with {self.host} aborted: {exc}"
            ) from exc


class PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = PinnedHTTPConnection


class PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = PinnedHTTPSConnection


class InsecureHTTPSConnectionPool(PinnedHTTPSConnectionPool):
    """``--insecure``: certificates are not verified, and the user already knows it.

    urllib3 warns on every unverified request; the warning is dropped here, per pool, rather
    than through the process-wide (and not thread-safe) ``warnings`` filters.
    """

    def _validate_conn(self, conn: Any) -> None:
        HTTPConnectionPool._validate_conn(self, conn)
        if conn.is_closed:
            conn.connect()


def _pinned_key(request_context: dict[str, Any]) -> tuple[object, ...]:
    context = dict(request_context)
    ours = tuple(context.pop(key, None) for key in _OUR_KEYS)
    scheme = context["scheme"].lower()
    return (key_fn_by_scheme[scheme](context), *ours)


def build_pool_manager(
    *, per_host: int, num_pools: int, insecure: bool, max_header_bytes: int, timeout: Timeout
) -> PoolManager:
    """One PoolManager for all threads, creating only pinned connections.

    ``block=False``: a burst above ``per_host`` opens extra connections instead of making a
    thread wait on the pool (the scheduler already limits concurrency per host).
    """
    tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
    if insecure:
        tls = {"cert_reqs": "CERT_NONE", "assert_hostname": False}
    manager = PoolManager(
        num_pools=num_pools,
        maxsize=per_host,
        block=False,
        retries=False,
        timeout=timeout,
        max_header_bytes=max_header_bytes,
        **tls,
    )
    manager.pool_classes_by_scheme = {
        "http": PinnedHTTPConnectionPool,
        "https": InsecureHTTPSConnectionPool if insecure else PinnedHTTPSConnectionPool,
    }
    manager.key_fn_by_scheme = {"http": _pinned_key, "https": _pinned_key}  # type: ignore[dict-item]
    return manager


class Watch:
    """The sockets one attempt uses, shut down if the attempt outlives its deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self.done = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            if self.expired:
                _shutdown(sock)
            elif not self.done and sock not in self._sockets:
                self._sockets.append(sock)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._sockets.clear()

    def __lt__(self, other: Watch) -> bool:
        return self.deadline < other.deadline


def _shutdown(sock: socket.socket) -> None:
    # shutdown (not close) wakes a thread blocked in recv on this socket; the owner closes it.
    # The base class method on purpose: SSLSocket.shutdown would also drop the TLS object
    # under the feet of the thread reading it; this only shuts the file descriptor.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


def _attach_current(sock: socket.socket | None) -> None:
    watch: Watch | None = getattr(_current, "watch", None)
    if watch is not None and sock is not None:
        watch.attach(sock)


class Watchdog:
    """One thread enforcing every attempt's total deadline, whatever phase it is in.

    Socket timeouts bound each ``recv``; a server answering one byte just before each timeout
    (in the TLS handshake, the headers or the body) would still hold a thread for hours. The
    watchdog shuts such sockets down at the deadline, which makes the blocked call return.

    Known narrow window: urllib3 returns a connection to its pool when a body reaches EOF,
    a moment before the attempt's watch is finished; a deadline expiring exactly then shuts
    down a pooled socket. The next user sees a dropped connection (a retryable error).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[Watch] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def watch(self, deadline: float) -> Iterator[Watch]:
        """Watch the sockets this thread uses until the block ends."""
        entry = Watch(deadline)
        self._add(entry)
        previous = getattr(_current, "watch", None)
        _current.watch = entry
        try:
            yield entry
        finally:
            _current.watch = previous
            entry.finish()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    def _add(self, entry: Watch) -> None:
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="fetchpool-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                self._cond.wait(timeout=self._next_wait())

    def _next_wait(self) -> float:
        # Called with the condition held: expire what is due, drop what is finished.
        now = self._clock()
        while self._heap and (self._heap[0].done or self._heap[0].deadline <= now):
            heapq.heappop(self._heap).expire()
        if len(self._heap) > 64 and sum(w.done for w in self._heap) > len(self._heap) // 2:
            self._heap = [w for w in self._heap if not w.done]  # keep memory flat
            heapq.heapify(self._heap)
        if not self._heap:
            return 1.0
        return min(1.0, max(0.01, self._heap[0].deadline - now))
