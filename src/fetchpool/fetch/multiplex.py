"""The non-blocking driver: one selector loop thread drives many attempts at once.

::

    submit(job, on_done) ─▶ inbox ─▶ loop thread (selectors/epoll, one per fetcher):
      Attempt (policy.py) ─▶ request ─▶ guard: cached/literal on the loop, else a resolver
      thread (getaddrinfo blocks) posts the checked addresses back through the wake socket
      ─▶ idle keep-alive connection for (scheme, host, port, checked address), or a
         non-blocking connect to that address (the next one on connect_error), TLS with
         want-read/want-write ─▶ send ─▶ ResponseParser fed what each recv brought (h1.py)
      ─▶ attempt.on_head: Follow │ HandBack │ Refuse (drain or close) │ Accept
      ─▶ attempt.on_body per chunk (the temp file written here: page cache)
      ─▶ attempt.finish ─▶ a finisher thread: fsync, close ─▶ on_done(record) (publishes)
    request through a proxy ─▶ the proxy lane: the blocking HttpFetcher.resume (H1Transport)

The same policy and parser as the blocking driver (:mod:`fetchpool.fetch.client`), so the
same error codes and messages for the same bytes. What differs is the waiting: every wait
(connect, TLS handshake, send, the head, each read of a body, the attempt's total deadline)
is an entry in one deadline heap that the loop checks between ``select`` calls; there is no
watchdog thread and no thread per request. Requests through a proxy are rare and were not
re-implemented non-blocking: they run on a small thread lane with the blocking transport.

File work that may block stays off the loop: a body is appended to its temp file on the loop
(a write to the page cache), and the fsync, the close and ``on_done`` (where the files writer
links the file and fsyncs its folder) run on finisher threads.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from fetchpool.config import FetchConfig
from fetchpool.errors import DiskFullError, FetchError, FetchpoolError
from fetchpool.fetch import transport
from fetchpool.fetch.client import HttpFetcher, fd_budget
from fetchpool.fetch.guard import Address, AddressGuard
from fetchpool.fetch.h1 import HEAD_READ, Head, ResponseParser, WireError, protocol_error
from fetchpool.fetch.http11 import SOCKET_OPTIONS, Key, _tls_error, _verify_error, tls_context
from fetchpool.fetch.idle import IdleConnections
from fetchpool.fetch.policy import (
    CHUNK_SIZE,
    ERROR_BODY_LIMIT,
    Accept,
    Attempt,
    Decision,
    Follow,
    HandBack,
    Policy,
    Refuse,
    Request,
    TempFileSink,
    _local_error,
)
from fetchpool.models import ErrorCode, Job, Record

if TYPE_CHECKING:
    import selectors
    import ssl

__all__ = ["MultiplexFetcher"]

log = logging.getLogger("fetchpool")

#: Resolver threads: getaddrinfo blocks, and only names not in the guard's cache reach them.
RESOLVER_THREADS = 4
#: Threads that fsync, close and hand over finished bodies (the files writer links there):
#: one per this many attempts at once, within the bounds below. fsync waits on the disk with
#: the GIL released; many at once let the filesystem commit them together (a W4 profile with
#: 3 finishers spent most of its time queued behind them).
FINISHER_SHARE = 8
FINISHER_THREADS = (4, 32)
#: Threads that carry requests through a proxy with the blocking driver.
PROXY_LANE_THREADS = 4

# What a task waits for (its phase).
_RESOLVE, _CONNECT, _TLS, _SEND, _HEAD, _BODY, _DRAIN, _LANE, _DONE = range(9)

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})


class _Head:
    """The :class:`~fetchpool.fetch.policy.ResponseHead` the attempt decides from."""

    __slots__ = ("_head", "_parser", "headers", "reason", "status")

    def __init__(self, head: Head, parser: ResponseParser) -> None:
        self._head = head
        self._parser = parser
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers

    @property
    def length_remaining(self) -> int | None:
        return self._parser.length_remaining

    def get_all(self, name: str) -> list[str]:
        return self._head.get_all(name)


class _LoopSink(TempFileSink):
    """A temp file written on the loop whose fsync and close are left to a finisher thread:
    :meth:`close` hands over the path and keeps the descriptor (:meth:`detach`)."""

    __slots__ = ("_open_fd",)

    def close(self) -> str:
        path = self._path
        assert path is not None, "close() before open()"
        self._open_fd, self._fd = self._fd, -1
        return path

    def detach(self) -> int:
        fd = getattr(self, "_open_fd", -1)
        self._open_fd = -1
        return fd


class _Conn:
    """One connection (plain or TLS, non-blocking), registered with the selector for its
    whole life; ``task`` is the attempt using it, None while it is idle in the pool."""

    __slots__ = ("events", "key", "reused", "sock", "task", "tls")

    def __init__(self, sock: socket.socket, key: Key, tls: bool) -> None:
        self.sock = sock
        self.key = key
        self.tls = tls
        self.reused = False
        self.task: _Task | None = None
        self.events = 0

    def dropped(self) -> bool:
        """True when an idle connection has something to read: closed by the server, or
        bytes nobody asked for (never to be read as the next answer)."""
        sock = self.sock
        try:
            if self.tls:
                if sock.pending():  # type: ignore[attr-defined]
                    return True
                readable, _, _ = select.select([sock], [], [], 0)
                return bool(readable)
            sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True
        return True  # bytes, or b"": the server closed it

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Task:
    """One attempt as the loop drives it."""

    __slots__ = (
        "addresses",
        "attempt",
        "budget",
        "conn",
        "decision",
        "due",
        "index",
        "on_done",
        "out",
        "parser",
        "phase",
        "queued",
        "read_timeout",
        "request",
        "sink",
        "stale_retried",
    )

    def __init__(
        self, attempt: Attempt, sink: _LoopSink, on_done: Callable[[Record], None]
    ) -> None:
        self.attempt = attempt
        self.sink = sink
        self.on_done = on_done
        self.request: Request | None = None
        self.addresses: list[Address] = []
        self.index = 0
        self.conn: _Conn | None = None
        self.parser: ResponseParser | None = None
        self.out = memoryview(b"")
        self.phase = _RESOLVE
        self.decision: Decision | None = None
        self.budget = 0
        self.read_timeout = 0.0
        self.due = 0.0  # when the current wait ends
        self.queued: float | None = None  # the time of this task's live heap entry
        self.stale_retried = False


class MultiplexFetcher:
    """Many attempts over non-blocking connections, driven by one loop thread.

    :meth:`submit` is thread-safe and returns at once; ``on_done(record)`` is called exactly
    once per job, from the loop for a failed (or handed back) record and from a finisher
    thread for an ok one, whose temp file is then closed (fsynced first with ``sync_temp``).
    ``config.threads`` bounds the attempts at once (within the descriptor budget,
    :func:`~fetchpool.fetch.client.fd_budget`); more wait, before their clock starts.
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
        import selectors

        self._config = config
        self._tmp_dir = Path(tmp_dir)
        self._sync = sync_temp
        self._clock = clock
        self._guard = guard or AddressGuard(config.allow_private_networks, config.allow_cidrs)
        self._policy = Policy(config, hand_back_redirects=hand_back_redirects)
        self._concurrent, idle_budget = fd_budget(config.threads)
        self._tls: ssl.SSLContext | None = None
        self._selector: selectors.BaseSelector = selectors.DefaultSelector()
        self._idle: IdleConnections[_Conn] = IdleConnections(idle_budget)
        self._heap: list[tuple[float, int, _Task]] = []
        self._seq = 0
        self._active: set[_Task] = set()
        self._held = 0  # slots taken: attempts under way, and ok bodies not yet closed
        self._pending: deque[tuple[Job, Callable[[Record], None]]] = deque()
        self._inbox: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._selector.register(self._wake_r, 1, None)  # EVENT_READ
        self._resolvers = ThreadPoolExecutor(RESOLVER_THREADS, thread_name_prefix="resolve")
        low, high = FINISHER_THREADS
        finishers = max(low, min(high, self._concurrent // FINISHER_SHARE))
        self._finishers = ThreadPoolExecutor(finishers, thread_name_prefix="finish")
        self._lane: ThreadPoolExecutor | None = None
        self._blocking: HttpFetcher | None = None
        self._lane_lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fetch-loop", daemon=True)
        self._thread.start()

    # -- from any thread ---------------------------------------------------------------------

    def submit(self, job: Job, on_done: Callable[[Record], None]) -> None:
        """Start an attempt at ``job`` (or queue it until a slot is free)."""
        self._post(lambda: self._admit(job, on_done))

    def close(self, *, wait: bool = True) -> None:
        """Stop: attempts under way are abandoned (their temp files removed, nothing more
        delivered), connections closed. ``wait``: until the finisher threads are done."""
        if not self._thread.is_alive():
            return
        self._post(self._stop)
        self._thread.join()
        self._resolvers.shutdown(wait=False, cancel_futures=True)
        self._finishers.shutdown(wait=wait, cancel_futures=not wait)
        with self._lane_lock:
            lane, blocking = self._lane, self._blocking
        if lane is not None:
            lane.shutdown(wait=wait, cancel_futures=True)
        if blocking is not None:
            blocking.close()

    def _post(self, call: Callable[[], None]) -> None:
        self._inbox.append(call)
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):  # a full socket buffer wakes it already
                self._wake_w.send(b"\0")

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        selector, heap, clock = self._selector, self._heap, self._clock
        while not self._stopping:
            timeout = None
            if heap:
                timeout = max(0.0, heap[0][0] - clock())
            for key, mask in selector.select(timeout):
                conn = key.data
                if conn is None:
                    self._drain_wake()
                    continue
                try:
                    self._ready(conn, mask)
                except Exception:  # a bug must cost one item, never the loop
                    log.exception("internal error in the fetch loop")
                    self._crash(conn.task)
            inbox = self._inbox
            while inbox:
                try:
                    inbox.popleft()()
                except Exception:
                    log.exception("internal error in the fetch loop")
            if heap:
                self._expire(clock())
        self._teardown()

    def _drain_wake(self) -> None:
        """Read the wake-up bytes, then clear the flag: in this order, a poster that saw the
        flag set has its call in the inbox before the loop reads it (after this), and one
        that sees it clear sends a byte that the next ``select`` finds."""
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        self._woken = False

    def _stop(self) -> None:
        self._stopping = True

    def _teardown(self) -> None:
        for task in list(self._active):
            self._close_conn(task)
            task.attempt.discard()
            task.phase = _DONE
        self._active.clear()
        self._pending.clear()
        for conn in self._idle.clear():
            self._unregister(conn)
            conn.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _admit(self, job: Job, on_done: Callable[[Record], None]) -> None:
        if self._held >= self._concurrent:
            self._pending.append((job, on_done))
            return
        self._held += 1
        self._start(job, on_done)

    def _release_slot(self) -> None:
        self._held -= 1
        while self._pending and self._held < self._concurrent:
            job, on_done = self._pending.popleft()
            self._held += 1
            self._start(job, on_done)

    def _start(self, job: Job, on_done: Callable[[Record], None]) -> None:
        sink = _LoopSink(self._tmp_dir, sync=self._sync)
        attempt = Attempt(self._policy, job, clock=self._clock, sink=sink)
        task = _Task(attempt, sink, on_done)
        self._active.add(task)
        self._wait(task, attempt.deadline)  # the total deadline, whatever the phase
        self._guarded(task, lambda: self._send(task, attempt.start()))

    def _guarded(self, task: _Task, step: Callable[[], None]) -> None:
        """Run ``step`` of ``task``; what it raises ends the attempt, as the blocking
        fetcher and ``fetch_and_publish`` record it."""
        try:
            step()
        except FetchError as exc:
            self._close_conn(task)
            task.attempt.fail(exc)
            self._complete(task)
        except FetchpoolError as exc:  # a full disk, an unusable temp folder
            self._close_conn(task)
            task.attempt.discard()
            code = ErrorCode.DISK_FULL if isinstance(exc, DiskFullError) else ErrorCode.IO_ERROR
            task.attempt.record = Record.for_job(task.attempt.job).fail(code, str(exc))
            self._complete(task)
        except Exception as exc:
            log.exception("internal error fetching item %d", task.attempt.job.position)
            self._close_conn(task)
            task.attempt.discard()
            record = Record.for_job(task.attempt.job).fail(ErrorCode.INTERNAL_ERROR, repr(exc))
            task.attempt.record = record
            self._complete(task)

    def _crash(self, task: _Task | None) -> None:
        if task is not None and task.phase != _DONE:
            self._guarded(task, _raise_internal)

    # -- deadlines ---------------------------------------------------------------------------

    def _wait(self, task: _Task, until: float) -> None:
        """The current wait of ``task`` ends at ``until`` (never after its total deadline)."""
        until = min(until, task.attempt.deadline)
        task.due = until
        if task.queued is None or until < task.queued:
            self._seq += 1
            heapq.heappush(self._heap, (until, self._seq, task))
            task.queued = until

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, task = heapq.heappop(heap)
            if task.queued != when:
                continue  # superseded by an earlier entry
            task.queued = None
            if task.phase in (_DONE, _LANE):
                continue
            if task.due > now:  # the wait moved later: queue it again
                self._seq += 1
                heapq.heappush(heap, (task.due, self._seq, task))
                task.queued = task.due
                continue
            self._guarded(task, partial(self._timed_out, task))

    def _timed_out(self, task: _Task) -> None:
        attempt, phase = task.attempt, task.phase
        if phase == _DRAIN:  # as the blocking drain: give up on the connection
            self._close_conn(task)
            self._decided(task)
            return
        if attempt.expired():
            if phase == _BODY:
                raise attempt.body_error(TimeoutError(), cut_off=True)
            raise attempt.wire_error(TimeoutError(), cut_off=True)
        host = task.request.target.host if task.request is not None else ""
        if phase == _CONNECT:
            ip = str(task.addresses[task.index])
            self._connect_failed(
                task,
                WireError(
                    ErrorCode.CONNECT_TIMEOUT,
                    f"connect timed out: connection to {host} ({ip}) timed out",
                ),
            )
        elif phase == _TLS:
            raise attempt.wire_error(
                WireError(
                    ErrorCode.CONNECT_TIMEOUT, f"connect timed out: TLS handshake with {host}"
                )
            )
        elif phase == _SEND:
            raise attempt.wire_error(WireError(ErrorCode.READ_TIMEOUT, "write timed out"))
        elif phase == _BODY:
            raise attempt.body_error(WireError(ErrorCode.READ_TIMEOUT, "read timed out"))
        else:  # the head
            raise attempt.wire_error(WireError(ErrorCode.READ_TIMEOUT, "read timed out"))

    # -- a request: resolve, connect ---------------------------------------------------------

    def _send(self, task: _Task, request: Request) -> None:
        task.request = request
        if request.proxy is not None:
            self._to_lane(task, request)
            return
        task.phase = _RESOLVE
        self._wait(task, task.attempt.deadline)  # a slow resolver: the total deadline only
        target = request.target
        addresses = self._guard.resolve_cached(target.host, target.port)
        if addresses is not None:
            self._resolved(task, addresses)
            return
        guard, post = self._guard, self._post

        def resolve() -> None:
            try:
                found = guard.resolve(target.host, target.port)
            except FetchError as exc:
                failure = exc
                post(lambda: self._resolve_failed(task, request, failure))
                return
            post(lambda: self._resolve_done(task, request, found))

        self._resolvers.submit(resolve)

    def _resolve_done(self, task: _Task, request: Request, found: list[Address]) -> None:
        if task.phase == _RESOLVE and task.request is request:
            self._guarded(task, lambda: self._resolved(task, found))

    def _resolve_failed(self, task: _Task, request: Request, exc: FetchError) -> None:
        if task.phase == _RESOLVE and task.request is request:
            self._guarded(task, lambda: _raise(exc))

    def _resolved(self, task: _Task, addresses: list[Address]) -> None:
        task.addresses = addresses
        task.index = 0
        task.stale_retried = False
        self._open(task)

    def _key(self, task: _Task) -> Key:
        request = task.request
        assert request is not None
        target = request.target
        return (target.scheme, target.host.lower(), target.port, str(task.addresses[task.index]))

    def _open(self, task: _Task) -> None:
        """A connection for the task's current address: an idle one, else a new one."""
        connect_timeout, task.read_timeout = task.attempt.timeouts()
        key = self._key(task)
        while (conn := self._idle.take(key)) is not None:
            if conn.dropped():
                self._unregister(conn)
                conn.close()
                continue
            conn.reused = True
            self._exchange(task, conn)
            return
        self._connect(task, key, connect_timeout)

    def _connect(self, task: _Task, key: Key, timeout: float) -> None:
        try:
            sock, err = transport.start_connect(key[3], key[2], SOCKET_OPTIONS)
        except OSError as exc:
            self._connect_failed(task, _connect_error(key, exc))
            return
        conn = _Conn(sock, key, key[0] == "https")
        conn.task = task
        task.conn = conn
        if err == 0:
            self._connected(task)
            return
        if err not in _IN_PROGRESS:
            self._close_conn(task)
            self._connect_failed(task, _connect_error(key, OSError(err, os.strerror(err))))
            return
        task.phase = _CONNECT
        self._watch(conn, 2)  # EVENT_WRITE: the connect's outcome
        self._wait(task, self._clock() + timeout)

    def _connect_failed(self, task: _Task, exc: WireError) -> None:
        """Another address of the same (checked) name may work: dual-stack hosts with a
        broken IPv6 route are common. Anything past connecting is final."""
        self._close_conn(task)
        error = task.attempt.wire_error(exc)
        if error.code is ErrorCode.CONNECT_ERROR and task.index + 1 < len(task.addresses):
            task.index += 1
            self._open(task)
            return
        raise error

    def _connected(self, task: _Task) -> None:
        conn = task.conn
        assert conn is not None
        if conn.tls:
            self._start_tls(task, conn)
        else:
            self._exchange(task, conn)

    def _start_tls(self, task: _Task, conn: _Conn) -> None:
        request = task.request
        assert request is not None
        self._unregister(conn)  # wrap_socket takes the descriptor over
        try:
            context = self._tls_context()
            conn.sock = context.wrap_socket(
                conn.sock,
                server_hostname=request.target.host.strip("[]"),
                do_handshake_on_connect=False,
            )
        except (OSError, ValueError) as exc:
            raise task.attempt.wire_error(
                WireError(ErrorCode.TLS_ERROR, f"TLS error: {exc}")
            ) from exc
        task.phase = _TLS
        connect_timeout, _ = task.attempt.timeouts()
        self._wait(task, self._clock() + connect_timeout)
        self._handshake(task, conn)

    def _handshake(self, task: _Task, conn: _Conn) -> None:
        import ssl

        sock: ssl.SSLSocket = conn.sock  # type: ignore[assignment]
        host = conn.key[1]
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, 1)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, 2)
            return
        except ssl.SSLCertVerificationError as exc:
            raise task.attempt.wire_error(_verify_error(exc)) from exc
        except (ssl.SSLEOFError, ConnectionError) as exc:
            raise task.attempt.wire_error(
                WireError(
                    ErrorCode.CONNECT_ERROR,
                    f"cannot connect: TLS handshake with {host} aborted: {exc}",
                )
            ) from exc
        except ssl.SSLError as exc:
            raise task.attempt.wire_error(_tls_error(exc)) from exc
        except OSError as exc:
            raise task.attempt.wire_error(
                WireError(
                    ErrorCode.CONNECT_ERROR, f"cannot connect: TLS handshake with {host}: {exc}"
                )
            ) from exc
        self._exchange(task, conn)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # at first use: a plain-HTTP run never loads the trust store
            config = self._config
            self._tls = tls_context(
                insecure=config.insecure,
                ca_data=config.ca_pem[1] if config.ca_pem is not None else None,
                ca_directory=config.ca_directory,
            )
        return self._tls

    # -- an exchange: send, the head ---------------------------------------------------------

    def _exchange(self, task: _Task, conn: _Conn) -> None:
        request = task.request
        assert request is not None
        conn.task = task
        task.conn = conn
        task.parser = ResponseParser(request.header_budget)
        task.out = memoryview(request.data)
        task.phase = _SEND
        self._wait(task, self._clock() + task.read_timeout)
        self._sending(task, conn)

    def _sending(self, task: _Task, conn: _Conn) -> None:
        import ssl

        out = task.out
        try:
            while out:
                sent = conn.sock.send(out)
                out = out[sent:]
        except (BlockingIOError, ssl.SSLWantWriteError):
            task.out = out
            self._watch(conn, 2)
            return
        except ssl.SSLWantReadError:
            task.out = out
            self._watch(conn, 1)
            return
        except OSError as exc:
            if conn.reused:  # closed (or its TLS session ended) while it sat in the pool
                self._stale(task)
                return
            if isinstance(exc, ssl.SSLError):
                raise task.attempt.wire_error(_tls_error(exc)) from exc
            raise task.attempt.wire_error(protocol_error(f"connection aborted: {exc}")) from exc
        task.out = memoryview(b"")
        task.phase = _HEAD
        self._watch(conn, 1)
        self._wait(task, self._clock() + task.read_timeout)
        if conn.tls and conn.sock.pending():  # type: ignore[attr-defined]
            self._readable(task, conn)

    def _stale(self, task: _Task) -> None:
        """A reused connection died before answering: drop it and its idle siblings (likely
        closed at the same time), and send once more on a new connection."""
        conn = task.conn
        assert conn is not None
        self._close_conn(task)
        for sibling in self._idle.pop_key(conn.key):
            self._unregister(sibling)
            sibling.close()
        if task.stale_retried:  # a new connection is never stale; defensive only
            raise protocol_error("server closed the connection without a response")
        task.stale_retried = True
        connect_timeout, task.read_timeout = task.attempt.timeouts()
        self._connect(task, conn.key, connect_timeout)

    def _ready(self, conn: _Conn, mask: int) -> None:
        task = conn.task
        if task is None:  # idle and readable: closed by the server, or unasked-for bytes
            self._drop_idle(conn)
            return
        phase = task.phase
        if phase == _CONNECT:
            self._guarded(task, lambda: self._connect_done(task, conn))
        elif phase == _TLS:
            self._guarded(task, lambda: self._handshake(task, conn))
        elif phase == _SEND:
            self._guarded(task, lambda: self._sending(task, conn))
        else:
            self._guarded(task, lambda: self._readable(task, conn))

    def _connect_done(self, task: _Task, conn: _Conn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(task, _connect_error(conn.key, OSError(err, os.strerror(err))))
            return
        self._connected(task)

    def _recv(self, task: _Task, conn: _Conn, size: int) -> bytes | None:
        """One read: bytes, ``b""`` at the end of the stream, None when nothing is there."""
        import ssl

        try:
            return conn.sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self._watch(conn, 3)
            return None
        except OSError as exc:
            if isinstance(exc, ssl.SSLError):
                raise _tls_error(exc) from exc
            raise protocol_error(f"connection broken: {exc}") from exc

    def _readable(self, task: _Task, conn: _Conn) -> None:
        phase = task.phase
        if phase == _HEAD:
            self._read_head(task, conn)
        elif phase == _BODY:
            self._read_body(task, conn)
        elif phase == _DRAIN:
            self._read_drain(task, conn)

    def _read_head(self, task: _Task, conn: _Conn) -> None:
        parser = task.parser
        assert parser is not None
        attempt = task.attempt
        while True:
            try:
                data = self._recv(task, conn, parser.want(HEAD_READ))
            except WireError as exc:
                if conn.reused and not parser.received:
                    self._stale(task)
                    return
                raise attempt.wire_error(exc) from exc
            if data is None:
                break
            if data:
                parser.feed(data)
            elif conn.reused and not parser.received:
                self._stale(task)
                return
            else:
                parser.feed_eof()
            try:
                head = parser.next_head()
            except WireError as exc:
                raise attempt.wire_error(exc) from exc
            if head is not None:
                self._on_head(task, conn, head)
                return
            if not data or not (conn.tls and conn.sock.pending()):  # type: ignore[attr-defined]
                break
        self._wait(task, self._clock() + task.read_timeout)

    def _on_head(self, task: _Task, conn: _Conn, head: Head) -> None:
        parser = task.parser
        assert parser is not None
        decision = task.attempt.on_head(_Head(head, parser))
        task.decision = decision
        if isinstance(decision, Accept):
            task.phase = _BODY
            self._wait(task, self._clock() + task.read_timeout)
            self._pump_body(task)
            return
        if decision.drain:
            task.phase = _DRAIN
            task.budget = ERROR_BODY_LIMIT
            self._wait(task, self._clock() + self._config.read_timeout)
            self._pump_drain(task)
            return
        self._close_conn(task)
        self._decided(task)

    def _decided(self, task: _Task) -> None:
        """The unwanted body is drained (or its connection closed): carry the decision out."""
        decision = task.decision
        task.decision = None
        if isinstance(decision, Refuse):
            raise decision.error
        if isinstance(decision, HandBack):
            self._complete(task)
            return
        assert isinstance(decision, Follow)
        self._send(task, decision.request)

    # -- bodies ------------------------------------------------------------------------------

    def _read_body(self, task: _Task, conn: _Conn) -> None:
        parser = task.parser
        assert parser is not None
        attempt = task.attempt
        while True:
            try:
                data = self._recv(task, conn, parser.want(CHUNK_SIZE))
            except WireError as exc:
                raise attempt.body_error(exc) from exc
            if data is None:
                break
            if data:
                parser.feed(data)
            else:
                parser.feed_eof()
            if not self._pump_body(task):
                return
            if not data or not (conn.tls and conn.sock.pending()):  # type: ignore[attr-defined]
                break
        self._wait(task, self._clock() + task.read_timeout)

    def _pump_body(self, task: _Task) -> bool:
        """Feed the attempt what the parser holds; False once the body ended."""
        parser, attempt = task.parser, task.attempt
        assert parser is not None
        while True:
            if attempt.expired():  # as the blocking driver's next read: no time left
                attempt.read_timeout()
            try:
                chunk = parser.read(CHUNK_SIZE)
            except WireError as exc:
                raise attempt.body_error(exc) from exc
            if chunk is None:
                return True
            if not chunk:
                attempt.finish()
                self._release_conn(task)
                self._complete(task)
                return False
            attempt.on_body(chunk)

    def _read_drain(self, task: _Task, conn: _Conn) -> None:
        parser = task.parser
        assert parser is not None
        try:
            data = self._recv(task, conn, parser.want(min(CHUNK_SIZE, task.budget)))
        except WireError:
            data = b""
            self._close_conn(task)
            self._decided(task)
            return
        if data is None:
            return
        if data:
            parser.feed(data)
        else:
            parser.feed_eof()
        self._pump_drain(task)

    def _pump_drain(self, task: _Task) -> None:
        parser = task.parser
        assert parser is not None
        while True:
            if task.attempt.expired():
                self._close_conn(task)
                self._decided(task)
                return
            try:
                chunk = parser.read(min(CHUNK_SIZE, task.budget))
            except WireError:
                self._close_conn(task)
                self._decided(task)
                return
            if chunk is None:
                return
            if not chunk:
                self._release_conn(task)
                self._decided(task)
                return
            task.budget -= len(chunk)
            if task.budget <= 0:
                self._close_conn(task)
                self._decided(task)
                return

    # -- connections -------------------------------------------------------------------------

    def _watch(self, conn: _Conn, events: int) -> None:
        if conn.events == events:
            return
        if conn.events:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)
        conn.events = events

    def _unregister(self, conn: _Conn) -> None:
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0

    def _close_conn(self, task: _Task) -> None:
        conn, task.conn = task.conn, None
        if conn is not None:
            conn.task = None
            self._unregister(conn)
            conn.close()

    def _release_conn(self, task: _Task) -> None:
        """Keep the connection when its answer was read to the end and the server allows
        it (:class:`~fetchpool.fetch.idle.IdleConnections`: at most ``per_host`` idle per
        key, the descriptor budget's share over all keys); close it otherwise."""
        conn, parser = task.conn, task.parser
        if conn is None or parser is None or not parser.reusable:
            self._close_conn(task)
            return
        task.conn = None
        conn.task = None
        self._watch(conn, 1)  # an idle connection that turns readable is dropped
        for closed in self._idle.put(conn.key, conn, self._config.per_host):
            self._unregister(closed)
            closed.close()

    def _drop_idle(self, conn: _Conn) -> None:
        self._idle.remove(conn.key, conn)
        self._unregister(conn)
        conn.close()

    # -- the end of an attempt ---------------------------------------------------------------

    def _complete(self, task: _Task) -> None:
        if task.phase == _DONE:
            return
        task.phase = _DONE
        self._active.discard(task)
        record = task.attempt.record
        record.finished = time.time()
        fd = task.sink.detach()
        on_done, sync = task.on_done, task.sink.sync
        # The deadline heap keeps a finished task until its entries come due (up to the total
        # timeout): it must keep nothing else alive (a W4 run held 650 MB of them).
        task.parser = task.request = task.decision = None
        task.out = memoryview(b"")
        task.on_done = _ignore
        self._prune()
        if fd < 0 or record.temp_path is None:
            self._release_slot()
            self._deliver(on_done, record)
            return
        self._finishers.submit(self._finish, record, fd, sync, on_done)

    def _prune(self) -> None:
        """Drop the heap's dead entries (finished tasks, superseded waits) once they
        outnumber the live ones: the heap stays proportional to the attempts under way."""
        heap = self._heap
        if len(heap) > 4 * len(self._active) + 1024:
            heap[:] = [e for e in heap if e[2].phase != _DONE and e[2].queued == e[0]]
            heapq.heapify(heap)

    def _finish(
        self, record: Record, fd: int, sync: bool, on_done: Callable[[Record], None]
    ) -> None:
        """On a finisher thread: fsync (when asked) and close the body, then hand it over."""
        try:
            if sync:
                os.fsync(fd)
        except OSError as exc:
            error = _local_error(exc)
            code = ErrorCode.DISK_FULL if isinstance(error, DiskFullError) else ErrorCode.IO_ERROR
            with contextlib.suppress(OSError):
                os.unlink(record.temp_path or "")
            record.temp_path = None
            record.fail(code, str(error))
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
            self._post(self._release_slot)
        self._deliver(on_done, record)

    @staticmethod
    def _deliver(on_done: Callable[[Record], None], record: Record) -> None:
        try:
            on_done(record)
        except Exception:
            log.exception("internal error delivering item %d", record.position)

    # -- the proxy lane ----------------------------------------------------------------------

    def _to_lane(self, task: _Task, request: Request) -> None:
        """Carry the attempt on with the blocking driver (HttpFetcher over H1Transport) on
        a thread of the proxy lane; its end comes back to the loop."""
        task.phase = _LANE
        with self._lane_lock:
            if self._blocking is None:
                self._blocking = HttpFetcher(
                    self._config,
                    self._tmp_dir,
                    guard=self._guard,
                    clock=self._clock,
                    sync_temp=self._sync,
                    hand_back_redirects=self._policy.hand_back,
                )
                self._lane = ThreadPoolExecutor(PROXY_LANE_THREADS, thread_name_prefix="proxy")
            blocking, lane = self._blocking, self._lane
        assert lane is not None

        def carry() -> None:
            outcome: BaseException | None = None
            try:
                blocking.resume(task.attempt, request)
            except Exception as exc:  # noqa: BLE001 (the loop records it as its own)
                outcome = exc
            self._post(lambda: self._lane_done(task, outcome))

        lane.submit(carry)

    def _lane_done(self, task: _Task, outcome: BaseException | None) -> None:
        if task.phase != _LANE:
            return
        task.phase = _HEAD  # not _DONE yet: _complete marks it
        if outcome is None:
            self._complete(task)
        else:
            self._guarded(task, lambda: _raise(outcome))


def _connect_error(key: Key, exc: OSError) -> WireError:
    return WireError(ErrorCode.CONNECT_ERROR, f"cannot connect: to {key[1]} ({key[3]}): {exc}")


def _ignore(record: Record) -> None:
    """A finished task's ``on_done``: it was called already."""


def _raise(exc: BaseException) -> None:
    raise exc


def _raise_internal() -> None:
    raise RuntimeError("the fetch loop failed on this item (see the log)")
