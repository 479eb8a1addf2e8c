"""HttpFetcher against raw-socket fault servers on 127.0.0.1, plus MockFetcher and sniffing.

Every server listens on loopback only; names are mapped by injected resolvers, never DNS.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from fetch_helpers import CONFIG, JPEG
from fetchpool.config import FetchConfig
from fetchpool.fetch import AddressGuard, HttpFetcher, MockFetcher, MockResponse
from fetchpool.fetch import transport as transport_module
from fetchpool.fetch.content import sniff_extension
from fetchpool.models import ErrorCode, Job, Record, Status
from fetchpool.redact import redact_text, redact_url
from socketserver_faults import (
    FaultServer,
    header_of,
    read_request,
    reset,
    response,
    serve_forever_keepalive,
)


@pytest.fixture
def make_fetcher(fetcher_factory: Callable[..., HttpFetcher]) -> Callable[..., HttpFetcher]:
    def make(config: FetchConfig = CONFIG, **kwargs: object) -> HttpFetcher:
        return fetcher_factory(config, **kwargs)

    return make


def job(url: str, position: int = 0) -> Job:
    return Job(position=position, url=url)


def one_response(payload: bytes, *, then: Callable[[socket.socket], None] | None = None):  # type: ignore[no-untyped-def]
    def handler(sock: socket.socket, server: FaultServer) -> None:
        server.record(read_request(sock))
        sock.sendall(payload)
        if then is not None:
            then(sock)

    return handler


def assert_failed(record: Record, code: ErrorCode, tmp_dir: Path) -> None:
    assert record.status is Status.FAILED, record
    assert record.error_code is code, (record.error_code, record.error_message)
    assert record.temp_path is None
    assert os.listdir(tmp_dir) == [], "a failed fetch must leave no temp file"


# -- success ----------------------------------------------------------------------------------


def test_success_streams_to_temp_with_hash(make_fetcher, tmp_dir: Path) -> None:
    payload = response(200, JPEG, {"Content-Type": "image/jpeg"})
    with FaultServer(serve_forever_keepalive(lambda _: payload)) as server:
        record = make_fetcher().fetch(job(server.url("/pics/a.png?x=1")))
    assert record.status is Status.OK, record.error_message
    assert record.error_code is None
    assert record.http_status == 200
    assert record.bytes == len(JPEG)
    assert record.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert record.extension == ".jpg"  # the bytes win over the URL's ".png"
    assert record.content_type == "image/jpeg"
    assert record.final_url == server.url("/pics/a.png?x=1")
    assert record.temp_path is not None
    assert Path(record.temp_path).read_bytes() == JPEG
    assert Path(record.temp_path).parent == tmp_dir
    assert record.started is not None and record.finished is not None
    assert record.finished >= record.started
    assert record.worker == threading.current_thread().name
    assert record.attempts == 0  # the scheduler counts attempts, not the fetcher


def test_request_headers(make_fetcher) -> None:
    config = replace(CONFIG, headers=(("X-Extra", "1"),))
    with FaultServer(serve_forever_keepalive(lambda _: response(200, b"ok"))) as server:
        record = make_fetcher(config).fetch(job(server.url("/h?q=1#frag")))
    assert record.ok
    request = server.requests[0]
    assert request.startswith(b"GET /h?q=1 HTTP/1.1\r\n")
    assert header_of(request, "User-Agent") == "fetchpool-test/1"
    assert header_of(request, "Accept-Encoding") == "identity"
    assert header_of(request, "X-Extra") == "1"
    assert header_of(request, "Host") == f"127.0.0.1:{server.port}"
    assert header_of(request, "Authorization") is None


def test_connection_reused_across_fetches(make_fetcher) -> None:
    fetcher = make_fetcher()
    with FaultServer(serve_forever_keepalive(lambda _: response(200, b"abc"))) as server:
        records = [fetcher.fetch(job(server.url(f"/{i}"))) for i in range(5)]
    assert all(r.ok for r in records)
    assert server.connections == 1


def test_many_threads_share_one_fetcher(make_fetcher) -> None:
    fetcher = make_fetcher(replace(CONFIG, per_host=8))
    with (
        FaultServer(serve_forever_keepalive(lambda _: response(200, JPEG))) as server,
        ThreadPoolExecutor(32) as pool,
    ):
        records = list(pool.map(fetcher.fetch, [job(server.url(f"/{i}"), i) for i in range(300)]))
    assert all(r.ok for r in records), {r.error_message for r in records}
    assert {r.sha256 for r in records} == {hashlib.sha256(JPEG).hexdigest()}
    assert len({r.temp_path for r in records}) == 300
    assert server.connections <= 300  # bounded; typically ~32 thanks to reuse


def test_empty_body_is_ok(make_fetcher) -> None:
    with FaultServer(one_response(response(200, b""))) as server:
        record = make_fetcher().fetch(job(server.url("/e")))
    assert record.ok and record.bytes == 0 and record.extension == ".bin"
    assert record.sha256 == hashlib.sha256(b"").hexdigest()


def test_chunked_body(make_fetcher) -> None:
    body = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    with FaultServer(one_response(body)) as server:
        record = make_fetcher().fetch(job(server.url("/c.txt")))
    assert record.ok, record.error_message
    assert Path(record.temp_path or "").read_bytes() == b"hello world"
    assert record.extension == ".txt"


def test_body_until_close_without_length(make_fetcher) -> None:
    payload = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + JPEG
    with FaultServer(one_response(payload)) as server:
        record = make_fetcher().fetch(job(server.url("/x")))
    assert record.ok and record.bytes == len(JPEG)


# -- HTTP errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404, 410, 500, 502, 504])
def test_error_status_not_saved(make_fetcher, tmp_dir: Path, status: int) -> None:
    with FaultServer(one_response(response(status, b"<html>error page</html>"))) as server:
        record = make_fetcher().fetch(job(server.url("/missing.jpg")))
    assert_failed(record, ErrorCode.HTTP_ERROR, tmp_dir)
    assert record.http_status == status
    assert record.retry_after is None


def test_error_body_drained_and_connection_reused(make_fetcher) -> None:
    fetcher = make_fetcher()
    with FaultServer(serve_forever_keepalive(lambda _: response(404, b"nope" * 100))) as server:
        first = fetcher.fetch(job(server.url("/a")))
        second = fetcher.fetch(job(server.url("/b")))
    assert first.http_status == second.http_status == 404
    assert server.connections == 1


def test_large_error_body_closes_connection(make_fetcher, tmp_dir: Path) -> None:
    start = time.monotonic()
    with FaultServer(one_response(response(500, b"", length=10**12))) as server:
        record = make_fetcher().fetch(job(server.url("/a")))
    assert_failed(record, ErrorCode.HTTP_ERROR, tmp_dir)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(("status", "value", "expected"), [(429, "7", 7.0), (503, "0", 0.0)])
def test_retry_after_seconds(make_fetcher, status: int, value: str, expected: float) -> None:
    with FaultServer(one_response(response(status, b"", {"Retry-After": value}))) as server:
        record = make_fetcher().fetch(job(server.url("/r")))
    assert record.http_status == status and record.retry_after == expected


def test_retry_after_http_date_and_huge(make_fetcher) -> None:
    from email.utils import formatdate

    fetcher = make_fetcher()
    date = formatdate(time.time() + 60, usegmt=True)
    with FaultServer(one_response(response(503, b"", {"Retry-After": date}))) as server:
        record = fetcher.fetch(job(server.url("/r")))
    assert record.retry_after is not None and 50 < record.retry_after <= 61
    with FaultServer(one_response(response(429, b"", {"Retry-After": "999999999"}))) as server:
        record = fetcher.fetch(job(server.url("/r")))
    assert record.retry_after == 999999999.0  # capping is the policy's job


# -- body faults ------------------------------------------------------------------------------


def test_truncated_body_is_incomplete(make_fetcher, tmp_dir: Path) -> None:
    payload = response(200, b"x" * 500, length=1000)
    with FaultServer(one_response(payload)) as server:
        record = make_fetcher().fetch(job(server.url("/t")))
    assert_failed(record, ErrorCode.INCOMPLETE_BODY, tmp_dir)


def test_reset_mid_body_connection_not_reused(make_fetcher, tmp_dir: Path) -> None:
    calls = {"n": 0}

    def handler(sock: socket.socket, server: FaultServer) -> None:
        while request := read_request(sock):
            server.record(request)
            calls["n"] += 1
            if calls["n"] == 1:
                sock.sendall(response(200, b"y" * 1000, length=100_000))
                time.sleep(0.05)
                reset(sock)
                return
            sock.sendall(response(200, b"fine"))

    fetcher = make_fetcher()
    with FaultServer(handler) as server:
        broken = fetcher.fetch(job(server.url("/1")))
        assert_failed(broken, ErrorCode.INCOMPLETE_BODY, tmp_dir)
        good = fetcher.fetch(job(server.url("/2")))
    assert good.ok, good.error_message
    assert server.connections == 2


def test_reset_mid_body_without_length(make_fetcher, tmp_dir: Path) -> None:
    payload = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"z" * 5000

    def then(sock: socket.socket) -> None:
        time.sleep(0.05)
        reset(sock)

    with FaultServer(one_response(payload, then=then)) as server:
        record = make_fetcher().fetch(job(server.url("/r")))
    # Without a length, a reset looks like the end of the body on some systems; either way
    # nothing partial may be reported with an error, and a success holds exactly what came.
    if not record.ok:
        assert record.error_code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.INCOMPLETE_BODY)
        assert os.listdir(tmp_dir) == []


def test_broken_chunked_framing(make_fetcher, tmp_dir: Path) -> None:
    payload = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\nxx\r\n"
    with FaultServer(one_response(payload, then=lambda s: s.close())) as server:
        record = make_fetcher().fetch(job(server.url("/c")))
    assert_failed(record, ErrorCode.PROTOCOL_ERROR, tmp_dir)


def test_huge_content_length_rejected_before_reading(make_fetcher, tmp_dir: Path) -> None:
    def then(sock: socket.socket) -> None:
        sock.sendall(b"x" * 65536)  # the client must not wait for any of this

    payload = response(200, b"", length=10_000_000_000_000)
    start = time.monotonic()
    with FaultServer(one_response(payload, then=then)) as server:
        record = make_fetcher().fetch(job(server.url("/huge")))
    assert_failed(record, ErrorCode.TOO_LARGE, tmp_dir)
    assert "10000000000000" in (record.error_message or "")
    assert time.monotonic() - start < 1.5


def test_endless_body_stopped_at_max_bytes(make_fetcher, tmp_dir: Path) -> None:
    def endless(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        block = b"e" * 65536
        while not server.stopping.is_set():
            sock.sendall(block)

    config = replace(CONFIG, max_bytes=256 * 1024)
    with FaultServer(endless) as server:
        record = make_fetcher(config).fetch(job(server.url("/endless")))
    assert_failed(record, ErrorCode.TOO_LARGE, tmp_dir)


def test_body_exactly_max_bytes_is_ok(make_fetcher) -> None:
    config = replace(CONFIG, max_bytes=len(JPEG))
    with FaultServer(one_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + JPEG)) as srv:
        record = make_fetcher(config).fetch(job(srv.url("/x")))
    assert record.ok and record.bytes == len(JPEG)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["two-lengths", "list-length", "length-and-chunked"],
)
def test_conflicting_framing_is_protocol_error(make_fetcher, tmp_dir: Path, head: bytes) -> None:
    with FaultServer(one_response(head)) as server:
        record = make_fetcher().fetch(job(server.url("/f")))
    assert_failed(record, ErrorCode.PROTOCOL_ERROR, tmp_dir)


@pytest.mark.parametrize(
    "payload",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(90)),
    ],
    ids=["1MB-line", "10000-headers", "over-max-header-bytes"],
)
def test_header_abuse_is_protocol_error(make_fetcher, tmp_dir: Path, payload: bytes) -> None:
    start = time.monotonic()
    with FaultServer(one_response(payload)) as server:
        record = make_fetcher().fetch(job(server.url("/h")))
    assert_failed(record, ErrorCode.PROTOCOL_ERROR, tmp_dir)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage garbage garbage\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00",
        b"SSH-2.0-OpenSSH\r\n",
        b"",
    ],
    ids=["garbage", "tls-bytes", "ssh-banner", "empty-reply"],
)
def test_garbage_and_empty_replies(make_fetcher, tmp_dir: Path, payload: bytes) -> None:
    start = time.monotonic()
    with FaultServer(one_response(payload, then=lambda s: s.close())) as server:
        record = make_fetcher().fetch(job(server.url("/g")))
    assert_failed(record, ErrorCode.PROTOCOL_ERROR, tmp_dir)
    assert time.monotonic() - start < 2


# -- time limits ------------------------------------------------------------------------------


def test_control_characters_in_recorded_header_values_become_spaces(make_fetcher) -> None:
    # NUL, ESC (a terminal escape), DEL and a C1 control (latin-1 byte 0x85) in Content-Type.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(JPEG)
    head += b"Content-Type: image/jpeg\x00\x1b[2J; q=\x7f\x85x\r\n\r\n"
    with FaultServer(one_response(head + JPEG)) as server:
        record = make_fetcher().fetch(job(server.url("/c")))
    assert record.ok, record.error_message
    assert record.content_type == "image/jpeg [2J; q= x"
    assert record.extension == ".jpg"


def test_control_characters_in_the_reason_never_reach_the_message(make_fetcher) -> None:
    payload = b"HTTP/1.1 404 Not\x00Found\x1b[0m\r\nContent-Length: 0\r\n\r\n"
    with FaultServer(one_response(payload)) as server:
        record = make_fetcher().fetch(job(server.url("/r")))
    assert record.error_code is ErrorCode.HTTP_ERROR
    assert record.error_message == "HTTP 404 Not Found [0m"


def test_a_huge_content_type_is_recorded_cut_short(make_fetcher) -> None:
    value = "image/jpeg; " + "x" * 20_000
    with FaultServer(one_response(response(200, JPEG, {"Content-Type": value}))) as server:
        record = make_fetcher().fetch(job(server.url("/h")))
    assert record.ok and record.content_type == value[:1024]


def test_journal_and_csv_manifest_hold_no_control_characters(tmp_path: Path) -> None:
    import csv
    import io

    from fetchpool import download
    from fetchpool.state.manifest import export_manifest

    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(JPEG)
    head += b"Content-Type: image/jpeg\x00<script>\r\n\r\n"
    with FaultServer(serve_forever_keepalive(lambda _: head + JPEG)) as server:
        out = tmp_path / "out"
        report = download([server.url("/a.jpg")], out, allow_private_networks=True)
    (record,) = report.records()
    assert record.ok and record.content_type == "image/jpeg <script>"
    text = io.StringIO()
    export_manifest(out, text, fmt="csv")
    assert "\x00" not in text.getvalue()
    (row,) = csv.DictReader(io.StringIO(text.getvalue()))
    assert row["content_type"] == "image/jpeg <script>"


def hang(sock: socket.socket, server: FaultServer) -> None:
    read_request(sock)
    server.stopping.wait(10)


def test_server_never_answers_read_timeout(make_fetcher, tmp_dir: Path) -> None:
    config = replace(CONFIG, read_timeout=0.3)
    start = time.monotonic()
    with FaultServer(hang) as server:
        record = make_fetcher(config).fetch(job(server.url("/hang")))
    assert_failed(record, ErrorCode.READ_TIMEOUT, tmp_dir)
    assert time.monotonic() - start < 2


def drip(interval: float, head: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"):  # type: ignore[no-untyped-def]
    def handler(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        sock.sendall(head)
        while not server.stopping.wait(interval):
            sock.sendall(b"d")

    return handler


def test_slow_drip_hits_total_deadline(make_fetcher, tmp_dir: Path) -> None:
    config = replace(CONFIG, read_timeout=1.0, total_timeout=1.0)
    start = time.monotonic()
    with FaultServer(drip(0.1)) as server:
        record = make_fetcher(config).fetch(job(server.url("/drip")))
    assert_failed(record, ErrorCode.TOTAL_TIMEOUT, tmp_dir)
    assert time.monotonic() - start < 2.5


def test_slow_drip_below_min_speed(make_fetcher, tmp_dir: Path) -> None:
    config = replace(CONFIG, min_speed=1000, min_speed_window=0.5)
    start = time.monotonic()
    with FaultServer(drip(0.05)) as server:
        record = make_fetcher(config).fetch(job(server.url("/drip")))
    assert_failed(record, ErrorCode.TOO_SLOW, tmp_dir)
    assert time.monotonic() - start < 2.5


def test_dripping_headers_hit_total_deadline(make_fetcher, tmp_dir: Path) -> None:
    def handler(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\n")
        while not server.stopping.wait(0.1):
            sock.sendall(b"X-A: b\r\n")

    config = replace(CONFIG, total_timeout=1.0, max_header_bytes=1024 * 1024)
    start = time.monotonic()
    with FaultServer(handler) as server:
        record = make_fetcher(config).fetch(job(server.url("/h")))
    # Each line arrives well within read_timeout; only the watchdog's deadline ends this.
    assert_failed(record, ErrorCode.TOTAL_TIMEOUT, tmp_dir)
    assert time.monotonic() - start < 3


def test_refused_is_connect_error(make_fetcher, tmp_dir: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    start = time.monotonic()
    record = make_fetcher().fetch(job(f"http://127.0.0.1:{port}/"))
    assert_failed(record, ErrorCode.CONNECT_ERROR, tmp_dir)
    assert time.monotonic() - start < 1


def test_connect_timeout(make_fetcher, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A black hole cannot be built on loopback portably: simulate the socket timing out.
    def black_hole(ip: str, port: int, timeout: float | None, options: object) -> socket.socket:
        assert timeout == CONFIG.connect_timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(transport_module, "open_socket", black_hole)
    record = make_fetcher().fetch(job("http://127.0.0.1:9/"))
    assert_failed(record, ErrorCode.CONNECT_TIMEOUT, tmp_dir)


def test_unresolvable_is_connect_error(make_fetcher, tmp_dir: Path) -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise socket.gaierror(-2, "Name or service not known")

    guard = AddressGuard(resolver=resolver)
    record = make_fetcher(guard=guard).fetch(job("http://nowhere.invalid/"))
    assert_failed(record, ErrorCode.CONNECT_ERROR, tmp_dir)


# -- URL and address policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("ftp://example.com/x", ErrorCode.UNSUPPORTED_SCHEME),
        ("file:///etc/passwd", ErrorCode.UNSUPPORTED_SCHEME),
        ("example.com/x", ErrorCode.UNSUPPORTED_SCHEME),
        ("http://exa mple.com/", ErrorCode.INVALID_URL),
        ("http://example.com/a\r\nX-Injected: 1", ErrorCode.INVALID_URL),
        ("http:///nohost", ErrorCode.INVALID_URL),
    ],
)
def test_bad_urls_rejected_before_io(
    make_fetcher, tmp_dir: Path, url: str, code: ErrorCode
) -> None:
    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError("no lookup expected")

    record = make_fetcher(guard=AddressGuard(resolver=no_dns)).fetch(job(url))
    assert_failed(record, code, tmp_dir)


def test_default_guard_blocks_loopback_without_connecting(
    make_fetcher, tmp_dir: Path, spy_connect: list[tuple[str, int]]
) -> None:
    config = replace(CONFIG, allow_private_networks=False)
    with FaultServer(one_response(response(200, b"secret"))) as server:
        for host in ("127.0.0.1", "2130706433", "0x7f000001", "127.1", "[::ffff:127.0.0.1]"):
            record = make_fetcher(config).fetch(job(server.url("/", host=host)))
            assert_failed(record, ErrorCode.BLOCKED_ADDRESS, tmp_dir)
            assert "--allow-private-networks" in (record.error_message or "")
        assert server.connections == 0
    assert spy_connect == []


def test_connection_pinned_to_checked_address(
    make_fetcher, spy_connect: list[tuple[str, int]]
) -> None:
    lookups: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["127.0.0.2"]

    guard = AddressGuard(allow_cidrs=("127.0.0.0/8",), resolver=resolver)
    with FaultServer(serve_forever_keepalive(lambda _: response(200, b"pinned"))) as server:
        record = make_fetcher(guard=guard).fetch(job(server.url("/p", host="pinned.test")))
    assert record.ok, record.error_message
    assert lookups == ["pinned.test"]  # resolved once, by the guard; urllib3 never resolves
    assert spy_connect == [("127.0.0.1", server.port)]
    assert server.local_addresses == ["127.0.0.1"]
    assert header_of(server.requests[0], "Host") == f"pinned.test:{server.port}"


def test_dns_rebinding_connects_only_to_checked_ip(
    make_fetcher, tmp_dir: Path, spy_connect: list[tuple[str, int]]
) -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])

    def resolver(host: str, port: int) -> list[str]:
        return next(answers)

    guard = AddressGuard(resolver=resolver)
    with FaultServer(one_response(response(200, b"internal"))) as server:
        record = make_fetcher(guard=guard).fetch(job(server.url("/", host="rebind.test")))
        assert server.connections == 0
    # The checked public address was the only destination tried (the spy refuses it, so no
    # packet leaves the machine); the later loopback answer was never used.
    assert spy_connect == [("93.184.216.34", server.port)]
    assert_failed(record, ErrorCode.CONNECT_ERROR, tmp_dir)


def test_pools_keyed_by_pinned_address(make_fetcher, spy_connect: list[tuple[str, int]]) -> None:
    answers = {"n": 0}

    def resolver(host: str, port: int) -> list[str]:
        answers["n"] += 1
        return ["127.0.0.1"] if answers["n"] == 1 else ["127.0.0.2"]

    guard = AddressGuard(allow_cidrs=("127.0.0.0/8",), resolver=resolver, cache_ttl=0)
    fetcher = make_fetcher(guard=guard)
    with FaultServer(serve_forever_keepalive(lambda _: response(200, b"a")), host="127.0.0.1") as s:
        first = fetcher.fetch(job(s.url("/1", host="multi.test")))
        second = fetcher.fetch(job(s.url("/2", host="multi.test")))
    assert first.ok
    # The second answer (127.0.0.2) must not reuse the connection opened to 127.0.0.1.
    assert [ip for ip, _ in spy_connect] == ["127.0.0.1", "127.0.0.2"]
    assert second.error_code is ErrorCode.CONNECT_ERROR or second.ok


def test_next_address_tried_after_connect_error(
    make_fetcher, spy_connect: list[tuple[str, int]]
) -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    guard = AddressGuard(allow_cidrs=("127.0.0.0/8",), resolver=resolver)
    with FaultServer(one_response(response(200, b"second"))) as server:
        record = make_fetcher(guard=guard).fetch(job(server.url("/", host="dual.test")))
    assert record.ok
    assert [ip for ip, _ in spy_connect] == ["93.184.216.34", "127.0.0.1"]


def test_credentials_sent_as_basic_auth_and_redacted(make_fetcher, tmp_dir: Path) -> None:
    with FaultServer(one_response(response(403, b""))) as server:
        url = f"http://user:s3cret@127.0.0.1:{server.port}/x"
        record = make_fetcher().fetch(job(url))
    assert header_of(server.requests[0], "Authorization") == "Basic dXNlcjpzM2NyZXQ="
    assert record.final_url is not None and "s3cret" not in record.final_url
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    failed = make_fetcher().fetch(job(f"http://user:s3cret@127.0.0.1:{port}/x"))
    assert failed.error_code is ErrorCode.CONNECT_ERROR
    assert "s3cret" not in (failed.error_message or "")


def test_redact() -> None:
    assert redact_url("http://user:pw@host/x") == "http://user:***@host/x"
    assert redact_url("http://token@host/x") == "http://***@host/x"
    assert redact_url("http://host/x?a=b@c") == "http://host/x?a=b@c"
    assert redact_url("http://user:p@ss@host/x") == "http://user:***@host/x"
    assert redact_text("failed http://a:b@h/ and https://c:d@i/") == (
        "failed http://a:***@h/ and https://c:***@i/"
    )


# -- redirects --------------------------------------------------------------------------------


def redirector(routes: dict[str, bytes]):  # type: ignore[no-untyped-def]
    def respond(request: bytes) -> bytes:
        path = request.split(b" ", 2)[1].decode()
        return routes.get(path, response(404, b""))

    return serve_forever_keepalive(respond)


def to(location: str, status: int = 302) -> bytes:
    return response(status, b"moved", {"Location": location})


def test_redirect_chain_followed(make_fetcher) -> None:
    with FaultServer(redirector({})) as server:
        server.handler = redirector(  # routes need the port, known only once started
            {
                "/a": to(server.url("/b"), 301),
                "/b": to("/c", 307),
                "/c": to("d.png", 308),
                "/d.png": response(200, JPEG),
            }
        )
        record = make_fetcher().fetch(job(server.url("/a")))
    assert record.ok, record.error_message
    assert record.redirects == [server.url("/b"), server.url("/c"), server.url("/d.png")]
    assert record.final_url == server.url("/d.png")
    assert record.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert server.connections == 1


def test_redirect_loop(make_fetcher, tmp_dir: Path) -> None:
    with FaultServer(redirector({"/a": to("/b"), "/b": to("/a")})) as server:
        record = make_fetcher().fetch(job(server.url("/a")))
    assert_failed(record, ErrorCode.TOO_MANY_REDIRECTS, tmp_dir)
    assert record.redirects == [server.url("/b"), server.url("/a")]


def test_too_many_redirects(make_fetcher, tmp_dir: Path) -> None:
    routes = {f"/{i}": to(f"/{i + 1}") for i in range(50)}
    config = replace(CONFIG, max_redirects=5)
    with FaultServer(redirector(routes)) as server:
        record = make_fetcher(config).fetch(job(server.url("/0")))
    assert_failed(record, ErrorCode.TOO_MANY_REDIRECTS, tmp_dir)
    assert len(record.redirects) == 6


def test_zero_redirects_allowed(make_fetcher, tmp_dir: Path) -> None:
    config = replace(CONFIG, max_redirects=0)
    with FaultServer(redirector({"/a": to("/b"), "/b": response(200, b"x")})) as server:
        record = make_fetcher(config).fetch(job(server.url("/a")))
    assert_failed(record, ErrorCode.TOO_MANY_REDIRECTS, tmp_dir)


@pytest.mark.parametrize(
    "location",
    ["file:///etc/passwd", "ftp://example.com/x", "data:text/plain,hi", "gopher://x/"],
)
def test_redirect_to_other_schemes_refused(make_fetcher, tmp_dir: Path, location: str) -> None:
    with FaultServer(redirector({"/a": to(location)})) as server:
        record = make_fetcher().fetch(job(server.url("/a")))
    assert_failed(record, ErrorCode.REDIRECT_REFUSED, tmp_dir)
    assert server.connections == 1


def test_redirect_to_metadata_blocked_on_that_hop(
    make_fetcher, tmp_dir: Path, spy_connect: list[tuple[str, int]]
) -> None:
    guard = AddressGuard(allow_cidrs=("127.0.0.0/8",))
    with FaultServer(redirector({"/a": to("http://169.254.169.254/latest/meta-data/")})) as srv:
        record = make_fetcher(guard=guard).fetch(job(srv.url("/a")))
    assert_failed(record, ErrorCode.BLOCKED_ADDRESS, tmp_dir)
    assert [ip for ip, _ in spy_connect] == ["127.0.0.1"]
    assert record.redirects == ["http://169.254.169.254/latest/meta-data/"]


def test_cross_host_redirect_drops_credentials(make_fetcher) -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    guard = AddressGuard(allow_cidrs=("127.0.0.0/8",), resolver=resolver)
    config = replace(CONFIG, headers=(("Cookie", "session=1"),))
    with (
        FaultServer(redirector({"/b": response(200, b"B")})) as other,
        FaultServer(redirector({})) as first,
    ):
        first.handler = redirector(
            {
                "/a": to(first.url("/same", host="a.test")),
                "/same": to(other.url("/b", host="b.test")),
            }
        )
        record = make_fetcher(config, guard=guard).fetch(job(f"http://u:p@a.test:{first.port}/a"))
    assert record.ok, record.error_message
    for request in first.requests:  # same host: credentials kept
        assert header_of(request, "Authorization") is not None
        assert header_of(request, "Cookie") == "session=1"
    (request,) = other.requests
    assert header_of(request, "Authorization") is None
    assert header_of(request, "Cookie") is None
    assert header_of(request, "User-Agent") == "fetchpool-test/1"


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return str(cert), str(key)


def tls_context(cert: tuple[str, str]) -> __import__("ssl").SSLContext:  # type: ignore[name-defined]
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    return context


def test_self_signed_is_tls_error(make_fetcher, tmp_dir: Path, self_signed) -> None:
    handler = one_response(response(200, b"tls"))
    with FaultServer(handler, tls=tls_context(self_signed)) as server:
        record = make_fetcher().fetch(job(server.url("/s")))
    assert_failed(record, ErrorCode.TLS_ERROR, tmp_dir)


def test_insecure_accepts_self_signed_quietly(make_fetcher, self_signed) -> None:
    config = replace(CONFIG, insecure=True)
    with FaultServer(one_response(response(200, b"tls")), tls=tls_context(self_signed)) as srv:
        record = make_fetcher(config).fetch(job(srv.url("/s")))  # warnings are errors here
    assert record.ok, record.error_message


def test_https_to_http_downgrade_refused(make_fetcher, tmp_dir: Path, self_signed) -> None:
    config = replace(CONFIG, insecure=True)
    with FaultServer(redirector({}), tls=tls_context(self_signed)) as server:
        server.handler = redirector({"/a": to(server.url("/b", scheme="http"))})
        record = make_fetcher(config).fetch(job(server.url("/a")))
    assert_failed(record, ErrorCode.REDIRECT_REFUSED, tmp_dir)


def test_tls_reset_during_handshake_is_connect_error(make_fetcher, tmp_dir: Path) -> None:
    def handler(sock: socket.socket, server: FaultServer) -> None:
        sock.recv(10)  # part of the ClientHello, then a reset
        reset(sock)

    with FaultServer(handler) as server:
        record = make_fetcher().fetch(job(server.url("/", scheme="https")))
    assert_failed(record, ErrorCode.CONNECT_ERROR, tmp_dir)


# -- local failures ---------------------------------------------------------------------------


def test_missing_tmp_dir_is_run_level(tmp_path: Path) -> None:
    from fetchpool.errors import OutputError

    fetcher = HttpFetcher(CONFIG, tmp_path / "absent")
    try:
        with (
            FaultServer(one_response(response(200, b"x"))) as server,
            pytest.raises(OutputError),
        ):
            fetcher.fetch(job(server.url("/")))
    finally:
        fetcher.close()


def test_injected_clock_drives_deadline(make_fetcher, tmp_dir: Path) -> None:
    now = {"t": 0.0}

    def clock() -> float:
        now["t"] += 10.0  # every look at the clock costs 10 s: the deadline passes at once
        return now["t"]

    config = replace(CONFIG, total_timeout=15.0)
    with FaultServer(one_response(response(200, JPEG))) as server:
        record = make_fetcher(config, clock=clock).fetch(job(server.url("/")))
    assert_failed(record, ErrorCode.TOTAL_TIMEOUT, tmp_dir)


# -- MockFetcher and sniffing -----------------------------------------------------------------


def test_mock_fetcher_writes_like_http_fetcher(tmp_dir: Path) -> None:
    def handler(j: Job) -> MockResponse:
        if j.url.endswith("/404"):
            return MockResponse(status=404, body=b"nope")
        if j.url.endswith("/slow"):
            return MockResponse(status=503, headers={"retry-after": "3"})
        if j.url.endswith("/down"):
            return MockResponse(error=ErrorCode.CONNECT_ERROR)
        return MockResponse(body=JPEG, headers={"Content-Type": "image/jpeg"})

    fetcher = MockFetcher(handler, tmp_dir)
    ok = fetcher.fetch(job("http://m.test/a"))
    assert ok.ok and ok.sha256 == hashlib.sha256(JPEG).hexdigest() and ok.extension == ".jpg"
    assert Path(ok.temp_path or "").read_bytes() == JPEG
    missing = fetcher.fetch(job("http://m.test/404"))
    assert missing.error_code is ErrorCode.HTTP_ERROR and missing.http_status == 404
    slow = fetcher.fetch(job("http://m.test/slow"))
    assert slow.retry_after == 3.0
    down = fetcher.fetch(job("http://m.test/down"))
    assert down.error_code is ErrorCode.CONNECT_ERROR and down.temp_path is None
    assert fetcher.calls == 4
    assert os.listdir(tmp_dir) == [os.path.basename(ok.temp_path or "")]
    fetcher.close()


@pytest.mark.parametrize(
    ("content_type", "head", "url", "expected"),
    [
        (None, b"\xff\xd8\xff\xdb", "http://x/a", ".jpg"),
        ("text/html", b"\x89PNG\r\n\x1a\n....", "http://x/a.jpg", ".png"),
        (None, b"GIF89a", "http://x/", ".gif"),
        (None, b"RIFF\x00\x00\x00\x00WEBPVP8 ", "http://x/", ".webp"),
        (None, b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00", "http://x/", ".bmp"),
        (None, b"BMW is a car", "http://x/", ".bin"),
        (None, b"II*\x00", "http://x/", ".tif"),
        (None, b"\x00\x00\x00\x1cftypavif", "http://x/", ".avif"),
        (None, b"\x00\x00\x00\x18ftypheic", "http://x/", ".heic"),
        (None, b"%PDF-1.7", "http://x/", ".pdf"),
        (None, b"PK\x03\x04", "http://x/", ".zip"),
        (None, b"\x1f\x8b\x08", "http://x/", ".gz"),
        ("image/jpeg", b"  <!DOCTYPE html><html>", "http://x/a.jpg", ".html"),
        (None, b'<?xml version="1.0"?><svg xmlns=', "http://x/a.png", ".svg"),
        ("image/png; charset=x", b"????", "http://x/", ".png"),
        (None, b"????", "http://x/photo.JPEG", ".jpg"),
        (None, b"????", "http://x/evil.exe", ".bin"),
        (None, b"????", "http://x/%2e%2e/.bashrc", ".bin"),
        (None, b"", "http://x/", ".bin"),
    ],
)
def test_sniff_extension(content_type: str | None, head: bytes, url: str, expected: str) -> None:
    assert sniff_extension(content_type, head, url) == expected


# -- integration with the embedded origin -----------------------------------------------------

origin_module = pytest.importorskip("fetchpool.origin")


@pytest.fixture(scope="module")
def origin() -> Iterator[object]:
    with origin_module.Origin() as server:
        yield server


def test_origin_images_match(make_fetcher, origin) -> None:
    fetcher = make_fetcher()
    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(fetcher.fetch, [job(origin.image_url(n), n) for n in range(16)]))
    for n, record in enumerate(records):
        assert record.ok, record.error_message
        assert record.sha256 == hashlib.sha256(origin.image_bytes(n)).hexdigest()
        assert record.extension == ".jpg"
        assert Path(record.temp_path or "").read_bytes() == origin.image_bytes(n)


def test_origin_headers_echo(make_fetcher, origin) -> None:
    import json

    record = make_fetcher().fetch(job(origin.url("/headers")))
    assert record.ok
    sent = json.loads(Path(record.temp_path or "").read_bytes())
    assert sent["user-agent"] == "fetchpool-test/1"
    assert sent["accept-encoding"] == "identity"
    assert sent["host"] == f"127.0.0.1:{origin.port}"


def test_origin_redirects(make_fetcher, origin, tmp_dir: Path) -> None:
    fetcher = make_fetcher()
    chain = fetcher.fetch(job(origin.url("/redirect/3")))
    assert chain.ok and len(chain.redirects) == 3
    assert chain.extension == ".jpg"
    loop = fetcher.fetch(job(origin.url("/redirect-loop")))
    assert loop.error_code is ErrorCode.TOO_MANY_REDIRECTS
    refused = fetcher.fetch(job(origin.url("/redirect-to?url=file:///etc/passwd")))
    assert refused.error_code is ErrorCode.REDIRECT_REFUSED


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/status/404", ErrorCode.HTTP_ERROR),
        ("/truncated", ErrorCode.INCOMPLETE_BODY),
        ("/huge-length", ErrorCode.TOO_LARGE),
        ("/two-lengths", ErrorCode.PROTOCOL_ERROR),
        ("/garbage", ErrorCode.PROTOCOL_ERROR),
        ("/empty", ErrorCode.PROTOCOL_ERROR),
        ("/hang", ErrorCode.READ_TIMEOUT),
        ("/endless", ErrorCode.TOO_LARGE),
        ("/drip?bytes=100&interval=0.05", ErrorCode.TOTAL_TIMEOUT),
    ],
)
def test_origin_faults(make_fetcher, origin, tmp_dir: Path, path: str, code: ErrorCode) -> None:
    config = replace(CONFIG, read_timeout=0.5, total_timeout=1.0, max_bytes=512 * 1024)
    start = time.monotonic()
    record = make_fetcher(config).fetch(job(origin.url(path)))
    assert_failed(record, code, tmp_dir)
    assert time.monotonic() - start < 3


def test_origin_reset_mid_body(make_fetcher, origin, tmp_dir: Path) -> None:
    record = make_fetcher().fetch(job(origin.url("/reset")))
    assert record.error_code in (ErrorCode.INCOMPLETE_BODY, ErrorCode.PROTOCOL_ERROR)
    assert os.listdir(tmp_dir) == []


def test_origin_retry_after(make_fetcher, origin) -> None:
    fetcher = make_fetcher()
    first = fetcher.fetch(job(origin.url("/retry-after/k1/7")))
    assert first.http_status == 429 and first.retry_after == 7.0
    second = fetcher.fetch(job(origin.url("/retry-after/k1/7")))
    assert second.ok


def test_origin_not_image_is_html(make_fetcher, origin) -> None:
    record = make_fetcher().fetch(job(origin.url("/not-image")))
    assert record.ok and record.content_type == "image/jpeg" and record.extension == ".html"
