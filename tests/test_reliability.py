"""RELIABILITY.md adversarial cases 1-35, end to end through ``fetchpool.download``.

One test (or one parametrized test) per case, named ``test_case_NN_...``. Cases 36-42 (local
environment, crashes, load) are in ``test_reliability_local.py``. Every server is on loopback;
tests that check the address guard run WITHOUT ``allow_private_networks`` and assert that the
loopback server received nothing.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
from email.utils import formatdate
from pathlib import Path

import pytest
from PIL import Image

from fetchpool import ErrorCode, Origin, Status, download
from fetchpool.outputs.naming import file_name
from reliability_helpers import (
    CRASH_SIZE,
    HANG_SIZE,
    LOOPBACK,
    cli,
    cli_env,
    content_server,
    final_files,
    free_port,
    injected_resolver,
    leftovers,
    make_cert,
    misbehaving_processor,
    on_engine,
    records,
    sha,
    skip_processes,
    tls_context,
)
from socketserver_faults import (
    FaultServer,
    header_of,
    read_request,
    response,
    serve_forever_keepalive,
)

JPEG_HEAD = b"\xff\xd8\xff\xe0"


def jpeg_bytes(size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def assert_clean_failure(out: Path, record: object, code: ErrorCode) -> None:
    """The item failed with ``code``; no final file, no temp file anywhere in OUT."""
    assert record.status is Status.FAILED, record  # type: ignore[attr-defined]
    assert record.error_code is code, (record.error_code, record.error_message)  # type: ignore[attr-defined]
    assert record.path is None  # type: ignore[attr-defined]
    assert final_files(out) == []
    assert leftovers(out) == []


@pytest.fixture(autouse=True)
def _on_every_engine(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case runs on every engine (``engine``: conftest, over ENGINES): ``download()``
    and ``fetchpool get`` in this module get ``--engine``."""
    on_engine(sys.modules[__name__], engine, monkeypatch)


@pytest.fixture
def spy_connect(spy_connect: list[tuple[str, int]], engine: str) -> list[tuple[str, int]]:
    """conftest's connect spy; a case asserting on it cannot see a worker process's connects."""
    skip_processes(engine, "the connect spy (transport.open_socket/start_connect)")
    return spy_connect


@pytest.fixture
def origin2() -> object:
    """A second origin on another loopback address: a different host for the scheduler."""
    with Origin(host="127.0.0.2") as server:
        yield server


# ============================================================================ hostile input


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "gopher://127.0.0.1:70/_GET",
        "127.0.0.1/img/1.jpg",
        "//127.0.0.1/img/1.jpg",
        "javascript:alert(1)",
    ],
)
def test_case_01_non_http_schemes_rejected_before_io(
    origin: Origin, tmp_path: Path, url: str, spy_connect: list[tuple[str, int]]
) -> None:
    out = tmp_path / "out"
    report = download([url, origin.image_url(1)], out, **LOOPBACK)
    first, second = records(report)
    expected = ErrorCode.INVALID_URL if url.startswith(("127.", "//")) else None
    assert first.status is Status.FAILED
    assert first.error_code is (expected or ErrorCode.UNSUPPORTED_SCHEME), first.error_message
    assert second.ok, "the run goes on after a rejected URL"
    assert [r.path for r in origin.requests()] == ["/img/1.jpg"]
    assert spy_connect == [("127.0.0.1", origin.port)]


def test_case_02_malformed_lines_fail_per_line_without_injection(
    origin: Origin, tmp_path: Path
) -> None:
    good = origin.image_url(1)
    lines = [
        b"",  # 1 blank: skipped
        b"   \t ",  # 2 whitespace only: skipped
        good.encode() + b"\x01x",  # 3 control char
        good.encode() + b"\rX-Injected: 1",  # 4 CR inside a line: header injection attempt
        good.encode() + b"%0d%0aX-Injected:%201",  # 5 encoded CRLF stays in the path
        f"http://127.0.0.1:99999/{1}".encode(),  # 6 port out of range
        b"http://127.0.0.1/" + b"a" * 100_000,  # 7 100 KB URL
        b"http://127.0.0.1/\xff\xfe\xfd",  # 8 invalid UTF-8
        b"  " + origin.image_url(2).encode() + b"  ",  # 9 surrounding whitespace is fine
        b"http://exa mple.com/",  # 10 space in host
    ]
    src = tmp_path / "urls.txt"
    src.write_bytes(b"\r\n".join(lines) + b"\r\n")  # CRLF line ends are fine too
    report = download(src, tmp_path / "out", attempts=1, **LOOPBACK)
    by_line = {r.line: r for r in records(report)}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 10]
    for line in (3, 4, 6, 7, 10):
        assert by_line[line].error_code is ErrorCode.INVALID_URL, by_line[line]
    assert by_line[8].error_code is ErrorCode.BAD_INPUT
    assert "line 8" in (by_line[8].error_message or "")
    assert by_line[9].ok
    # Line 5 is a legal URL: its encoded CRLF is sent as-is and never becomes a header.
    for request in origin.requests():
        assert "x-injected" not in request.headers
        assert "\r" not in request.path and "\n" not in request.path
    assert {r.path.lower() for r in origin.requests()} == {
        "/img/2.jpg",
        "/img/1.jpg%0d%0ax-injected:%201",
    }


def test_case_03_credentials_and_confusing_authorities(tmp_path: Path) -> None:
    """The host checked is the host connected to; credentials never in manifest or log."""
    secret = "pa55w0rdXYZ"
    with content_server({"/x.jpg": response(200, jpeg_bytes())}) as server:
        port = server.port
        urls = [
            f"http://user:{secret}@127.0.0.1:{port}/x.jpg",  # ok: sent as Basic auth
            f"http://user:{secret}@127.0.0.1:{port}/missing.jpg",  # 404: failed record
            f"http://user:{secret}@127.0.0.1:{free_port()}/x.jpg",  # refused: error message
            # The authority's last "@" decides: userinfo "a.example;", host 127.0.0.1.
            f"http://a.example;@127.0.0.1:{port}/x.jpg?confusion=1",
            f"http://127.0.0.2\\@127.0.0.1:{port}/x.jpg",  # backslash: refused outright
            f"http://127.0.0.1:{port}\\@127.0.0.2/x.jpg",
            f"http://{secret}@127.0.0.1:{port}/x.jpg?token=1",  # lone user name is masked too
        ]
        src = tmp_path / "urls.txt"
        src.write_text("\n".join(urls) + "\n")
        out, log = tmp_path / "out", tmp_path / "run.log"
        run = subprocess.run(
            cli("get", str(src), "-o", str(out), "--allow-private-networks", "-v",
                "--attempts", "1", "--connect-timeout", "1", "--log-file", str(log)),
            capture_output=True, text=True, timeout=60, env=cli_env(), check=False,
        )  # fmt: skip
        assert run.returncode == 1, run.stderr
        # Every connection went to the server that the URL's real host names (127.0.0.1).
        assert set(server.local_addresses) == {"127.0.0.1"}
        auth = [header_of(r, "Authorization") for r in server.requests]
        assert "Basic dXNlcjpwYTU1dzByZFhZWg==" in auth  # user:pa55w0rdXYZ
    manifest = subprocess.run(
        cli("manifest", str(out)), capture_output=True, text=True, timeout=60, env=cli_env(),
        check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in manifest.stdout.splitlines()]
    assert len(rows) == len(urls)
    statuses = [row["status"] for row in rows]
    assert statuses == ["ok", "failed", "failed", "ok", "failed", "failed", "ok"]
    assert rows[4]["error_code"] == rows[5]["error_code"] == "invalid_url"
    for text in (manifest.stdout, log.read_text(), run.stderr, run.stdout):
        assert secret not in text
    assert "user:***@" in manifest.stdout


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "[::1]",
        "0.0.0.0",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "[fd00:ec2::254]",
        "100.64.0.1",
        "224.0.0.1",
        "[ff02::1]",
        "255.255.255.255",
        "[fe80::1%25lo]",
    ],
)
def test_case_04_internal_literals_blocked_with_no_connection(
    origin: Origin, tmp_path: Path, host: str, spy_connect: list[tuple[str, int]]
) -> None:
    out = tmp_path / "out"
    report = download([f"http://{host}:{origin.port}/img/1.jpg"], out)  # default: public only
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.BLOCKED_ADDRESS)
    assert "--allow-private-networks" in (record.error_message or "")
    assert spy_connect == []  # no SYN sent anywhere
    assert origin.requests() == []


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f000001",
        "0X7F.0.0.1",
        "0177.0.0.1",
        "127.1",
        "127.0.0.1.",
        "0",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
        "%31%32%37.0.0.1",  # percent-encoded host
        "\uff11\uff12\uff17\u3002\uff10\u3002\uff10\u3002\uff11",  # full-width digits and dots
        "\u2460\u2461\u2466.0.0.1",  # circled digits (NFKC: 127.0.0.1)
    ],
)
def test_case_05_alternate_encodings_blocked(
    origin: Origin, tmp_path: Path, host: str, spy_connect: list[tuple[str, int]]
) -> None:
    out = tmp_path / "out"
    report = download([f"http://{host}:{origin.port}/img/1.jpg"], out)
    (record,) = records(report)
    assert record.status is Status.FAILED
    assert record.error_code in (ErrorCode.BLOCKED_ADDRESS, ErrorCode.INVALID_URL), record
    assert spy_connect == []
    assert origin.requests() == []
    assert final_files(out) == [] and leftovers(out) == []


@pytest.mark.parametrize(
    "answer",
    [["127.0.0.1"], ["10.1.2.3"], ["169.254.169.254"], ["::1"], ["93.184.216.34", "127.0.0.1"]],
)
def test_case_06_names_resolving_internal_blocked(
    origin: Origin,
    tmp_path: Path,
    answer: list[str],
    spy_connect: list[tuple[str, int]],
    engine: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answer

    out = tmp_path / "out"
    report = download(
        [f"http://internal.test:{origin.port}/img/1.jpg"],
        out,
        **injected_resolver(engine, monkeypatch, resolver),
        attempts=1,
    )
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.BLOCKED_ADDRESS)
    assert "internal.test" in (record.error_message or "")
    assert lookups == ["internal.test"]
    assert spy_connect == [] and origin.requests() == []


def test_case_07_dns_rebinding_connects_only_to_the_checked_ip(
    origin: Origin,
    tmp_path: Path,
    spy_connect: list[tuple[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
) -> None:
    # 127.0.0.1 plays the "public" address (explicitly allowed), 127.0.0.2 the internal one.
    trap = socket.socket()
    trap.bind(("127.0.0.2", origin.port))
    trap.listen(8)
    answers = iter([["127.0.0.1"]] + [["127.0.0.2"]] * 20)

    def resolver(host: str, port: int) -> list[str]:
        return next(answers)

    def no_system_dns(*args: object, **kwargs: object) -> object:
        raise AssertionError("urllib3 resolved the name again")

    monkeypatch.setattr(socket, "getaddrinfo", no_system_dns)
    url = f"http://rebind.test:{origin.port}/img/1.jpg"
    out = tmp_path / "out"
    try:
        report = download(
            [url, url + "?again"],
            out,
            # No DNS cache: each request sees the resolver's next answer, as in a rebinding
            # attack that outlasts the cache.
            **injected_resolver(
                engine, monkeypatch, resolver, allow_cidrs=("127.0.0.1/32",), cache_ttl=0
            ),
            threads=1,
        )
        trap.setblocking(False)
        with pytest.raises(BlockingIOError):
            trap.accept()  # nothing ever connected to the rebound address
    finally:
        trap.close()
    first, second = records(report)
    assert first.ok and sha((out / (first.path or "")).read_bytes()) == sha(origin.image_bytes(1))
    assert second.error_code is ErrorCode.BLOCKED_ADDRESS  # the rebound answer is checked too
    assert spy_connect == [("127.0.0.1", origin.port)]
    (request,) = origin.requests()
    assert request.headers["host"] == f"rebind.test:{origin.port}"


def test_case_08_duplicates_fetched_once_names_distinct_and_deterministic(
    origin: Origin, tmp_path: Path
) -> None:
    a, b = origin.url("/img/1.jpg"), origin.url("/img/1.jpg?v=2")
    c = origin.url("/small/1.jpg")  # same last segment, other folder
    urls = [a, b, a, c, a, b]
    report = download(urls, tmp_path / "one", **LOOPBACK)
    got = records(report)
    assert [r.status for r in got] == ["ok", "ok", "skipped", "ok", "skipped", "skipped"]
    assert all(got[i].error_code is ErrorCode.DUPLICATE for i in (2, 4, 5))
    assert got[2].path == got[4].path == got[0].path and got[5].path == got[1].path
    assert sorted(r.path for r in origin.requests()) == [
        "/img/1.jpg",
        "/img/1.jpg?v=2",
        "/small/1.jpg",
    ]
    names = [got[i].path for i in (0, 1, 3)]
    assert len(set(names)) == 3 and all(n and n.startswith("1-") for n in names)
    again = records(download(urls, tmp_path / "two", **LOOPBACK))
    assert [r.path for r in again] == [r.path for r in got]  # deterministic across runs


# ============================================================================ faulty servers


def test_case_09_refused_unresolvable_tls_reset_are_connect_errors(
    tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tls_reset(sock: socket.socket, server: FaultServer) -> None:
        sock.recv(1024)  # the ClientHello
        from socketserver_faults import reset

        reset(sock)

    def resolver(host: str, port: int) -> list[str]:
        if host == "nowhere.invalid":
            raise socket.gaierror(-2, "Name or service not known")
        return ["127.0.0.1"]

    with FaultServer(tls_reset) as server:
        urls = [
            f"http://refused.test:{free_port()}/a.jpg",
            "http://nowhere.invalid/a.jpg",
            f"https://reset.test:{server.port}/a.jpg",
        ]
        began = time.monotonic()
        report = download(
            urls,
            tmp_path / "out",
            **injected_resolver(engine, monkeypatch, resolver, allow_cidrs=("127.0.0.0/8",)),
            attempts=3,
            backoff_base=0.01,
            backoff_max=0.05,
        )
        elapsed = time.monotonic() - began
        assert server.connections == 3  # retried within the attempt budget
    for record in records(report):
        assert record.error_code is ErrorCode.CONNECT_ERROR, record
        assert record.attempts == 3
    assert elapsed < 15
    assert leftovers(tmp_path / "out") == []


def test_case_10_black_holed_connect_fails_at_connect_timeout(tmp_path: Path) -> None:
    # A full accept queue drops further SYNs: a real black hole on loopback.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=1)
    try:
        began = time.monotonic()
        report = download(
            [f"http://127.0.0.1:{port}/a.jpg"],
            tmp_path / "out",
            connect_timeout=0.5,
            attempts=2,
            backoff_base=0.01,
            **LOOPBACK,
        )
        elapsed = time.monotonic() - began
    finally:
        filler.close()
        hole.close()
    (record,) = records(report)
    assert_clean_failure(tmp_path / "out", record, ErrorCode.CONNECT_TIMEOUT)
    assert record.attempts == 2
    assert 0.9 <= elapsed < 10


def test_case_11_silent_server_idle_timeout_releases_the_thread(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    began = time.monotonic()
    report = download(
        [origin.url("/hang"), origin.image_url(3)],
        out,
        threads=1,
        read_timeout=0.5,
        attempts=1,
        **LOOPBACK,
    )
    elapsed = time.monotonic() - began
    hung, fine = records(report)
    assert hung.error_code is ErrorCode.READ_TIMEOUT and hung.path is None
    assert fine.ok, "the one thread was released and fetched the next URL"
    assert elapsed < 10
    assert leftovers(out) == []


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"total_timeout": 1.5, "read_timeout": 1.0, "min_speed": 0}, ErrorCode.TOTAL_TIMEOUT),
        ({"min_speed": 1000, "min_speed_window": 0.6, "read_timeout": 1.0}, ErrorCode.TOO_SLOW),
    ],
)
def test_case_12_slow_drip_hits_deadline_or_min_speed(
    origin: Origin, tmp_path: Path, options: dict[str, float], code: ErrorCode
) -> None:
    out = tmp_path / "out"
    began = time.monotonic()
    report = download(
        [origin.url("/drip?bytes=1000&interval=0.2")], out, attempts=1, **options, **LOOPBACK
    )
    (record,) = records(report)
    assert_clean_failure(out, record, code)
    assert time.monotonic() - began < 8


def test_case_13_truncated_body_is_incomplete_and_leaves_nothing(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = download([origin.url("/truncated")], out, attempts=2, backoff_base=0.01, **LOOPBACK)
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.INCOMPLETE_BODY)
    assert record.attempts == 2 and len(origin.requests("/truncated")) == 2
    assert "500 of 1000" in (record.error_message or "")


def test_case_14_reset_and_broken_chunked_fail_and_connection_not_reused(
    origin: Origin, tmp_path: Path
) -> None:
    broken_chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10\r\n0123456789abcdef\r\nzz-not-hex\r\n"
    )
    per_connection: list[list[str]] = []

    def handler(sock: socket.socket, server: FaultServer) -> None:
        seen: list[str] = []
        per_connection.append(seen)
        while not server.stopping.is_set():
            request = read_request(sock)
            if not request:
                return
            target = request.split(b" ", 2)[1].decode()
            seen.append(target)
            sock.sendall(broken_chunked if target == "/c" else response(200, b"fine"))

    with FaultServer(handler) as server:
        urls = [origin.url("/reset"), server.url("/c"), server.url("/ok"), server.url("/ok2")]
        report = download(
            urls, tmp_path / "out", attempts=2, backoff_base=0.01, threads=1, **LOOPBACK
        )
    reset, chunked, ok, ok2 = records(report)
    assert reset.error_code is ErrorCode.INCOMPLETE_BODY and reset.attempts == 2
    assert chunked.error_code is ErrorCode.PROTOCOL_ERROR and chunked.attempts == 2
    assert ok.ok and ok2.ok
    # A connection that carried a broken body is never used again.
    assert sum(seen.count("/c") for seen in per_connection) == 2
    for seen in per_connection:
        assert "/c" not in seen[:-1], per_connection
    assert sorted(p.name for p in final_files(tmp_path / "out")) == sorted([ok.path, ok2.path])
    assert len({r.conn for r in origin.requests("/reset")}) == 2
    assert leftovers(tmp_path / "out") == []


def test_case_15_huge_content_length_rejected_before_reading(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    began = time.monotonic()
    report = download([origin.url("/huge-length")], out, **LOOPBACK)
    elapsed = time.monotonic() - began
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.TOO_LARGE)
    assert record.attempts == 1 and "10000000000000" in (record.error_message or "")
    assert elapsed < 1.0


def test_case_16_endless_body_stopped_at_max_bytes_with_flat_memory(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    max_bytes = 16 * 1024 * 1024
    tracemalloc.start()
    try:
        report = download([origin.url("/endless?seconds=30")], out, max_bytes=max_bytes, **LOOPBACK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.TOO_LARGE)
    assert peak < max_bytes // 4, f"peak Python allocations {peak} grew with the body"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n" + b"x" * 20,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n0123456789\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10, 20\r\n\r\n" + b"x" * 20,
    ],
    ids=["two-lengths", "length-and-chunked", "length-list"],
)
def test_case_17_conflicting_framing_is_a_protocol_error(
    origin: Origin, tmp_path: Path, head: bytes
) -> None:
    with content_server({"/f": head}) as server:
        urls = [server.url("/f"), origin.url("/two-lengths")]
        report = download(urls, tmp_path / "out", attempts=1, **LOOPBACK)
    for record in records(report):
        assert record.error_code is ErrorCode.PROTOCOL_ERROR, record
    assert final_files(tmp_path / "out") == [] and leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    "payload",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(10_000)) + b"\r\n",
        b"HTTP/1.1 200 " + b"R" * (1024 * 1024) + b"\r\n\r\n",
    ],
    ids=["1MB-line", "10000-headers", "1MB-status-line"],
)
def test_case_18_header_abuse_is_a_protocol_error_with_bounded_memory(
    tmp_path: Path, payload: bytes
) -> None:
    with content_server({"/h": payload}) as server:
        tracemalloc.start()
        try:
            report = download([server.url("/h")], tmp_path / "out", attempts=1, **LOOPBACK)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    (record,) = records(report)
    assert_clean_failure(tmp_path / "out", record, ErrorCode.PROTOCOL_ERROR)
    assert peak < 512 * 1024, f"header parsing allocated {peak} bytes"


@pytest.mark.parametrize("kind", ["seconds", "http-date", "huge"])
def test_case_19_retry_after_honoured_capped_and_per_host(
    origin: Origin, origin2: Origin, tmp_path: Path, kind: str
) -> None:
    value = {
        "seconds": "1",
        "http-date": urllib.parse.quote(formatdate(time.time() + 2, usegmt=True)),
        "huge": "999999999",
    }[kind]
    urls = [origin.url(f"/retry-after/k/{value}")] + [origin2.image_url(n) for n in range(6)]
    began = time.monotonic()
    report = download(urls, tmp_path / "out", retry_after_max=2.5, **LOOPBACK)
    elapsed = time.monotonic() - began
    got = records(report)
    assert all(r.ok for r in got), [(r.error_code, r.error_message) for r in got]
    assert got[0].attempts == 2
    first, second = origin.requests("/retry-after/")
    waited = second.time - first.time
    assert waited >= 0.9  # honoured (an HTTP-date 2 s ahead rounds down to >= 1 s)
    assert waited < 2.5 + 1.5 and elapsed < 10  # capped at retry_after_max
    # Other hosts are not held back: all of origin2 finished before the first retry.
    assert max(r.time for r in origin2.requests()) < second.time


@pytest.mark.parametrize("code", [401, 403, 404, 410, 400, 451])
def test_case_20_client_errors_not_retried_and_page_not_saved(
    origin: Origin, tmp_path: Path, code: int
) -> None:
    out = tmp_path / "out"
    report = download([origin.url(f"/status/{code}")], out, **LOOPBACK)
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.HTTP_ERROR)
    assert record.http_status == code and record.attempts == 1
    assert len(origin.requests("/status/")) == 1


@pytest.mark.parametrize("code", [500, 502, 503, 504, 408, 429])
def test_case_21_server_errors_retried_to_success(
    origin: Origin, tmp_path: Path, code: int
) -> None:
    out = tmp_path / "out"
    report = download(
        [origin.url(f"/flaky/k/2/{code}")], out, backoff_base=0.2, backoff_max=0.4, **LOOPBACK
    )
    (record,) = records(report)
    assert record.ok and record.attempts == 3 and record.http_status == 200
    times = [r.time for r in origin.requests("/flaky/")]
    assert len(times) == 3
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap < 0.4 + 1.0 for gap in gaps)  # full jitter over base * 2**n, capped
    data = (out / (record.path or "")).read_bytes()
    assert sha(data) == sha(origin.image_bytes(0)) and data.startswith(JPEG_HEAD)


def test_case_22_html_instead_of_image_is_not_an_image(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download(
        [origin.url("/not-image"), origin.url("/html"), origin.image_url(1)],
        out,
        verify=True,
        processes=1,
        **LOOPBACK,
    )
    html1, html2, image = records(report)
    for record in (html1, html2):
        assert record.error_code is ErrorCode.NOT_AN_IMAGE and record.path is None
    assert image.ok and image.path and image.path.endswith(".jpg")
    assert [p.name for p in final_files(out)] == [image.path]
    assert leftovers(out) == []


@pytest.mark.parametrize("path", ["/garbage", "/empty"])
def test_case_23_garbage_or_empty_reply_is_a_quick_protocol_error(
    origin: Origin, tmp_path: Path, path: str
) -> None:
    out = tmp_path / "out"
    began = time.monotonic()
    report = download([origin.url(path)], out, attempts=2, backoff_base=0.01, **LOOPBACK)
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.PROTOCOL_ERROR)
    assert record.attempts == 2
    assert time.monotonic() - began < 3


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    folder = tmp_path_factory.mktemp("certs")
    made = {
        "self-signed": make_cert(folder, "self", cn="127.0.0.1", san="IP:127.0.0.1"),
        "wrong-host": make_cert(folder, "wrong", cn="other.example", san="DNS:other.example"),
    }
    made["expired"] = make_cert(folder, "expired", cn="127.0.0.1", san="IP:127.0.0.1", days=-1)
    return made


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("self-signed", "self-signed certificate"),
        ("wrong-host", "mismatch"),
        ("expired", "certificate has expired"),
    ],
)
def test_case_24_bad_certificates_are_tls_errors_unless_insecure(
    tmp_path: Path,
    certs: dict[str, tuple[str, str]],
    kind: str,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kind != "self-signed":
        # Trust the certificate itself (OpenSSL reads SSL_CERT_FILE when urllib3 loads the
        # default CAs), so the failure is the one under test, not "unknown issuer".
        monkeypatch.setenv("SSL_CERT_FILE", certs[kind][0])
    body = jpeg_bytes()
    with FaultServer(
        lambda sock, srv: (read_request(sock), sock.sendall(response(200, body))),
        tls=tls_context(certs[kind]),
    ) as server:
        strict = download([server.url("/a.jpg")], tmp_path / "strict", attempts=1, **LOOPBACK)
        (record,) = records(strict)
        assert_clean_failure(tmp_path / "strict", record, ErrorCode.TLS_ERROR)
        assert reason in (record.error_message or ""), record.error_message
        relaxed = download([server.url("/a.jpg")], tmp_path / "insecure", insecure=True, **LOOPBACK)
        (ok,) = records(relaxed)
    assert ok.ok, ok.error_message
    assert (tmp_path / "insecure" / (ok.path or "")).read_bytes() == body


def test_case_24_trusted_certificate_succeeds_without_insecure(
    tmp_path: Path, certs: dict[str, tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same server with its certificate trusted is fetched, verified."""
    monkeypatch.setenv("SSL_CERT_FILE", certs["self-signed"][0])
    body = jpeg_bytes()
    with FaultServer(
        lambda sock, srv: (read_request(sock), sock.sendall(response(200, body))),
        tls=tls_context(certs["self-signed"]),
    ) as server:
        report = download([server.url("/a.jpg")], tmp_path / "out", attempts=1, **LOOPBACK)
    (record,) = records(report)
    assert record.ok, record.error_message


# ============================================================================ redirects


def test_case_25_loops_and_long_chains_fail_with_the_chain_recorded(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = download(
        [origin.url("/redirect-loop"), origin.url("/redirect/50"), origin.url("/redirect/10")],
        out,
        **LOOPBACK,
    )
    loop, chain, fine = records(report)
    assert loop.error_code is ErrorCode.TOO_MANY_REDIRECTS and "loop" in (loop.error_message or "")
    assert loop.attempts == 1
    assert chain.error_code is ErrorCode.TOO_MANY_REDIRECTS and chain.attempts == 1
    assert 10 <= len(chain.redirects) <= 12, chain.redirects
    assert len(origin.requests("/redirect/")) <= 12 + 1 + 10
    assert fine.ok and len(fine.redirects) == 10  # exactly max_redirects is allowed
    assert [p.name for p in final_files(out)] == [fine.path]


@pytest.mark.parametrize(
    "location",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "data:image/jpeg;base64,/9j/4AAQ",
        "gopher://127.0.0.1:70/x",
        "//[::1",
        "http://127.0.0.1:99999/x",
    ],
)
def test_case_26_redirect_to_other_schemes_refused(
    origin: Origin, tmp_path: Path, location: str
) -> None:
    out = tmp_path / "out"
    url = origin.url("/redirect-to?url=" + urllib.parse.quote(location, safe=""))
    report = download([url], out, attempts=1, **LOOPBACK)
    (record,) = records(report)
    assert record.status is Status.FAILED and record.path is None
    assert record.error_code in (ErrorCode.REDIRECT_REFUSED, ErrorCode.INVALID_URL), record
    assert len(origin.requests()) == 1
    assert final_files(out) == [] and leftovers(out) == []


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/",
        "http://127.0.0.2:{port}/img/1.jpg",
        "http://2130706434:{port}/img/1.jpg",  # 127.0.0.2 in decimal
        "http://10.0.0.1/",
    ],
)
def test_case_27_redirect_to_internal_refused_on_that_hop(
    origin: Origin, tmp_path: Path, target: str, spy_connect: list[tuple[str, int]]
) -> None:
    trap = socket.socket()
    trap.bind(("127.0.0.2", origin.port))
    trap.listen(8)
    location = target.format(port=origin.port)
    url = origin.url("/redirect-to?url=" + urllib.parse.quote(location, safe=""))
    out = tmp_path / "out"
    try:
        # Only the origin's own address is allowed; the redirect's target is not.
        report = download([url], out, allow_cidrs=("127.0.0.1/32",), attempts=1)
        trap.setblocking(False)
        with pytest.raises(BlockingIOError):
            trap.accept()
    finally:
        trap.close()
    (record,) = records(report)
    assert_clean_failure(out, record, ErrorCode.BLOCKED_ADDRESS)
    assert spy_connect == [("127.0.0.1", origin.port)]  # zero connections for the bad hop
    assert record.redirects and record.redirects[-1] == location


def test_case_28_cross_host_redirect_strips_credentials(
    origin: Origin, origin2: Origin, tmp_path: Path
) -> None:
    target = origin2.url("/headers")
    hop = "/redirect-to?url=" + urllib.parse.quote(target, safe="")
    url = f"http://user:secret@127.0.0.1:{origin.port}{hop}"
    report = download(
        [url],
        tmp_path / "out",
        headers=[("Cookie", "session=1"), ("X-Keep", "yes")],
        **LOOPBACK,
    )
    (record,) = records(report)
    assert record.ok, record.error_message
    (first,) = origin.requests("/redirect-to")
    assert first.headers["authorization"].startswith("Basic ")
    assert first.headers["cookie"] == "session=1"
    echoed = json.loads((tmp_path / "out" / (record.path or "")).read_text())
    assert "authorization" not in echoed and "cookie" not in echoed
    assert echoed["x-keep"] == "yes"


def test_case_28_https_to_http_downgrade_refused(
    origin: Origin, tmp_path: Path, certs: dict[str, tuple[str, str]]
) -> None:
    location = origin.image_url(1)
    redirect = response(302, b"", {"Location": location})
    with FaultServer(
        lambda sock, srv: (read_request(sock), sock.sendall(redirect)),
        tls=tls_context(certs["self-signed"]),
    ) as server:
        report = download([server.url("/a")], tmp_path / "out", insecure=True, **LOOPBACK)
    (record,) = records(report)
    assert_clean_failure(tmp_path / "out", record, ErrorCode.REDIRECT_REFUSED)
    assert "downgrade" in (record.error_message or "")
    assert origin.requests() == []


@pytest.mark.parametrize(
    ("location", "body"),
    [
        ("/../../.bashrc", b"export EVIL=1\n"),
        ("/files/evil.exe", b"MZ\x90\x00" + bytes(200)),
        ("/x/..%2f..%2f.ssh%2fauthorized_keys", b"ssh-rsa AAAA\n"),
        ("/pic.jpg/../../../../tmp/x.sh", jpeg_bytes()),
    ],
)
def test_case_29_redirect_target_never_names_the_file(
    tmp_path: Path, location: str, body: bytes
) -> None:
    def route(request: bytes) -> bytes:
        target = request.split(b" ", 2)[1].decode()
        if target == "/start":
            return response(302, b"", {"Location": location})
        return response(200, body, {"Content-Type": "application/octet-stream"})

    with FaultServer(serve_forever_keepalive(route)) as server:
        out = tmp_path / "out"
        report = download([server.url("/start")], out, **LOOPBACK)
    (record,) = records(report)
    assert record.ok, record.error_message
    expected = file_name(server.url("/start"), ".jpg" if body.startswith(b"\xff\xd8") else None)
    assert record.path == expected, "named from our URL and the bytes, not the redirect"
    assert record.path.startswith("start-") and not record.path.endswith((".exe", ".sh", ".bashrc"))
    assert [p.relative_to(out).as_posix() for p in final_files(out)] == [record.path]
    assert not (tmp_path / ".bashrc").exists() and not (tmp_path / "tmp").exists()


# ============================================================================ hostile content


@pytest.mark.parametrize(
    "filename",
    [
        '"../../x"',
        '"/etc/passwd"',
        '"C:evil.dll"',
        '"..%2F..%2Fx"',
        '"a\\u0000b.sh"',
        '"\u202egpj.exe"'.encode().decode("latin-1"),  # RTL override, as raw UTF-8 bytes
        '"' + "A" * 4096 + '"',
        "*=UTF-8''..%2F..%2Fevil.sh",
    ],
)
def test_case_30_content_disposition_is_ignored_for_naming(
    origin: Origin, tmp_path: Path, filename: str
) -> None:
    body = jpeg_bytes()
    header = "attachment; filename" + ("" if filename.startswith("*") else "=") + filename
    with content_server({"/d": response(200, body, {"Content-Disposition": header})}) as server:
        urls = [server.url("/d"), origin.url("/disposition")]
        out = tmp_path / "deep" / "out"
        out.parent.mkdir()
        report = download(urls, out, **LOOPBACK)
    first, second = records(report)
    assert first.ok and second.ok
    assert first.path == file_name(urls[0], ".jpg")
    assert second.path == file_name(urls[1], ".jpg")
    assert sorted(p.name for p in final_files(out)) == sorted([first.path, second.path])
    assert sorted(os.listdir(tmp_path)) == ["deep"] and os.listdir(tmp_path / "deep") == ["out"]


def test_case_31_url_path_tricks_get_safe_distinct_deterministic_names(tmp_path: Path) -> None:
    body = jpeg_bytes()
    paths = [
        "/a/%2e%2e/%2e%2e/etc/passwd",
        "/a/..%2f..%2fetc%2fpasswd",
        "/a/..%2F..%2Fetc%2Fpasswd",
        "/?only=query",
        "/?only=query2",
        "/dir/",
        "/dir",
        "/Photo.JPG",
        "/photo.jpg",
        "/caf%C3%A9.jpg",
        "/cafe%CC%81.jpg",  # the same word, decomposed Unicode
        "/%00nul.jpg",
        "/CON.jpg",
        "/-rf.jpg",
        "/.hidden.jpg",
        "/" + "%2e" * 40,
    ]
    with FaultServer(serve_forever_keepalive(lambda request: response(200, body))) as server:
        urls = [server.url(p) for p in paths]
        out = tmp_path / "out"
        report = download(urls, out, **LOOPBACK)
        again = download(urls, tmp_path / "again", **LOOPBACK)
    got = records(report)
    assert all(r.ok for r in got), [r.error_message for r in got if not r.ok]
    names = [r.path or "" for r in got]
    assert len(set(names)) == len(names)
    assert len({n.lower() for n in names}) == len(names)  # distinct on case-insensitive disks
    for name in names:
        assert "/" not in name and "\\" not in name and "\0" not in name
        assert not name.startswith((".", "-")) and name.isascii() and len(name) <= 84
        assert not name.upper().startswith("CON.")
    assert sorted(p.name for p in final_files(out)) == sorted(names)
    assert [r.path for r in records(again)] == names
    assert sorted(os.listdir(tmp_path)) == ["again", "out"]


def test_case_32_planted_symlinks_are_never_followed(origin: Origin, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    url = origin.image_url(1)
    name = file_name(url, ".jpg")
    (out / name).symlink_to(victim)  # the final name
    (out / name.replace(".jpg", ".json")).symlink_to(victim)  # the sidecar's name
    report = download([url], out, sidecar=True, **LOOPBACK)
    (record,) = records(report)
    assert record.ok and record.path == name.replace(".jpg", "-2.jpg")
    assert (out / record.path).read_bytes() == origin.image_bytes(1)
    assert (out / name).is_symlink() and victim.read_text() == "precious\n"

    # The temp folder (and the state folder) planted as symlinks: refused before any request.
    for planted in (".fetchpool/tmp", ".fetchpool"):
        other = tmp_path / f"out-{planted.count('/')}"
        (other / ".fetchpool").mkdir(parents=True)
        if planted == ".fetchpool":
            (other / ".fetchpool").rmdir()
        (other / planted).symlink_to(victim_dir, target_is_directory=True)
        (victim_dir / "keep.txt").write_text("keep")
        origin.reset_counters()
        with pytest.raises(Exception, match="not a folder"):
            download([url], other, **LOOPBACK)
        assert origin.requests() == []
        assert sorted(os.listdir(victim_dir)) == ["keep.txt"]

    # Journal files planted as symlinks to a file outside OUT: never written through.
    for planted in ("state.db", "state.db-wal", "state.db-shm", "lock"):
        target = tmp_path / f"victim-{planted}"
        target.write_bytes(b"")  # empty: SQLite would happily turn it into a database
        other = tmp_path / f"out-{planted}"
        (other / ".fetchpool").mkdir(parents=True)
        (other / ".fetchpool" / planted).symlink_to(target)
        with pytest.raises(Exception):  # noqa: B017 - OutputError or StateError
            download([url], other, **LOOPBACK)
        assert target.read_bytes() == b"", f"{planted}: the file outside OUT was written"


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


def _png_with_ztxt(size: int) -> bytes:
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    data = b"Comment\x00\x00" + zlib.compress(b"\x00" * size, 9)
    chunk = b"zTXt" + data
    extra = struct.pack(">I", len(data)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:33] + extra + png[33:]  # right after IHDR


def _gif_frame_beyond_canvas() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, "GIF")
    gif = bytearray(buffer.getvalue())
    start = gif.index(b"\x2c")  # the image descriptor: left, top, width, height
    gif[start + 5 : start + 9] = (60000).to_bytes(2, "little") + (60000).to_bytes(2, "little")
    return bytes(gif)


def _stacked_gzip() -> bytes:
    layer = b"\x00" * (64 * 1024 * 1024)
    for _ in range(3):
        layer = gzip.compress(layer, 9)
    return layer


def test_case_33_decompression_bombs_rejected_from_the_header(tmp_path: Path) -> None:
    routes = {
        "/png-100k": response(200, _png_header(100_000, 100_000), {"Content-Type": "image/png"}),
        "/gif-canvas": response(200, _gif_frame_beyond_canvas(), {"Content-Type": "image/gif"}),
        "/ztxt": response(200, _png_with_ztxt(50 * 1024 * 1024), {"Content-Type": "image/png"}),
        "/gzip": response(
            200, _stacked_gzip(), {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
        ),
    }
    out = tmp_path / "out"
    with content_server(routes) as server:
        urls = [server.url(p) for p in routes]
        began = time.monotonic()
        report = download(
            urls, out, verify=True, processes=1, memory_limit=512 * 1024**2, **LOOPBACK
        )
        elapsed = time.monotonic() - began
        plain = download([server.url("/gzip")], tmp_path / "plain", **LOOPBACK)
    png, gif, ztxt, stacked = records(report)
    assert png.error_code is ErrorCode.IMAGE_TOO_LARGE, png
    assert gif.status is Status.FAILED and gif.error_code in (
        ErrorCode.NOT_AN_IMAGE,
        ErrorCode.IMAGE_TOO_LARGE,
    ), gif
    assert ztxt.status is Status.FAILED and ztxt.error_code is ErrorCode.NOT_AN_IMAGE, ztxt
    assert stacked.error_code is ErrorCode.NOT_AN_IMAGE  # one declared layer decoded: gzip still
    assert final_files(out) == [] and leftovers(out) == []
    assert elapsed < 30
    # Without image processing the declared coding (one gzip layer) is decoded, bounded by
    # max_bytes and the expansion ratio; the layers the server did not declare stay as sent.
    (raw,) = records(plain)
    sent = routes["/gzip"][routes["/gzip"].index(b"\r\n\r\n") + 4 :]
    assert raw.ok and raw.bytes == len(gzip.decompress(sent))


def _many_frame_gif(frames: int) -> bytes:
    buffer = io.BytesIO()
    images = [Image.new("RGB", (2, 2), (i % 256, i // 256 % 256, 0)) for i in range(frames)]
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=1)
    return buffer.getvalue()


def test_case_34_format_allow_list_and_frame_cap(tmp_path: Path) -> None:
    good = jpeg_bytes((64, 48))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n(pwned) print showpage\n"
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>'
    routes = {
        "/truncated.jpg": response(200, good[: len(good) // 2], {"Content-Type": "image/jpeg"}),
        "/eps.png": response(200, eps, {"Content-Type": "image/png"}),
        "/eps-binary.png": response(
            200, b"\xc5\xd0\xd3\xc6" + bytes(26) + eps, {"Content-Type": "image/png"}
        ),
        "/img.svg": response(200, svg, {"Content-Type": "image/svg+xml"}),
        "/frames.gif": response(200, _many_frame_gif(10_000), {"Content-Type": "image/gif"}),
        "/good.jpg": response(200, good, {"Content-Type": "image/jpeg"}),
    }
    out = tmp_path / "out"
    ghostscript = tmp_path / "bin" / "gs"
    ghostscript.parent.mkdir()
    ghostscript.write_text(f"#!/bin/sh\ntouch {tmp_path}/GHOSTSCRIPT_RAN\n")
    ghostscript.chmod(0o755)
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{ghostscript.parent}{os.pathsep}{old_path}"  # workers inherit it
    try:
        with content_server(routes) as server:
            report = download(
                [server.url(p) for p in routes], out, verify=True, processes=1, **LOOPBACK
            )
    finally:
        os.environ["PATH"] = old_path
    truncated, eps1, eps2, svg_rec, frames, fine = records(report)
    for record in (truncated, eps1, eps2, svg_rec):
        assert record.error_code is ErrorCode.NOT_AN_IMAGE, record
    assert frames.error_code is ErrorCode.IMAGE_TOO_LARGE and "frames" in (
        frames.error_message or ""
    )
    assert fine.ok and fine.path and fine.path.endswith(".jpg")
    assert [p.name for p in final_files(out)] == [fine.path]
    assert not (tmp_path / "GHOSTSCRIPT_RAN").exists()


def test_case_35_crashing_or_hanging_worker_costs_one_item(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fetchpool.process as process_module

    real = process_module.ImageStage

    def with_faults(*args: object, **kwargs: object) -> object:
        return real(*args, processor=misbehaving_processor, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(process_module, "ImageStage", with_faults)
    urls = [origin.image_url(n, small=True) for n in range(6)]
    urls[1] = origin.url(f"/bytes/{CRASH_SIZE}")
    urls[4] = origin.url(f"/bytes/{HANG_SIZE}")
    out = tmp_path / "out"
    began = time.monotonic()
    report = download(urls, out, verify=True, processes=2, item_timeout=3.0, **LOOPBACK)
    elapsed = time.monotonic() - began
    got = records(report)
    assert got[1].error_code is ErrorCode.PROCESS_FAILED, got[1]
    assert got[4].error_code is ErrorCode.PROCESS_FAILED and "took over" in (
        got[4].error_message or ""
    )
    for i in (0, 2, 3, 5):
        assert got[i].ok, (i, got[i].error_code, got[i].error_message)
        assert (out / (got[i].path or "")).read_bytes() == origin.image_bytes(i, small=True)
    assert len(final_files(out)) == 4 and leftovers(out) == []
    assert elapsed < 60
    assert threading.active_count() < 50
