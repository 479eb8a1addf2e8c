"""The HTTP fetcher: the blocking driver of one :class:`~fetchpool.fetch.policy.Attempt`.

::

    fetch(job) ─▶ Attempt (policy.py: redirects, credentials, limits, digests; no I/O)
      └─ request ─▶ transport.send: guard.resolve (every address checked) or proxy route
           ─▶ pooled connection pinned to the checked address (fetch.http11) ─▶ head
           ─▶ attempt.on_head: Follow (drain, next request) │ HandBack │ Refuse │ Accept
           │ Accept: read1 ─▶ attempt.on_body (decoded, sha256, size caps, min speed)
           │         ─▶ attempt.finish ─▶ Record (temp file)

The driver owns the waiting: the watchdog holds the attempt's sockets until its total
deadline, each read is bounded by :meth:`Attempt.timeouts`. The transport is a seam
(:class:`~fetchpool.fetch.transport.Transport`): :class:`H1Transport` by default, the
in-library :class:`~fetchpool.fetch.mock.MockTransport` in tests, under the same policy.

Failures become a failed :class:`Record` with a stable :class:`ErrorCode`; the scheduler decides
about retries (``fetchpool.policies``). Only run-level problems raise: a full disk
(:class:`DiskFullError`) or an unusable temp folder (:class:`OutputError`).
"""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from fetchpool.config import FetchConfig
from fetchpool.errors import FetchError
from fetchpool.fetch.guard import AddressGuard
from fetchpool.fetch.http11 import ConnectionPool, Key, Response, Via, WireError
from fetchpool.fetch.policy import (
    CHUNK_SIZE,
    ERROR_BODY_LIMIT,
    HEADER_VALUE_LIMIT,
    Accept,
    Attempt,
    BodySink,
    HandBack,
    Policy,
    Refuse,
    Request,
    TempFileSink,
    clean_header_value,
)
from fetchpool.fetch.transport import Transport, Watch, Watchdog, WireResponse
from fetchpool.models import ErrorCode, Job, Record

__all__ = [
    "CHUNK_SIZE",
    "ERROR_BODY_LIMIT",
    "HEADER_VALUE_LIMIT",
    "H1Transport",
    "HttpFetcher",
    "clean_header_value",
]

#: Idle keep-alive connections kept at most, over all hosts; the least recently used go first.
MAX_IDLE = 1024
#: File descriptors left for everything but fetches: the journal (db, WAL, shm, lock), the
#: run's directory fsyncs, logs, stdio and the image stage's pipes.
FD_RESERVE = 64


class HttpFetcher:
    """:class:`fetchpool.stages.Fetcher` over HTTP(S); safe to share between threads.

    ``tmp_dir`` receives the temp files (same filesystem as the output). ``guard`` defaults to
    one built from ``config``; ``clock`` is the monotonic clock used for deadlines and speed.
    ``sync_temp``: fsync each body before closing it (``record.temp_synced``), for a writer
    that names the temp file as it is: one fsync on the open file instead of the writer's
    open, fsync, close later. ``hand_back_redirects``: stop at a redirect to another host
    and return the record with ``moved_to`` set (:class:`~fetchpool.models.Hop`), for a
    scheduler that keeps per-host limits; the job's ``hop`` then resumes there.
    ``transport``: what moves the bytes (default: :class:`H1Transport`, HTTP/1.1 over the
    guard); the policy above it is the same for any. ``sink``: makes each accepted body's
    sink (default: a :class:`~fetchpool.fetch.policy.TempFileSink` in ``tmp_dir``).
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
        transport: Transport | None = None,
        sink: Callable[[], BodySink] | None = None,
    ) -> None:
        self._config = config
        self._sync_temp = sync_temp
        self._tmp_dir = Path(tmp_dir)
        self._clock = clock
        self._watchdog = Watchdog(clock)
        self._policy = Policy(config, hand_back_redirects=hand_back_redirects)
        # Fetches wait here, before their attempt's clock starts, when the transport would
        # run out of something: the HTTP/1.1 wire's descriptors (more fetches than the
        # budget would fail items with EMFILE, RELIABILITY.md case 42). A transport given
        # by the caller (the mock opens no descriptor) brings its own limits.
        self._slots: AbstractContextManager[object] = contextlib.nullcontext()
        if transport is None:
            concurrent, idle = fd_budget(config.threads)
            self._slots = threading.BoundedSemaphore(concurrent)
            guard = guard or AddressGuard(config.allow_private_networks, config.allow_cidrs)
            transport = H1Transport(config, guard, concurrent=concurrent, idle=idle)
        self._transport = transport
        self._sink = sink

    def fetch(self, job: Job) -> Record:
        """Make one attempt at ``job.url`` (redirects followed); never raises for the item."""
        with self._slots:
            made = self._sink
            sink = TempFileSink(self._tmp_dir, sync=self._sync_temp) if made is None else made()
            attempt = Attempt(self._policy, job, clock=self._clock, sink=sink)
            try:
                request = attempt.start()
                with self._watchdog.watch(attempt.deadline) as watch:
                    self._drive(attempt, request, watch)
            except FetchError as exc:
                attempt.fail(exc)
            except BaseException:
                attempt.discard()
                raise
            finally:
                attempt.record.finished = time.time()
            return attempt.record

    def resume(self, attempt: Attempt, request: Request) -> None:
        """Carry ``attempt`` on from ``request`` (made by another driver) until it ends; raises
        :class:`FetchError` as :meth:`fetch` records it. The multiplexed driver hands a
        request through a proxy to this blocking driver (:mod:`fetchpool.fetch.multiplex`)."""
        with self._watchdog.watch(attempt.deadline) as watch:
            self._drive(attempt, request, watch)

    def close(self) -> None:
        """Close every pooled connection and stop the deadline watchdog."""
        self._watchdog.close()
        self._transport.close()

    def _drive(self, attempt: Attempt, request: Request, watch: Watch) -> None:
        """Send requests and carry out the attempt's decisions until it ends (or raises)."""
        while True:
            response = self._transport.send(request, attempt, watch)
            try:
                decision = attempt.on_head(response)
            except BaseException:
                response.close()
                raise
            if isinstance(decision, Accept):
                self._receive(response, attempt, watch)
                return
            if decision.drain:
                self._drain(response, attempt, watch)
            else:
                response.close()
            if isinstance(decision, Refuse):
                raise decision.error
            if isinstance(decision, HandBack):
                return
            request = decision.request

    def _receive(self, response: WireResponse, attempt: Attempt, watch: Watch) -> None:
        """Read the accepted body into the attempt; the connection is kept only when the
        body was read to its end."""
        try:
            while True:
                # Narrowed per read, so every blocking recv ends by the attempt's deadline.
                response.set_timeout(attempt.read_timeout())
                try:
                    # read1: what has arrived (one recv at most), so that the deadline and
                    # speed checks run between reads, even on a body that trickles in.
                    chunk = response.read1(CHUNK_SIZE)
                except (WireError, OSError, ValueError) as exc:
                    raise attempt.body_error(exc, cut_off=watch.expired) from exc
                if not chunk:
                    break
                attempt.on_body(chunk)
            attempt.finish(cut_off=watch.expired)
        except BaseException:
            response.close()
            raise
        response.release()

    def _drain(self, response: WireResponse, attempt: Attempt, watch: Watch) -> None:
        """Read a small unwanted body so the connection can be reused; else close it."""
        budget = ERROR_BODY_LIMIT
        config = self._config
        try:
            while budget > 0 and not attempt.expired(cut_off=watch.expired):
                left = attempt.deadline - self._clock()
                response.set_timeout(min(config.read_timeout, left))
                chunk = response.read1(min(CHUNK_SIZE, budget))
                if not chunk:
                    response.release()
                    return
                budget -= len(chunk)
        except (WireError, OSError, ValueError):
            pass
        response.close()


class H1Transport:
    """:class:`~fetchpool.fetch.transport.Transport` over HTTP/1.1: the guard checks every
    hop's addresses (after DNS) and the pool connects only to those, or to the proxy that
    the request's route names. ``concurrent`` fetches at once; at most ``idle`` keep-alive
    connections are kept between requests, over all hosts.
    """

    def __init__(
        self, config: FetchConfig, guard: AddressGuard, *, concurrent: int, idle: int
    ) -> None:
        self._guard = guard
        self._pool = ConnectionPool(
            per_host=config.per_host,
            max_idle=idle,
            insecure=config.insecure,
            shared_idle=concurrent,  # one proxy connection per fetch (fetchpool.proxies)
            ca_data=config.ca_pem[1] if config.ca_pem is not None else None,
            ca_directory=config.ca_directory,
        )

    def close(self) -> None:
        self._pool.clear()

    def send(self, request: Request, attempt: Attempt, watch: Watch | None) -> Response:
        if request.proxy is not None:
            return self._send_via(request, attempt, watch)
        target = request.target
        addresses = self._guard.resolve(target.host, target.port)
        last: FetchError | None = None
        for address in addresses:
            try:
                return self._exchange(request, str(address), attempt, watch)
            except FetchError as exc:
                # Another address of the same (checked) name may work: dual-stack hosts with
                # a broken IPv6 route are common. Anything past connecting is final.
                if exc.code is not ErrorCode.CONNECT_ERROR:
                    raise
                last = exc
        assert last is not None  # resolve() never returns an empty list
        raise last

    def _send_via(self, request: Request, attempt: Attempt, watch: Watch | None) -> Response:
        """The request through its proxy (docs/security.md, "Proxies"). The guard checks
        the target as if connecting to it, before anything is sent; the proxy is sent the
        name. With every address allowed there is nothing to check, and the name is not
        resolved here at all (as curl: the proxy may be the only one that can)."""
        proxy, target = request.proxy, request.target
        assert proxy is not None
        if not self._guard.allow_private_networks:
            self._guard.resolve(target.host, target.port)
        try:
            addresses = self._guard.lookup(proxy.host, proxy.port)  # the user's choice
        except FetchError as exc:
            raise FetchError(exc.code, f"proxy {proxy.shown}: {exc.message}") from exc
        last: FetchError | None = None
        for address in addresses:
            via = Via(proxy.shown, str(address), proxy.port, request.proxy_headers)
            try:
                return self._exchange(request, "", attempt, watch, via)
            except FetchError as exc:
                if exc.code is not ErrorCode.CONNECT_ERROR:
                    raise
                last = exc
        assert last is not None  # lookup() never returns an empty list
        raise last

    def _exchange(
        self,
        request: Request,
        ip: str,
        attempt: Attempt,
        watch: Watch | None,
        via: Via | None = None,
    ) -> Response:
        connect_timeout, read_timeout = attempt.timeouts()
        target = request.target
        key: Key = (target.scheme, target.host.lower(), target.port, ip)
        if via is not None:
            route = f"via {via.address}:{via.port}"
            if target.scheme == "https":  # a tunnel is one target's
                key = (target.scheme, target.host.lower(), target.port, route)
            else:  # a plain connection to the proxy carries requests for any target
                key = ("http", "", 0, route)
        try:
            return self._pool.request(
                key,
                request.data,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                header_budget=request.header_budget,
                via=via,
                watch=watch,
            )
        except (WireError, OSError, ValueError) as exc:
            cut_off = watch is not None and watch.expired
            raise attempt.wire_error(exc, cut_off=cut_off) from exc


# -- helpers ----------------------------------------------------------------------------------


def fd_budget(threads: int, soft_limit: int | None = None) -> tuple[int, int]:
    """(fetches at once, idle keep-alive connections kept) that fit in ``ulimit -n``
    (``soft_limit``).

    A fetch holds a socket and a temp file; every idle keep-alive connection holds a socket.
    Two thirds of the spare descriptors go to fetches, the rest to idle connections, never
    fewer than one of each, and never more idle ones than :data:`MAX_IDLE` (each costs
    memory, a TLS one tens of kilobytes). The idle budget is counted in connections over all
    hosts, not in hosts times ``per_host``: a run over hundreds of hosts keeps a few idle
    connections for each instead of ``per_host`` for the few it touched last (which, with a
    tight ``ulimit -n``, lost keep-alive on every host but those).
    """
    if soft_limit is None:
        soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY or soft_limit < 0:
        return threads, MAX_IDLE
    spare = max(0, soft_limit - FD_RESERVE)
    concurrent = max(1, min(threads, spare // 3))
    idle = max(1, min(MAX_IDLE, spare - 2 * concurrent))
    return concurrent, idle
