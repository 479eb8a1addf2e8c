"""The embedded origin: images, endpoints and faults over real loopback HTTP."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import json
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from click.testing import CliRunner
from PIL import Image, UnidentifiedImageError

from fetchpool.origin import POOL_SIZE, Origin, image_bytes, payload_bytes
from fetchpool.origin.cli import serve_command
from fetchpool.origin.server import ENDPOINTS

# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    manager = urllib3.PoolManager(retries=False, timeout=10)
    yield manager
    manager.clear()


def raw(origin: Origin, path: str, *, timeout: float = 5.0, extra: str = "") -> bytes:
    """Send one request with Connection: close; return everything read until EOF."""
    with socket.create_connection(("127.0.0.1", origin.port), timeout=timeout) as sock:
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
        sock.sendall(head.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (last value wins, names lower-cased) and body of a raw response."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def timed_get(pool: urllib3.PoolManager, url: str) -> tuple[urllib3.BaseHTTPResponse, float]:
    start = time.perf_counter()
    response = pool.request("GET", url, redirect=False)
    return response, time.perf_counter() - start


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- images ----------------------------------------------------------------------------------


def test_default_jpegs_are_valid_photo_sized() -> None:
    for n in range(POOL_SIZE):  # one per base picture: every size in use
        data = image_bytes(n)
        image = decode(data)
        assert image.format == "JPEG"
        assert image.width >= 600 and image.height >= 480
        assert 50_000 <= len(data) <= 200_000, (n, len(data))


def test_thousand_images_are_distinct_and_cheap() -> None:
    start = time.perf_counter()
    digests = {hashlib.sha256(image_bytes(n)).hexdigest() for n in range(1000)}
    assert len(digests) == 1000
    assert time.perf_counter() - start < 10


def test_variants_share_pixels_but_not_bytes() -> None:
    a, b = image_bytes(3), image_bytes(3 + POOL_SIZE)
    assert a != b
    assert decode(a).tobytes() == decode(b).tobytes()
    assert decode(a).info["comment"] == b"fetchpool-origin n=3 seed=0"


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
@pytest.mark.parametrize("small", [False, True])
def test_every_format_is_valid_and_distinct(ext: str, small: bool) -> None:
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    first, second = image_bytes(1, ext=ext, small=small), image_bytes(2, ext=ext, small=small)
    other = image_bytes(1 + POOL_SIZE, ext=ext, small=small)
    assert len({first, second, other}) == 3
    for data in (first, second, other):
        image = decode(data)
        assert image.format == formats[ext]
        assert (image.width < 128) == small


def test_seed_and_determinism() -> None:
    assert image_bytes(5, seed=1) != image_bytes(5, seed=0)
    image_bytes.cache_clear()
    code = "from fetchpool.origin import image_bytes; import sys; sys.stdout.buffer.write("
    code += "image_bytes(5, seed=1))"
    other_process = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, timeout=60
    ).stdout
    assert other_process == image_bytes(5, seed=1)


def test_bad_image_arguments() -> None:
    with pytest.raises(ValueError, match="index"):
        image_bytes(-1)
    with pytest.raises(ValueError, match="extension"):
        image_bytes(1, ext="gif")
    assert image_bytes(1, ext="jpeg") == image_bytes(1)


def test_payload_bytes() -> None:
    data = payload_bytes(200_000)
    assert len(data) == 200_000 and data == payload_bytes(200_000)
    assert payload_bytes(10, seed=1) != payload_bytes(10)
    assert payload_bytes(0) == b""


# --- serving ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "small", "ctype"),
    [
        ("jpg", False, "image/jpeg"),
        ("png", False, "image/png"),
        ("webp", True, "image/webp"),
        ("jpg", True, "image/jpeg"),
    ],
)
def test_served_bytes_are_image_bytes(
    origin: Origin, pool: urllib3.PoolManager, ext: str, small: bool, ctype: str
) -> None:
    for n in (0, 7, 123):
        response = pool.request("GET", origin.image_url(n, ext, small=small))
        assert response.status == 200
        assert response.headers["Content-Type"] == ctype
        assert response.data == origin.image_bytes(n, ext, small=small)


def test_urls_and_image_without_extension(origin: Origin, pool: urllib3.PoolManager) -> None:
    assert origin.base_url == f"http://127.0.0.1:{origin.port}"
    assert origin.url("html") == origin.url("/html") == origin.base_url + "/html"
    assert origin.image_url(4) == origin.base_url + "/img/4.jpg"
    response = pool.request("GET", origin.url("/img/4"))
    assert response.headers["Content-Type"] == "image/jpeg"
    assert response.data == image_bytes(4)


def test_keep_alive_reuses_one_connection(origin: Origin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
    try:
        for n in range(5):
            conn.request("GET", f"/img/{n}.jpg")
            response = conn.getresponse()
            assert response.read() == image_bytes(n)
            assert response.getheader("Connection") == "keep-alive"
        conn.request("HEAD", "/img/9.jpg")
        response = conn.getresponse()
        assert response.read() == b""
        assert response.getheader("Content-Length") == str(len(image_bytes(9)))
        conn.request("POST", "/html", body=b"x" * 5000)  # the body is read and discarded
        assert conn.getresponse().read().startswith(b"<!doctype html>")
    finally:
        conn.close()
    logs = origin.requests()
    assert len(logs) == 7
    assert len({log.conn for log in logs}) == 1


def test_request_log(origin: Origin, pool: urllib3.PoolManager) -> None:
    before = time.time()
    pool.request("GET", origin.url("/html?a=1"), headers={"X-Test": "yes"})
    pool.request("GET", origin.image_url(1))
    logs = origin.requests()
    assert [log.path for log in logs] == ["/html?a=1", "/img/1.jpg"]
    assert logs[0].method == "GET" and logs[0].headers["x-test"] == "yes"
    assert before - 1 <= logs[0].time <= time.time() + 1
    assert [log.path for log in origin.requests("/img/")] == ["/img/1.jpg"]
    origin.reset_counters()
    assert origin.requests() == []


def test_latency_and_override(pool: urllib3.PoolManager) -> None:
    with Origin(latency=0.3, jitter=0.05) as slow:
        response, elapsed = timed_get(pool, slow.url("/html"))
        assert response.status == 200 and elapsed >= 0.28
        _, elapsed = timed_get(pool, slow.url("/html?latency=0"))
        assert elapsed < 0.25  # the query replaces the configured latency
    with Origin() as fast:
        _, elapsed = timed_get(pool, fast.url("/img/1.jpg?latency=0.2"))
        assert elapsed >= 0.18


def test_bandwidth_limit(pool: urllib3.PoolManager) -> None:
    with Origin(bandwidth=200_000) as limited:
        response, elapsed = timed_get(pool, limited.url("/bytes/100000"))
        assert response.data == payload_bytes(100_000)
        assert elapsed >= 0.4


# --- endpoints -------------------------------------------------------------------------------


def test_bytes_html_headers(origin: Origin, pool: urllib3.PoolManager) -> None:
    response = pool.request("GET", origin.url("/bytes/300000"))
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.data == origin.payload_bytes(300_000)
    assert pool.request("GET", origin.url("/bytes/0")).data == b""
    page = pool.request("GET", origin.url("/html"))
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    echo = pool.request("GET", origin.url("/headers"), headers={"X-Probe": "42"})
    assert json.loads(echo.data)["x-probe"] == "42"


def test_status(origin: Origin, pool: urllib3.PoolManager) -> None:
    response = pool.request("GET", origin.url("/status/503?retry_after=7"))
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    assert b"503" in response.data and response.headers["Content-Type"].startswith("text/html")
    assert "Retry-After" not in pool.request("GET", origin.url("/status/500")).headers
    assert pool.request("GET", origin.url("/status/204")).data == b""
    assert pool.request("GET", origin.url("/status/999")).status == 400
    assert pool.request("GET", origin.url("/status/x")).status == 400


def test_flaky_counts_per_key(origin: Origin, pool: urllib3.PoolManager) -> None:
    url = origin.url("/flaky/a/2/503")
    statuses = [pool.request("GET", url).status for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert pool.request("GET", url).data == image_bytes(0)
    assert pool.request("GET", origin.url("/flaky/b/1/500?n=4")).status == 500
    assert pool.request("GET", origin.url("/flaky/b/1/500?n=4")).data == image_bytes(4)
    origin.reset_counters()
    assert pool.request("GET", url).status == 503


@pytest.mark.parametrize("value", ["5", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_retry_after(origin: Origin, pool: urllib3.PoolManager, value: str) -> None:
    url = origin.url(f"/retry-after/k/{urllib.parse.quote(value)}")
    first = pool.request("GET", url)
    assert first.status == 429 and first.headers["Retry-After"] == value
    second = pool.request("GET", url)
    assert second.status == 200 and second.data == image_bytes(0)


def test_redirect_chain(origin: Origin, pool: urllib3.PoolManager) -> None:
    locations = []
    path = "/redirect/3?n=6"
    for _ in range(3):
        response = pool.request("GET", origin.url(path), redirect=False)
        assert response.status == 302
        path = response.headers["Location"]
        locations.append(path)
    assert locations == ["/redirect/2?n=6", "/redirect/1?n=6", "/img/6.jpg?n=6"]
    assert pool.request("GET", origin.url(path)).data == image_bytes(6)
    followed = pool.request("GET", origin.url("/redirect/4"), retries=urllib3.Retry(redirect=5))
    assert followed.status == 200 and followed.data == image_bytes(0)
    assert pool.request("GET", origin.url("/redirect/0")).data == image_bytes(0)


def test_absolute_and_odd_redirects(origin: Origin, pool: urllib3.PoolManager) -> None:
    response = pool.request("GET", origin.url("/redirect-abs/2"), redirect=False)
    assert response.headers["Location"] == origin.url("/redirect-abs/1")
    loop = pool.request("GET", origin.url("/redirect-loop"), redirect=False)
    assert loop.status == 302 and loop.headers["Location"] == "/redirect-loop"
    query = urllib.parse.urlencode({"url": "file:///etc/passwd", "code": "301"})
    to = pool.request("GET", origin.url(f"/redirect-to?{query}"), redirect=False)
    assert to.status == 301 and to.headers["Location"] == "file:///etc/passwd"
    default = pool.request("GET", origin.url("/redirect-to?url=ftp://x/y"), redirect=False)
    assert default.status == 302 and default.headers["Location"] == "ftp://x/y"
    for bad in ("/redirect-to", "/redirect-to?url=x&code=200", "/redirect-to?url=a%0d%0aX:%20y"):
        assert pool.request("GET", origin.url(bad), redirect=False).status == 400


def test_truncated(origin: Origin) -> None:
    status, headers, body = split(raw(origin, "/truncated"))
    assert status == 200 and headers["content-length"] == "1000"
    assert body == image_bytes(0)[:500]
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
    try:
        conn.request("GET", "/truncated")
        with pytest.raises(http.client.IncompleteRead):
            conn.getresponse().read()
    finally:
        conn.close()


def test_drip(origin: Origin) -> None:
    start = time.perf_counter()
    status, headers, body = split(raw(origin, "/drip?bytes=3&interval=0.1"))
    assert time.perf_counter() - start >= 0.25
    assert status == 200 and headers["content-length"] == "3"
    assert body == payload_bytes(3)


def test_reset_sends_rst(origin: Origin) -> None:
    received = b""
    with (
        socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock,
        pytest.raises(ConnectionResetError),
    ):
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
        while chunk := sock.recv(65536):
            received += chunk
        # A FIN instead of the RST would end the loop above without an error.
    assert len(received) < 100_000


def test_huge_length_and_two_lengths(origin: Origin) -> None:
    status, headers, body = split(raw(origin, "/huge-length"))
    assert status == 200 and headers["content-length"] == "10000000000000"
    assert 0 < len(body) < 1_000_000
    response = raw(origin, "/two-lengths")
    assert b"Content-Length: 100\r\n" in response and b"Content-Length: 200\r\n" in response


def test_endless(origin: Origin, pool: urllib3.PoolManager) -> None:
    with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
        sock.sendall(b"GET /endless?seconds=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        total = len(first.partition(b"\r\n\r\n")[2])
        while chunk := sock.recv_into(bytearray(1 << 20)):  # count, do not keep: it is fast
            total += chunk
    status, headers, _ = split(first)
    assert status == 200 and "content-length" not in headers
    assert total > 65536
    # A client that leaves early frees the server (and the origin keeps serving).
    with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert len(sock.recv(65536)) > 0
    assert pool.request("GET", origin.url("/html")).status == 200


def test_empty_garbage_hang(origin: Origin) -> None:
    assert raw(origin, "/empty") == b""
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=5)
    try:
        conn.request("GET", "/empty")
        with pytest.raises(http.client.RemoteDisconnected):
            conn.getresponse()
    finally:
        conn.close()
    garbage = raw(origin, "/garbage")
    assert garbage and not garbage.startswith(b"HTTP/")
    with pytest.raises(TimeoutError):
        raw(origin, "/hang", timeout=0.3)


def test_disposition_gzip_not_image(origin: Origin, pool: urllib3.PoolManager) -> None:
    response = pool.request("GET", origin.url("/disposition"))
    assert response.headers["Content-Disposition"] == 'attachment; filename="../../evil.sh"'
    assert response.data == image_bytes(0)
    zipped = pool.request("GET", origin.url("/gzip?n=3"), decode_content=False)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.data) == image_bytes(3)
    fake = pool.request("GET", origin.url("/not-image"))
    assert fake.headers["Content-Type"] == "image/jpeg"
    with pytest.raises(UnidentifiedImageError):
        decode(fake.data)


@pytest.mark.parametrize("path", ["/nope", "/img/abc.jpg", "/img/1.gif", "/img/1/2", "/bytes/-1"])
def test_unknown_paths_are_404(origin: Origin, pool: urllib3.PoolManager, path: str) -> None:
    response = pool.request("GET", origin.url(path))
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("text/html") and b"404" in response.data


def test_malformed_requests(origin: Origin) -> None:
    for request in (b"NONSENSE", b"GET / HTTP/1.1\r\nContent-Length: -5", b"GET / HTTP/1.1\r\nx"):
        with socket.create_connection(("127.0.0.1", origin.port), timeout=5) as sock:
            sock.sendall(request + b"\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    assert split(raw(origin, "?q=1"))[0] == 404
    status, _, _ = split(raw(origin, "/html", extra="X-Big: " + "a" * 70_000 + "\r\n"))
    assert status == 431
    status, _, body = split(raw(origin, "/drip?bytes=2&interval=0.01&latency=inf"))  # ignored
    assert status == 200 and len(body) == 2


def test_ipv6_loopback(pool: urllib3.PoolManager) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        origin = Origin("::1").start()
    except OSError:
        pytest.skip("no IPv6 loopback")
    with origin:
        assert origin.base_url == f"http://[::1]:{origin.port}"
        assert pool.request("GET", origin.image_url(2)).data == image_bytes(2)
        location = pool.request("GET", origin.url("/redirect-abs/1"), redirect=False)
        assert location.headers["Location"] == origin.url("/img/0.jpg")


# --- scale, lifecycle, modes -----------------------------------------------------------------


def test_500_concurrent_connections(origin: Origin) -> None:
    count = 500
    selector = selectors.DefaultSelector()
    received: dict[int, bytearray] = {}
    sockets = []
    start = time.perf_counter()
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", origin.port), timeout=10)
            sockets.append(sock)
            # Each response waits 0.5 s: served one after another they would take 250 s.
            request = f"GET /small/{i}.jpg?latency=0.5 HTTP/1.1\r\nHost: x\r\nConnection: close"
            sock.sendall(request.encode() + b"\r\n\r\n")
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, i)
            received[i] = bytearray()
        open_count = count
        while open_count and time.perf_counter() - start < 30:
            for key, _ in selector.select(timeout=1):
                chunk = key.fileobj.recv(65536)  # type: ignore[union-attr]
                if chunk:
                    received[key.data] += chunk
                else:
                    selector.unregister(key.fileobj)
                    open_count -= 1
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    assert time.perf_counter() - start < 15
    for i, data in received.items():
        status, headers, body = split(bytes(data))
        assert status == 200
        assert body == image_bytes(i, small=True)
        assert int(headers["content-length"]) == len(body)


def test_stop_is_prompt_with_hanging_clients() -> None:
    origin = Origin().start()
    clients = []
    try:
        for path in ["/hang"] * 20 + ["/drip?bytes=100&interval=1", "/endless"]:
            sock = socket.create_connection(("127.0.0.1", origin.port), timeout=5)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            clients.append(sock)
        time.sleep(0.2)  # let the server reach the hanging handlers
        start = time.perf_counter()
        origin.stop()
        assert time.perf_counter() - start < 2
        for sock in clients[:20]:
            with contextlib.suppress(ConnectionResetError):  # FIN or RST: both end it
                assert sock.recv(100) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", origin.port), timeout=1).close()
    finally:
        origin.stop()
        for sock in clients:
            sock.close()


def test_lifecycle_rules() -> None:
    origin = Origin()
    with pytest.raises(RuntimeError):
        _ = origin.port
    origin.stop()  # before start: harmless
    with pytest.raises(RuntimeError, match="restarted"):
        origin.start()
    assert origin.requests() == []
    with Origin() as running:
        assert running.start() is running  # already running: a no-op
        running.stop()
        running.stop()
    with pytest.raises(ValueError):
        Origin(latency=-1)
    with pytest.raises(ValueError):
        Origin(bandwidth=0)


@pytest.mark.parametrize("process", [False, True])
def test_port_in_use_raises_oserror(origin: Origin, process: bool) -> None:
    with pytest.raises(OSError):
        Origin(port=origin.port, process=process).start()


def test_process_mode(pool: urllib3.PoolManager) -> None:
    with Origin(process=True, seed=3) as child:
        assert child.process
        response = pool.request("GET", child.image_url(11, "webp"))
        assert response.data == child.image_bytes(11, "webp") == image_bytes(11, 3, "webp")
        pool.request("GET", child.url("/html"), headers={"X-Mode": "process"})
        logs = child.requests()
        assert [log.path for log in logs] == ["/img/11.webp", "/html"]
        assert logs[1].headers["x-mode"] == "process"
        assert [log.path for log in child.requests("/html")] == ["/html"]
        url = child.url("/flaky/p/1/503")
        assert [pool.request("GET", url).status for _ in range(2)] == [503, 200]
        child.reset_counters()
        assert child.requests() == []
        assert pool.request("GET", url).status == 503
        port = child.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# --- CLI -------------------------------------------------------------------------------------


def test_cli_help_lists_every_endpoint() -> None:
    result = CliRunner().invoke(serve_command, ["--help"])
    assert result.exit_code == 0
    for path, _ in ENDPOINTS:
        assert path in result.output
    for option in ("--host", "--port", "--latency", "--jitter", "--bandwidth", "--seed"):
        assert option in result.output
    assert "--write-urls" in result.output and "--count" in result.output


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    command = [sys.executable, "-m", "fetchpool.origin.cli", "--port", "0", "--seed", "2"]
    command += ["--write-urls", str(urls), "--count", "5"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().decode().strip()
        assert base_url.startswith("http://127.0.0.1:")
        proc.stdout.readline()  # "wrote 5 URLs ..." comes after the file is written
        lines = urls.read_text().splitlines()
        assert lines == [f"{base_url}/img/{n}.jpg" for n in range(5)]
        response = urllib3.PoolManager(retries=False, timeout=5).request("GET", lines[4])
        assert response.data == image_bytes(4, seed=2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_cli_write_urls_to_stdout_lists_a_running_origins_urls_and_exits() -> None:
    # The usual pipeline: an origin runs already; the list goes to 'fetchpool get -', whose
    # input must end. Serving (binding the same port) would fail, and never end the pipe.
    with Origin(seed=2) as running:
        command = [sys.executable, "-m", "fetchpool.origin.cli", "--port", str(running.port)]
        done = subprocess.run(
            [*command, "--write-urls", "-", "--count", "3"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.decode().splitlines()
        assert lines == [running.image_url(n) for n in range(3)]
        response = urllib3.PoolManager(retries=False, timeout=5).request("GET", lines[2])
        assert response.data == image_bytes(2, seed=2)


def test_cli_write_urls_to_stdout_needs_a_real_port() -> None:
    command = [sys.executable, "-m", "fetchpool.origin.cli", "--port", "0", "--write-urls", "-"]
    done = subprocess.run(command, capture_output=True, timeout=20, check=False)  # never serves
    assert done.returncode == 2 and done.stdout == b""
    assert b"--port" in done.stderr and b"without serving" in done.stderr


@pytest.mark.parametrize("process", [False, True])
def test_warm_renders_images_before_they_are_requested(process: bool) -> None:
    with Origin(process=process) as server:
        server.warm(3)
        assert server.requests() == []  # warming is not a request
        with urllib3.PoolManager() as http:
            assert http.request("GET", server.image_url(2)).data == server.image_bytes(2)
