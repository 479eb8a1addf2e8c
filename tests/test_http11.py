"""The HTTP/1.1 wire layer under HttpFetcher: framing, tolerance, and connection reuse.

Everything talks to a raw-socket server on loopback (tests/socketserver_faults.py), so each
case controls the exact bytes on the wire.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fetchpool.config import FetchConfig
from fetchpool.errors import ConfigError
from fetchpool.fetch import HttpFetcher
from fetchpool.fetch.h1 import ResponseParser
from fetchpool.fetch.http11 import Connection, ConnectionPool, WireError
from fetchpool.fetch.transport import Watchdog
from fetchpool.models import ErrorCode, Job, Record
from reliability_helpers import make_cert
from socketserver_faults import FaultServer, read_request, response, serve_forever_keepalive

CONFIG = FetchConfig(
    allow_private_networks=True,
    connect_timeout=1.0,
    read_timeout=1.0,
    total_timeout=5.0,
    min_speed=0,
    max_bytes=1024 * 1024,
)


@pytest.fixture
def fetcher(tmp_path: Path) -> Iterator[HttpFetcher]:
    made = HttpFetcher(CONFIG, tmp_path)
    yield made
    made.close()


def fetch(fetcher: HttpFetcher, server: FaultServer, path: str = "/x") -> Record:
    return fetcher.fetch(Job(position=0, url=server.url(path)))


def body_of(record: Record) -> bytes:
    assert record.ok, (record.error_code, record.error_message)
    assert record.temp_path is not None
    return Path(record.temp_path).read_bytes()


def answering(*payloads: bytes, then: Callable[[socket.socket], None] | None = None):  # type: ignore[no-untyped-def]
    """A handler that answers one request per payload on each connection, then closes."""

    def handler(sock: socket.socket, server: FaultServer) -> None:
        for payload in payloads:
            request = read_request(sock)
            if not request:
                return
            server.record(request)
            sock.sendall(payload)
        if then is not None:
            then(sock)

    return handler


@pytest.mark.parametrize(
    "payload",
    [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        + response(200, b"final"),
        b"HTTP/1.1 200 OK\nContent-Length: 5\nX-Bare-LF: yes\n\nfinal",
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 5\r\n\r\nfinal",
        b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nfinal",  # no reason phrase
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;ext=1\r\nfi\r\n3\r\nnal\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nfinal",  # ends with the connection
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\r\nfinal",  # LF lines, then a CRLF blank line
        b"HTTP/1.1 200 OK\nContent-Length: 9\n\nfi\r\n\r\nnal",  # CRLFCRLF inside the body
    ],
    ids=["interim-1xx", "bare-lf", "obs-fold", "no-reason", "chunked-ext-trailers", "http10",
         "mixed-line-ends", "blank-line-in-body"],
)  # fmt: skip
def test_tolerated_framings(fetcher: HttpFetcher, payload: bytes) -> None:
    with FaultServer(answering(payload)) as server:
        assert body_of(fetch(fetcher, server)).replace(b"\r\n\r\n", b"") == b"final"


@pytest.mark.parametrize(
    "payload",
    [
        b"HTTP/2 200 OK\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",  # closed inside the headers
    ],
    ids=["http2", "4-digit-status", "space-in-name", "negative-length", "negative-chunk",
         "chunk-overrun", "cut-headers"],
)  # fmt: skip
def test_refused_framings(fetcher: HttpFetcher, payload: bytes) -> None:
    with FaultServer(answering(payload)) as server:
        record = fetch(fetcher, server)
    assert record.error_code is ErrorCode.PROTOCOL_ERROR, (record.error_code, record.error_message)


def test_keepalive_closed_by_the_server_is_replaced_transparently(fetcher: HttpFetcher) -> None:
    """The server answers once per connection, then reads the next request and hangs up
    without a word (its keep-alive timeout hit just then): the GET is sent again on a new
    connection instead of failing the item."""
    with FaultServer(answering(response(200, b"one"), then=read_request)) as s:
        assert body_of(fetch(fetcher, s, "/1")) == b"one"
        second = fetch(fetcher, s, "/2")
        assert body_of(second) == b"one"
        assert s.connections == 2


def test_idle_connection_closed_by_the_server_is_not_reused(fetcher: HttpFetcher) -> None:
    with FaultServer(answering(response(200, b"one"))) as server:
        assert body_of(fetch(fetcher, server, "/1")) == b"one"
        time.sleep(0.05)  # the server has closed it by now: the pool's check notices
        assert body_of(fetch(fetcher, server, "/2")) == b"one"
        assert server.connections == 2


def test_bytes_after_the_body_poison_the_connection(fetcher: HttpFetcher) -> None:
    """A server that sends more than the announced body (a second, unasked response) must not
    have those bytes read as the answer to the next request."""
    smuggled = response(200, b"good") + response(200, b"EVIL")
    with FaultServer(answering(smuggled, response(200, b"next"))) as server:
        assert body_of(fetch(fetcher, server, "/1")) == b"good"
        assert body_of(fetch(fetcher, server, "/2")) == b"good"  # a new connection's answer
        assert server.connections == 2


@pytest.mark.parametrize(
    "payload",
    [
        response(200, b"bye", {"Connection": "close"}),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
        b"HTTP/1.1 200 OK\r\n\r\nbye",
    ],
    ids=["connection-close", "http10", "until-close"],
)
def test_connections_the_server_ends_are_not_pooled(fetcher: HttpFetcher, payload: bytes) -> None:
    def close_after(sock: socket.socket) -> None:
        sock.close()

    with FaultServer(answering(payload, then=close_after)) as server:
        assert body_of(fetch(fetcher, server, "/1")) == b"bye"
        assert body_of(fetch(fetcher, server, "/2")) == b"bye"
        assert server.connections == 2


def test_large_body_across_many_reads_is_exact(fetcher: HttpFetcher) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: many recv calls, buffered and not
    with FaultServer(answering(response(200, body))) as server:
        record = fetch(fetcher, server)
    assert record.sha256 == hashlib.sha256(body).hexdigest()
    assert body_of(record) == body


def test_read_timeout_is_enforced_by_the_kernel_timeout() -> None:
    """Plain sockets stay blocking with SO_RCVTIMEO: a stall still ends at read_timeout."""

    def stall(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        server.stopping.wait(5)

    pool = ConnectionPool(per_host=1, max_idle=1, insecure=False)
    with FaultServer(stall) as server:
        request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
        response_ = pool.request(
            ("http", "127.0.0.1", server.port, "127.0.0.1"),
            request,
            connect_timeout=1.0,
            read_timeout=0.3,
            header_budget=65536,
        )
        assert response_.read1(100) == b"ab"
        started = time.monotonic()
        with pytest.raises(WireError) as info:
            response_.read1(100)
        waited = time.monotonic() - started
        response_.close()
    pool.clear()
    assert info.value.code is ErrorCode.READ_TIMEOUT
    assert 0.2 < waited < 3.0


def test_the_idle_budget_is_over_all_hosts_least_recently_used_first() -> None:
    """Many hosts keep a few idle connections each (a budget in connections, not in hosts
    times per_host), the least recently used host's oldest connection goes first, and a host
    whose connections were all taken leaves nothing behind."""
    pool = ConnectionPool(per_host=4, max_idle=5, insecure=False)
    pairs: list[tuple[socket.socket, socket.socket]] = []

    def connection(host: str) -> Connection:
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        return Connection(ours, ("http", host, 80, "127.0.0.1"), 1.0)

    def key(host: str) -> tuple[str, str, int, str]:
        return ("http", host, 80, "127.0.0.1")

    try:
        first = [connection("a"), connection("a")]
        for conn in first:
            pool.put(conn)
        for host in ("b", "c", "d"):
            pool.put(connection(host))
        pool.put(connection("e"))  # the sixth: a's oldest is closed
        assert first[0].sock.fileno() == -1 and first[1].sock.fileno() != -1
        for host in ("a", "b", "c", "d", "e"):  # every host kept one
            taken = pool._take_idle(key(host))
            assert taken is not None and taken.reused
            assert pool._take_idle(key(host)) is None
        assert len(pool._idle) == 0 and pool._idle.clear() == []  # no empty lists left
    finally:
        pool.clear()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


# -- review fixes: TLS deadlines and leftovers, request splitting, framing, CPU -----------------


@pytest.fixture(scope="module")
def tls_server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    cert, key = make_cert(
        tmp_path_factory.mktemp("tls"), "self", cn="127.0.0.1", san="IP:127.0.0.1"
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_total_timeout_stops_a_trickling_https_server(
    tmp_path: Path, tls_server_context: ssl.SSLContext
) -> None:
    """The watchdog holds the TLS socket itself (wrap_socket detaches the TCP one), so a
    server sending one header byte per read timeout is cut at total_timeout."""

    def trickle(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
            if server.stopping.wait(0.3):
                return
            sock.sendall(bytes([byte]))

    config = replace(CONFIG, insecure=True, read_timeout=1.0, total_timeout=1.5)
    fetcher = HttpFetcher(config, tmp_path)
    try:
        with FaultServer(trickle, tls=tls_server_context) as server:
            started = time.monotonic()
            record = fetcher.fetch(Job(position=0, url=server.url("/slow")))
            waited = time.monotonic() - started
    finally:
        fetcher.close()
    assert record.error_code is ErrorCode.TOTAL_TIMEOUT, (record.error_code, record.error_message)
    assert waited < 6.0


def test_tls_bytes_after_the_body_are_never_read_as_the_next_answer(
    tmp_path: Path, tls_server_context: ssl.SSLContext
) -> None:
    """OpenSSL keeps decrypted bytes that poll() cannot see: a stray CRLF after a body (a
    common server bug) must not become the next request's status line."""
    stray = response(200, b"x" * 50_000) + b"\r\n"

    def serve(sock: socket.socket, server: FaultServer) -> None:
        while read_request(sock):
            sock.sendall(stray)

    fetcher = HttpFetcher(replace(CONFIG, insecure=True), tmp_path)
    try:
        with FaultServer(serve, tls=tls_server_context) as server:
            records = [fetcher.fetch(Job(position=n, url=server.url(f"/{n}"))) for n in range(3)]
    finally:
        fetcher.close()
    assert [r.error_code for r in records] == [None, None, None]
    assert server.connections == 3


@pytest.mark.parametrize(
    "change",
    [
        {"user_agent": "ua\r\nX-Injected: 1"},
        {"headers": (("X-A", "v\r\n\r\nGET /second HTTP/1.1"),)},
        {"headers": (("X A", "v"),)},
        {"headers": (("X-Nul", "a\x00b"),)},
        {"accept_encoding": "identity\nX: 1"},
        {"read_timeout": float("inf")},
        {"total_timeout": 1e20},
    ],
)
def test_config_that_could_split_a_request_or_overflow_a_timer_is_refused(
    change: dict[str, object],
) -> None:
    with pytest.raises(ConfigError):
        replace(CONFIG, **change)  # type: ignore[arg-type]


def test_a_tab_and_latin1_in_a_header_value_are_allowed() -> None:
    config = replace(CONFIG, headers=(("X-Note", "caf\u00e9\tok"),))
    assert config.headers == (("X-Note", "caf\u00e9\tok"),)


@pytest.mark.parametrize("size", [b"0x5", b"5_0", b"+5", b" ", b"12345678901234567"])
def test_chunk_sizes_that_int_would_accept_are_refused(fetcher: HttpFetcher, size: bytes) -> None:
    payload = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"
    )
    with FaultServer(answering(payload)) as server:
        record = fetch(fetcher, server)
    assert record.error_code is ErrorCode.PROTOCOL_ERROR, record.error_message


def test_an_error_answer_with_two_framings_does_not_keep_the_connection(
    fetcher: HttpFetcher,
) -> None:
    both = b"HTTP/1.1 404 X\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"

    def by_path(request: bytes) -> bytes:
        return both if request.startswith(b"GET /1 ") else response(200, b"two")

    with FaultServer(serve_forever_keepalive(by_path)) as server:
        assert fetch(fetcher, server, "/1").http_status == 404
        assert body_of(fetch(fetcher, server, "/2")) == b"two"  # answered on a new connection
        assert server.connections == 2


def test_the_pool_hands_a_released_connection_out_of_the_attempts_watch() -> None:
    """The watch reaches the pool as an argument: the socket is under the attempt's deadline
    while its response is read, and out of it once released to the pool, so an expiry then
    leaves the connection (reused by the next request) alone."""
    pool = ConnectionPool(per_host=1, max_idle=1, insecure=False)
    watchdog = Watchdog(time.monotonic)
    try:
        with FaultServer(serve_forever_keepalive(lambda request: response(200, b"ok"))) as s:
            key = ("http", "127.0.0.1", s.port, "127.0.0.1")
            request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n".encode()
            timeouts = {"connect_timeout": 1.0, "read_timeout": 1.0, "header_budget": 65536}
            with watchdog.watch(time.monotonic() + 60) as watch:
                first = pool.request(key, request, watch=watch, **timeouts)  # type: ignore[arg-type]
                assert len(watch._sockets) == 1
                assert first.read1(10) == b"ok" and first.read1(10) == b""
                first.release()
                assert watch._sockets == []
                watch.expire()
            second = pool.request(key, request, **timeouts)  # type: ignore[arg-type]
            assert second.read1(10) == b"ok"
            second.release()
            assert s.connections == 1
    finally:
        watchdog.close()
        pool.clear()


def test_a_pooled_connection_leaves_the_attempts_watch() -> None:
    """After a redirect the first hop's connection is pooled while the attempt goes on: if
    that attempt then expires, the connection (now another attempt's) must be left alone."""
    ours, theirs = socket.socketpair()
    try:
        watchdog = Watchdog(time.monotonic)
        with watchdog.watch(time.monotonic() + 60) as watch:
            watch.attach(ours)
            watch.detach(ours)
            watch.expire()
        watchdog.close()
        theirs.sendall(b"still open")
        assert ours.recv(100) == b"still open"
    finally:
        ours.close()
        theirs.close()


class _TrickleSocket:
    """A socket whose peer sends one byte per read (a unit-test stand-in for the wire)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def recv(self, size: int) -> bytes:
        piece = self._data[self._at : self._at + 1]
        self._at += 1
        return piece

    def settimeout(self, value: float | None) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass


def test_a_head_arriving_byte_by_byte_costs_linear_time() -> None:
    """Each read searches only the new bytes: a 60 KB head in 1-byte reads must not cost
    seconds of CPU (it did, 18 s, when every read rescanned and copied the whole head)."""
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 60_000 + b"\r\nContent-Length: 0\r\n\r\n"
    conn = Connection(_TrickleSocket(head), ("http", "h", 80, "127.0.0.1"), 1.0)  # type: ignore[arg-type]
    started = time.thread_time()
    status, *_ = conn.read_head(ResponseParser(64 * 1024))
    assert status == 200
    assert time.thread_time() - started < 2.0
