"""The non-blocking driver (fetch/multiplex.py) over loopback: plain and TLS downloads, the
timeouts as deadline-heap entries, keep-alive and its stale retry, the guard on every hop,
several addresses in order, the proxy lane. The engine end to end (``--engine multiplexed``)
is every ENGINES-parametrized test's."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fetch_helpers import CONFIG, JPEG
from fetchpool.config import FetchConfig
from fetchpool.fetch import AddressGuard
from fetchpool.fetch.multiplex import MultiplexFetcher
from fetchpool.models import ErrorCode, Job, Record, Status
from forward_proxy import ForwardProxy
from reliability_helpers import make_cert, tls_context
from socketserver_faults import FaultServer, read_request, response, serve_forever_keepalive


@pytest.fixture
def make(tmp_dir: Path) -> Iterator[Callable[..., MultiplexFetcher]]:
    made: list[MultiplexFetcher] = []

    def build(config: FetchConfig = CONFIG, **kwargs: object) -> MultiplexFetcher:
        fetcher = MultiplexFetcher(config, tmp_dir, **kwargs)  # type: ignore[arg-type]
        made.append(fetcher)
        return fetcher

    yield build
    for fetcher in made:
        fetcher.close()


def fetch_all(fetcher: MultiplexFetcher, urls: list[str]) -> list[Record]:
    """Submit every URL at once; their records, in order (each delivered exactly once)."""
    results: dict[int, list[Record]] = {n: [] for n in range(len(urls))}
    done = threading.Semaphore(0)

    def on_done(position: int, record: Record) -> None:
        results[position].append(record)
        done.release()

    for n, url in enumerate(urls):
        fetcher.submit(Job(position=n, url=url), lambda r, n=n: on_done(n, r))  # type: ignore[misc]
    for _ in urls:
        assert done.acquire(timeout=20), "a record was never delivered"
    time.sleep(0.05)  # a second delivery would arrive now
    assert all(len(got) == 1 for got in results.values()), results
    return [results[n][0] for n in range(len(urls))]


def fetch(fetcher: MultiplexFetcher, url: str) -> Record:
    return fetch_all(fetcher, [url])[0]


def ok_body(record: Record) -> bytes:
    assert record.status is Status.OK, (record.error_code, record.error_message)
    assert record.temp_path is not None
    return Path(record.temp_path).read_bytes()


def assert_failed(record: Record, code: ErrorCode, tmp_dir: Path) -> None:
    assert record.status is Status.FAILED, record
    assert record.error_code is code, (record.error_code, record.error_message)
    assert record.temp_path is None
    assert os.listdir(tmp_dir) == [], "a failed fetch must leave no temp file"


def keepalive(body: bytes = JPEG) -> Callable[[socket.socket, FaultServer], None]:
    return serve_forever_keepalive(lambda _: response(200, body, {"Content-Type": "image/jpeg"}))


# -- downloads --------------------------------------------------------------------------------


def test_plain_downloads_share_one_kept_alive_connection(
    make: Callable[..., MultiplexFetcher],
) -> None:
    fetcher = make(sync_temp=True)
    with FaultServer(keepalive()) as server:
        first = fetch(fetcher, server.url("/a.jpg"))
        second = fetch(fetcher, server.url("/b.jpg"))
    assert ok_body(first) == JPEG and ok_body(second) == JPEG
    assert first.temp_synced and first.extension == ".jpg" and first.http_status == 200
    assert first.worker == "fetch-loop", "the attempt ran on the loop thread"
    assert server.connections == 1
    assert [r.split(b"\r\n")[0] for r in server.requests] == [
        b"GET /a.jpg HTTP/1.1",
        b"GET /b.jpg HTTP/1.1",
    ]


def test_many_attempts_at_once_within_the_threads_budget(
    make: Callable[..., MultiplexFetcher],
) -> None:
    fetcher = make(replace(CONFIG, threads=8, per_host=8))
    with FaultServer(keepalive()) as server:
        records = fetch_all(fetcher, [server.url(f"/{n}.jpg") for n in range(60)])
    assert all(ok_body(r) == JPEG for r in records)
    assert server.connections <= 8


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("tls")
    return make_cert(folder, "loopback", cn="localhost", san="DNS:localhost,IP:127.0.0.1")


def test_tls_download_trusts_exactly_what_the_options_say(
    make: Callable[..., MultiplexFetcher], certificate: tuple[str, str], tmp_dir: Path
) -> None:
    with FaultServer(keepalive(), tls=tls_context(certificate)) as server:
        trusted = make(replace(CONFIG, ca_certificate=certificate[0]))
        records = fetch_all(trusted, [server.url("/a.jpg"), server.url("/b.jpg")])
        insecure = fetch(make(replace(CONFIG, insecure=True)), server.url("/c.jpg"))
        assert ok_body(insecure) == JPEG
        os.unlink(insecure.temp_path or "")
        for record in records:
            assert ok_body(record) == JPEG
            os.unlink(record.temp_path or "")
        untrusted = fetch(make(), server.url("/d.jpg"))
        # The name is checked: the certificate names localhost and 127.0.0.1 only.
        guard = AddressGuard(allow_private_networks=True, resolver=lambda h, p: ["127.0.0.1"])
        renamed = make(replace(CONFIG, ca_certificate=certificate[0]), guard=guard)
        other = fetch(renamed, server.url("/e.jpg", host="other.test"))
    assert_failed(untrusted, ErrorCode.TLS_ERROR, tmp_dir)
    assert "--ca-certificate" in (untrusted.error_message or "")
    assert_failed(other, ErrorCode.TLS_ERROR, tmp_dir)
    assert "the certificate names another host" in (other.error_message or "")


# -- timeouts: deadline-heap entries, no watchdog thread ----------------------------------------


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, int]]:
    """A loopback address whose connects hang: a listener with a full accept queue drops
    every further SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield address
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_connect_to_a_black_hole_times_out(
    make: Callable[..., MultiplexFetcher], tmp_dir: Path
) -> None:
    fetcher = make(replace(CONFIG, connect_timeout=0.4))
    start = time.monotonic()
    with black_hole() as (host, port):
        record = fetch(fetcher, f"http://{host}:{port}/x.jpg")
    assert_failed(record, ErrorCode.CONNECT_TIMEOUT, tmp_dir)
    assert record.error_message == f"connect timed out: connection to {host} ({host}) timed out"
    assert 0.35 < time.monotonic() - start < 2


def test_a_server_that_never_answers_is_a_read_timeout(
    make: Callable[..., MultiplexFetcher], tmp_dir: Path
) -> None:
    def hang(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        server.stopping.wait(10)

    start = time.monotonic()
    with FaultServer(hang) as server:
        record = fetch(make(replace(CONFIG, read_timeout=0.3)), server.url("/hang"))
    assert_failed(record, ErrorCode.READ_TIMEOUT, tmp_dir)
    assert record.error_message == "read timed out"
    assert time.monotonic() - start < 2


def drip(head: bytes) -> Callable[[socket.socket, FaultServer], None]:
    def handler(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        sock.sendall(head)
        while not server.stopping.wait(0.1):
            sock.sendall(b"d")

    return handler


@pytest.mark.parametrize(
    ("head", "when"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", "while the body was arriving"),
        (b"HTTP/1.1 200 OK\r\nX-Drip: ", "before the server answered"),
    ],
)
def test_a_trickle_ends_at_the_total_deadline(
    make: Callable[..., MultiplexFetcher], tmp_dir: Path, head: bytes, when: str
) -> None:
    config = replace(CONFIG, read_timeout=1.0, total_timeout=1.0, max_header_bytes=1 << 20)
    start = time.monotonic()
    with FaultServer(drip(head)) as server:
        record = fetch(make(config), server.url("/drip"))
    assert_failed(record, ErrorCode.TOTAL_TIMEOUT, tmp_dir)
    assert record.error_message == f"attempt exceeded total_timeout=1s {when}"
    assert 0.9 < time.monotonic() - start < 2.5


def test_a_trickle_below_min_speed_is_too_slow(
    make: Callable[..., MultiplexFetcher], tmp_dir: Path
) -> None:
    config = replace(CONFIG, min_speed=1000, min_speed_window=0.5)
    with FaultServer(drip(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")) as server:
        record = fetch(make(config), server.url("/drip"))
    assert_failed(record, ErrorCode.TOO_SLOW, tmp_dir)


# -- keep-alive -------------------------------------------------------------------------------


def test_a_kept_connection_that_dies_before_answering_is_retried_once(
    make: Callable[..., MultiplexFetcher],
) -> None:
    answered = threading.Event()

    def handler(sock: socket.socket, server: FaultServer) -> None:
        request = read_request(sock)
        server.record(request)
        if server.connections == 1:
            sock.sendall(response(200, JPEG))
            answered.wait(5)
            server.record(read_request(sock))  # the next request arrives: drop it unanswered
            return
        sock.sendall(response(200, JPEG))
        read_request(sock)

    fetcher = make()
    with FaultServer(handler) as server:
        first = fetch(fetcher, server.url("/a.jpg"))
        answered.set()
        second = fetch(fetcher, server.url("/b.jpg"))
    assert ok_body(first) == JPEG and ok_body(second) == JPEG
    assert server.connections == 2
    paths = [r.split(b"\r\n")[0] for r in server.requests]
    assert paths == [b"GET /a.jpg HTTP/1.1", b"GET /b.jpg HTTP/1.1", b"GET /b.jpg HTTP/1.1"]


def test_an_idle_connection_the_server_closed_is_not_reused(
    make: Callable[..., MultiplexFetcher],
) -> None:
    def handler(sock: socket.socket, server: FaultServer) -> None:
        server.record(read_request(sock))
        sock.sendall(response(200, JPEG))  # keep-alive announced, then closed at once

    fetcher = make()
    with FaultServer(handler) as server:
        first = fetch(fetcher, server.url("/a.jpg"))
        time.sleep(0.2)
        second = fetch(fetcher, server.url("/b.jpg"))
    assert ok_body(first) == JPEG and ok_body(second) == JPEG
    assert server.connections == 2 and len(server.requests) == 2


# -- the guard, addresses ---------------------------------------------------------------------


def test_the_guard_refuses_a_redirect_hop_before_connecting(
    make: Callable[..., MultiplexFetcher], tmp_dir: Path
) -> None:
    names = {"img.test": ["127.0.0.1"], "inside.test": ["127.0.0.2"]}
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        resolved.append(host)
        return names[host]

    guard = AddressGuard(allow_cidrs=("127.0.0.1/32",), resolver=resolver)
    with FaultServer(serve_forever_keepalive(lambda _: b"")) as server:
        location = f"http://inside.test:{server.port}/x.jpg"
        redirect = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
        server.handler = serve_forever_keepalive(lambda _: redirect.encode())
        record = fetch(make(guard=guard), f"http://img.test:{server.port}/start")
    assert_failed(record, ErrorCode.BLOCKED_ADDRESS, tmp_dir)
    assert "inside.test (127.0.0.2) is a loopback address" in (record.error_message or "")
    assert resolved == ["img.test", "inside.test"], "each hop's name, on a resolver thread"
    assert server.connections == 1 and record.redirects == [location]


def test_addresses_are_tried_in_order_on_connect_error(
    make: Callable[..., MultiplexFetcher],
) -> None:
    guard = AddressGuard(
        allow_private_networks=True, resolver=lambda host, port: ["127.0.0.2", "127.0.0.1"]
    )
    with FaultServer(keepalive()) as server:  # listens on 127.0.0.1 only
        record = fetch(make(guard=guard), f"http://two.test:{server.port}/a.jpg")
    assert ok_body(record) == JPEG
    assert server.local_addresses == ["127.0.0.1"]


def test_a_refused_connect_is_a_connect_error_in_the_blocking_drivers_words(
    make: Callable[..., MultiplexFetcher], tmp_dir: Path
) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    record = fetch(make(), f"http://127.0.0.1:{port}/")
    assert_failed(record, ErrorCode.CONNECT_ERROR, tmp_dir)
    assert record.error_message == (
        "cannot connect: to 127.0.0.1 (127.0.0.1): [Errno 111] Connection refused"
    )


# -- the proxy lane ---------------------------------------------------------------------------


def test_a_request_through_a_proxy_runs_on_the_proxy_lane(
    make: Callable[..., MultiplexFetcher],
) -> None:
    with (
        FaultServer(keepalive()) as server,
        ForwardProxy(hosts={"images.test": "127.0.0.1"}) as proxy,
    ):
        target = f"http://images.test:{server.port}"
        fetcher = make(replace(CONFIG, proxy=proxy.url()))
        records = fetch_all(fetcher, [f"{target}/0.jpg", f"{target}/1.jpg"])
    for record in records:
        assert ok_body(record) == JPEG
        assert record.worker == "fetch-loop"
    assert sorted(s.target for s in proxy.seen("GET")) == [f"{target}/0.jpg", f"{target}/1.jpg"]


# -- the engine's refusals and fallbacks --------------------------------------------------------


def test_fetch_processes_is_refused_with_the_multiplexed_engine(tmp_path: Path) -> None:
    from fetchpool import download
    from fetchpool.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--fetch-processes 2 .*--engine multiplexed"):
        FetchConfig(engine="multiplexed", fetch_processes=2)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--engine multiplexed"):
        download(["http://a.example/1.txt"], out, engine="multiplexed", fetch_processes=2)
    assert not out.exists()


def test_a_custom_fetcher_runs_on_threads_with_the_multiplexed_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fetchpool import MockFetcher, MockResponse, download

    def factory(tmp: Path) -> MockFetcher:
        return MockFetcher(lambda job: MockResponse(body=job.url.encode()), tmp)

    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="fetchpool"):
        report = download(
            [f"http://a.example/{n}.txt" for n in range(5)],
            out,
            engine="multiplexed",
            fetcher=factory,
        )
    assert report.ok == 5
    assert "runs on --threads fetch threads" in caplog.text
