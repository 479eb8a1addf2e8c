"""The transport seam, and sockets: connect to a checked address only, a deadline per attempt.

A :class:`Transport` moves one request's bytes and hands back a :class:`WireResponse`; the
policy above it (:mod:`fetchpool.fetch.policy`) is the same whatever the transport: the
HTTP/1.1 pool (``fetch/client.py:H1Transport``) or the in-library mock
(``fetch/mock.py:MockTransport``), as httpx's ``handle_request`` transports.

Connections never resolve a name: :func:`open_socket` connects to the address the guard
approved (a hostile DNS server cannot change its answer between the check and the connect:
rebinding), while the Host header, SNI and the certificate check use the name
(:mod:`fetchpool.fetch.http11`).

The :class:`Watchdog` enforces each attempt's total deadline across all its phases.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from fetchpool.fetch.policy import ResponseHead

if TYPE_CHECKING:
    from fetchpool.fetch.policy import Attempt, Request

__all__ = ["Transport", "Watch", "Watchdog", "WireResponse", "open_socket", "start_connect"]


class WireResponse(ResponseHead, Protocol):
    """An answer whose head has arrived; its body is read in pieces (``read1``)."""

    def set_timeout(self, seconds: float) -> None:
        """Bound each following read by ``seconds``."""
        ...

    def read1(self, size: int) -> bytes:
        """Up to ``size`` bytes of the body (one read of the wire); ``b""`` at its end."""
        ...

    def release(self) -> None:
        """The body was read to its end: keep the connection when it can be reused."""
        ...

    def close(self) -> None:
        """Drop the connection (its state is unknown)."""
        ...


class Transport(Protocol):
    """Sends a request the attempt made and returns the answer's head, or raises
    :class:`~fetchpool.errors.FetchError` (named by ``attempt.wire_error``). ``watch``
    holds the attempt's sockets until its deadline (None: no watchdog)."""

    def send(self, request: Request, attempt: Attempt, watch: Watch | None) -> WireResponse: ...
    def close(self) -> None: ...


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


def start_connect(
    ip: str, port: int, options: Sequence[tuple[int, int, int | bytes]] | None
) -> tuple[socket.socket, int]:
    """Start a non-blocking TCP connection to exactly ``ip`` (no name resolution): the socket
    and ``connect_ex``'s errno (0: connected, EINPROGRESS: under way). The multiplexed
    driver's :func:`open_socket`, module level for the same reason (tests observe it)."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        for option in options or ():
            sock.setsockopt(*option)
        return sock, sock.connect_ex((ip, port))
    except BaseException:
        sock.close()
        raise


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

    def detach(self, sock: socket.socket) -> None:
        """Stop watching ``sock``: its connection goes back to the pool, to other attempts."""
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)

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


class Watchdog:
    """One thread enforcing every attempt's total deadline, whatever phase it is in.

    Socket timeouts bound each ``recv``; a server answering one byte just before each timeout
    (in the TLS handshake, the headers or the body) would still hold a thread for hours. The
    watchdog shuts such sockets down at the deadline, which makes the blocked call return.

    A connection leaves the attempt's watch when it goes back to the pool, so an attempt
    that expires after a redirect never shuts down a connection another attempt now uses.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[Watch] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def watch(self, deadline: float) -> Iterator[Watch]:
        """A watch for one attempt until the block ends; the wire attaches the sockets the
        attempt uses to it (``ConnectionPool.request(..., watch=...)``)."""
        entry = Watch(deadline)
        self._add(entry)
        try:
            yield entry
        finally:
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
