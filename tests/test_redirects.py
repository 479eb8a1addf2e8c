"""Redirect targets: decoded like browsers and curl do, then checked like input URLs.

Every server listens on 127.0.0.1; names are mapped by injected resolvers, never DNS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fetchpool.config import FetchConfig
from fetchpool.fetch import AddressGuard, HttpFetcher
from fetchpool.inputs.urls import MAX_URL_LENGTH
from fetchpool.models import ErrorCode, Job, Record, Status
from socketserver_faults import FaultServer, header_of, response, serve_forever_keepalive

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8
CONFIG = FetchConfig(
    allow_private_networks=True,
    connect_timeout=1.0,
    read_timeout=1.0,
    total_timeout=5.0,
    min_speed=0,
    user_agent="fetchpool-test/1",
)


def no_dns(host: str, port: int) -> list[str]:
    """A resolver that refuses every name: these tests must never reach real DNS."""
    raise OSError(f"no DNS in tests ({host})")


@pytest.fixture
def make_fetcher(fetcher_factory: Callable[..., HttpFetcher]) -> Callable[..., HttpFetcher]:
    def make(config: FetchConfig = CONFIG, **kwargs: object) -> HttpFetcher:
        kwargs.setdefault("guard", AddressGuard(allow_private_networks=True, resolver=no_dns))
        return fetcher_factory(config, **kwargs)

    return make


def raw_location(location: bytes) -> bytes:
    """A 302 whose Location header carries exactly these bytes."""
    return b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\nLocation: " + location + b"\r\n\r\n"


def server_with(first: bytes) -> FaultServer:
    """A keep-alive server answering ``first`` to /start and a JPEG to any other path."""

    def respond(request: bytes) -> bytes:
        path = request.split(b" ", 2)[1]
        return first if path == b"/start" else response(200, JPEG, {"Content-Type": "image/jpeg"})

    return FaultServer(serve_forever_keepalive(respond))


def request_targets(server: FaultServer) -> list[bytes]:
    return [request.split(b" ", 2)[1] for request in server.requests]


def assert_refused(record: Record, tmp_dir: Path, *words: str) -> None:
    assert record.status is Status.FAILED, record
    assert record.error_code is ErrorCode.REDIRECT_REFUSED, (
        record.error_code,
        record.error_message,
    )
    for word in words:
        assert word in (record.error_message or ""), record.error_message
    assert record.temp_path is None and os.listdir(tmp_dir) == []


# -- the Location's bytes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "requested"),
    [
        ("/imég.jpg".encode(), b"/im%C3%A9g.jpg"),  # raw UTF-8, as most servers send it
        (b"/im\xe9g.jpg", b"/im%E9g.jpg"),  # not UTF-8: the server's own byte comes back
        ("/猫/a b.jpg?q=é".encode(), b"/%E7%8C%AB/a%20b.jpg?q=%C3%A9"),  # space too, as curl
        (b"/already%20encoded.jpg", b"/already%20encoded.jpg"),  # escapes left as they are
    ],
)
def test_location_bytes_are_percent_encoded_like_browsers_and_curl(
    make_fetcher, location: bytes, requested: bytes
) -> None:
    with server_with(raw_location(location)) as server:
        record = make_fetcher().fetch(Job(0, server.url("/start")))
    assert record.ok, record.error_message
    assert request_targets(server) == [b"/start", requested]
    assert record.redirects == [server.url(requested.decode())]
    assert record.final_url == server.url(requested.decode())
    assert record.sha256 == hashlib.sha256(JPEG).hexdigest()


def test_unicode_host_in_location_is_idna_like_an_input_url(make_fetcher) -> None:
    lookups: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    guard = AddressGuard(allow_cidrs=("127.0.0.0/8",), resolver=resolver)
    with server_with(b"") as server:
        location = f"http://Bücher.test:{server.port}/ü.jpg".encode()
        server.handler = serve_forever_keepalive(
            lambda request: (
                raw_location(location)
                if request.split(b" ", 2)[1] == b"/start"
                else response(200, JPEG)
            )
        )
        record = make_fetcher(guard=guard).fetch(Job(0, server.url("/start", host="a.test")))
    assert record.ok, record.error_message
    assert lookups == ["a.test", "xn--bcher-kva.test"]
    second = server.requests[1]
    assert second.startswith(b"GET /%C3%BC.jpg HTTP/1.1\r\n")
    assert header_of(second, "Host") == f"xn--bcher-kva.test:{server.port}"
    assert record.redirects == [f"http://xn--bcher-kva.test:{server.port}/%C3%BC.jpg"]


def test_unicode_digits_in_a_location_host_are_checked_as_the_address_they_are(
    make_fetcher, tmp_dir: Path, spy_connect: list[tuple[str, int]]
) -> None:
    # "①②⑦.0.0.2" is 127.0.0.2 once IDNA-mapped, exactly as for an input URL.
    guard = AddressGuard(allow_cidrs=("127.0.0.1/32",), resolver=no_dns)
    with server_with(b"") as server:
        location = f"http://①②⑦.0.0.2:{server.port}/x.jpg".encode()
        server.handler = serve_forever_keepalive(lambda _: raw_location(location))
        record = make_fetcher(guard=guard).fetch(Job(0, server.url("/start")))
    assert record.error_code is ErrorCode.BLOCKED_ADDRESS, record.error_message
    assert spy_connect == [("127.0.0.1", server.port)]
    assert record.redirects == [f"http://127.0.0.2:{server.port}/x.jpg"]


# -- the same checks as an input URL ----------------------------------------------------------


def test_backslash_authority_in_location_is_refused_not_followed(
    make_fetcher, tmp_dir: Path, spy_connect: list[tuple[str, int]]
) -> None:
    with server_with(b"") as server:
        location = f"http://127.0.0.1:{server.port}\\@127.0.0.2/x.jpg".encode()
        server.handler = serve_forever_keepalive(lambda _: raw_location(location))
        record = make_fetcher().fetch(Job(0, server.url("/start")))
    assert_refused(record, tmp_dir, "backslash")
    assert spy_connect == [("127.0.0.1", server.port)]  # no second connection or request
    assert request_targets(server) == [b"/start"]
    assert record.redirects == []  # never recorded as a URL with a user name


@pytest.mark.parametrize("port", ["0", "65536", "99999", "\uff18\uff10"])  # last: fullwidth 80
def test_location_port_outside_1_to_65535_is_refused(
    make_fetcher, tmp_dir: Path, spy_connect: list[tuple[str, int]], port: str
) -> None:
    with server_with(raw_location(f"http://127.0.0.1:{port}/x.jpg".encode())) as server:
        record = make_fetcher().fetch(Job(0, server.url("/start")))
    assert_refused(record, tmp_dir)
    assert spy_connect == [("127.0.0.1", server.port)]


def test_location_longer_than_input_urls_may_be_is_refused(make_fetcher, tmp_dir: Path) -> None:
    with server_with(b"") as server:
        base = len(server.url("/"))
        fits = b"/" + b"a" * (MAX_URL_LENGTH - base)  # exactly MAX_URL_LENGTH once joined
        too_long = b"/" + b"b" * (9 * 1024)
        server.handler = serve_forever_keepalive(
            lambda request: {
                b"/start": raw_location(too_long),
                b"/fits": raw_location(fits),
            }.get(request.split(b" ", 2)[1], response(200, JPEG))
        )
        fetcher = make_fetcher()
        refused = fetcher.fetch(Job(0, server.url("/start")))
        assert_refused(refused, tmp_dir, str(MAX_URL_LENGTH))
        followed = fetcher.fetch(Job(1, server.url("/fits")))
    assert len(refused.error_message or "") < 500  # the message shows a preview, not 9 KB
    assert followed.ok, followed.error_message
    assert request_targets(server) == [b"/start", b"/fits", fits]
    assert len(followed.final_url or "") == MAX_URL_LENGTH


@pytest.mark.parametrize(
    "location",
    [b"http://exa<mple.test/x", b"http://[::1/x", b"http://a b.test/x"],
)
def test_malformed_location_hosts_are_refused(make_fetcher, tmp_dir: Path, location: bytes) -> None:
    with server_with(raw_location(location)) as server:
        record = make_fetcher().fetch(Job(0, server.url("/start")))
    assert_refused(record, tmp_dir)
    assert server.connections == 1
