"""Proxies: --proxy, the environment as curl reads it, CONNECT tunnels, the guard behind a proxy.

The proxy is a real forward proxy on loopback (tests/forward_proxy.py). The target is named
``images.test``: the fetcher's guard resolves it (an injected resolver) to a public address,
so nothing but the proxy's own loopback address is allowed, while the proxy's DNS sends it
to the loopback origin. Every item that succeeds therefore went through the proxy.
"""

from __future__ import annotations

import json
import pickle
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fetchpool import download
from fetchpool.cli import main
from fetchpool.config import FetchConfig, Options
from fetchpool.errors import ConfigError
from fetchpool.fetch import AddressGuard, HttpFetcher
from fetchpool.models import ErrorCode, Job, Record, Status
from fetchpool.origin import Origin
from fetchpool.proxies import ProxyPolicy, bypasses, parse_proxy
from forward_proxy import ForwardProxy
from reliability_helpers import make_cert, tls_context
from socketserver_faults import FaultServer, read_request, response

PUBLIC = "93.184.215.14"  # what the guard is told images.test is: a public address
CONFIG_KW: dict[str, float] = {"connect_timeout": 2.0, "read_timeout": 2.0, "total_timeout": 10.0}
LOOPBACK: dict[str, object] = {"allow_private_networks": True}


def public_resolver(host: str, port: int) -> list[str]:
    if host == "images.test":
        return [PUBLIC]
    if host == "inside.test":
        return ["10.0.0.5"]
    raise socket.gaierror(socket.EAI_NONAME, "unknown in this test")


@pytest.fixture
def fetch(tmp_dir: Path) -> Iterator[Callable[..., Record]]:
    """``fetch(url, guard=None, **config)``: one attempt with a fresh fetcher."""
    made: list[HttpFetcher] = []

    def run(url: str, guard: AddressGuard | None = None, **config: object) -> Record:
        fetcher = HttpFetcher(
            FetchConfig(**CONFIG_KW, **config),  # type: ignore[arg-type]
            tmp_dir,
            guard=guard or AddressGuard(resolver=public_resolver),
        )
        made.append(fetcher)
        return fetcher.fetch(Job(position=len(made), url=url))

    yield run
    for fetcher in made:
        fetcher.close()


@pytest.fixture(scope="module")
def images_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate valid for images.test only (not for 127.0.0.1, where it is served)."""
    return make_cert(
        tmp_path_factory.mktemp("tls"), "images", cn="images.test", san="DNS:images.test"
    )


@pytest.fixture
def tls_origin(
    images_cert: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultServer]:
    """An HTTPS origin on loopback serving images.test's certificate, which is trusted."""
    monkeypatch.setenv("SSL_CERT_FILE", images_cert[0])

    def serve(sock: socket.socket, server: FaultServer) -> None:
        while request := read_request(sock):
            server.record(request)
            sock.sendall(response(200, b"secret body over TLS"))

    with FaultServer(serve, tls=tls_context(images_cert)) as server:
        yield server


def ok(record: Record) -> None:
    assert record.status is Status.OK, (record.error_code, record.error_message)


# -- which proxy: curl's rules (no sockets) ---------------------------------------------------


@pytest.mark.parametrize(
    ("host", "no_proxy", "expected"),
    [
        ("example.com", "example.com", True),
        ("www.example.com", "example.com", True),
        ("www.example.com", ".example.com", True),
        ("example.com", ".example.com", True),
        ("notexample.com", "example.com", False),
        ("EXAMPLE.com.", "example.COM", True),
        ("a.b.example", "other, b.example", True),
        ("a.b.example", "other b.example", True),
        ("anything", "*", True),
        ("anything", "*.example", False),
        ("10.1.2.3", "10.0.0.0/8", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("192.168.1.1", "192.168.1.1", True),
        ("[::1]", "::1", True),
        ("[fd00::7]", "fd00::/8", True),
        ("127.0.0.1", "localhost", False),  # names are compared as written, never resolved
        ("localhost", "127.0.0.1", False),
        ("example.com", "", False),
    ],
)
def test_no_proxy_matches_as_curl(host: str, no_proxy: str, expected: bool) -> None:
    assert bypasses(host, no_proxy) is expected


def policy(**environment: str) -> ProxyPolicy:
    return ProxyPolicy.build("env", tuple(environment.items()))


def test_environment_variables_follow_curl() -> None:
    p = policy(http_proxy="http://h:1", https_proxy="http://s:2", HTTPS_PROXY="http://S:3")
    assert (p.http and p.http.host, p.https and p.https.host) == ("h", "s")  # lower case first
    assert policy(HTTPS_PROXY="http://s:3").route("https", "x") is not None
    # httpoxy: a CGI request's "Proxy:" header arrives as HTTP_PROXY; curl never reads it.
    assert policy(HTTP_PROXY="http://evil:1").route("http", "x") is None
    fallback = policy(all_proxy="http://a:4")
    assert fallback.route("http", "x") == fallback.route("https", "x") is not None
    assert policy(ALL_PROXY="http://a:4").route("https", "x") is not None
    # set but empty: no proxy for that scheme, no fall-back to all_proxy (as curl)
    assert policy(http_proxy="", all_proxy="http://a:4").route("http", "x") is None
    bypass = policy(https_proxy="http://s:2", NO_PROXY=".corp")
    assert bypass.route("https", "img.corp") is None
    assert bypass.route("https", "img.example") is not None


def test_explicit_proxy_beats_the_environment_but_no_proxy_still_applies() -> None:
    environment = (("https_proxy", "http://env:1"), ("no_proxy", "inside.corp"))
    chosen = ProxyPolicy.build("http://given:8080", environment)
    route = chosen.route("https", "a.example")
    assert route is not None and (route.host, route.port, route.source) == (
        "given",
        8080,
        "--proxy",
    )
    assert chosen.route("http", "a.example") == route
    assert chosen.route("https", "x.inside.corp") is None
    assert not ProxyPolicy.build("", environment).active  # --proxy ''
    assert not ProxyPolicy.build(None, environment).active  # the default: off unless asked


def test_proxy_urls_are_parsed_and_never_shown_with_their_password() -> None:
    proxy = parse_proxy("http://us%40er:p%3Ass@proxy.corp:3128/", "--proxy")
    assert (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert proxy.authorization == "Basic dXNAZXI6cDpzcw=="  # base64("us@er:p:ss")
    assert "p%3Ass" not in repr(proxy) and "p%3Ass" not in proxy.shown
    assert proxy.shown == "http://us%40er:***@proxy.corp:3128/"
    assert parse_proxy("proxy.corp", "http_proxy").port == 80  # no scheme: http, port 80
    assert parse_proxy("http://[::1]:3128", "--proxy").host == "::1"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("socks5://127.0.0.1:1080", "only http:// proxies"),
        ("https://proxy:443", "only http:// proxies"),
        ("http://proxy:3128/path", "http://[user:password@]host:port"),
        ("http://proxy:99999", "not a proxy URL"),
        ("http://:3128", "no host"),
    ],
)
def test_unusable_proxy_urls_are_config_errors(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match="--proxy") as info:
        FetchConfig(proxy=url)
    assert words in str(info.value)


def test_the_environment_is_captured_into_the_pickled_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", "http://user:pw@proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://evil:1")
    assert FetchConfig().proxy_environment == ()  # off unless asked (RELIABILITY.md)
    config = FetchConfig(proxy="env")
    assert config.proxy_environment == (("https_proxy", "http://user:pw@proxy.corp:3128"),)
    monkeypatch.delenv("https_proxy")
    again = pickle.loads(pickle.dumps(config))  # what fetch processes and cluster parts get
    route = ProxyPolicy.build(again.proxy, again.proxy_environment or ()).route("https", "x")
    assert route is not None and route.host == "proxy.corp"
    assert FetchConfig(proxy="").proxy_environment == ()
    monkeypatch.setenv("all_proxy", "socks5h://127.0.0.1:9050")
    with pytest.raises(ConfigError, match=r"all_proxy .*only http:// proxies.*--proxy env"):
        FetchConfig(proxy="env")
    explicit = Options.from_kwargs(proxy_environment={"http_proxy": "http://p:1"})
    assert explicit.fetch.proxy_environment == (("http_proxy", "http://p:1"),)


# -- through a real proxy -------------------------------------------------------------------


def test_plain_http_goes_through_the_proxy_in_absolute_form(
    origin: Origin, fetch: Callable[..., Record], spy_connect: list[tuple[str, int]]
) -> None:
    target = f"http://images.test:{origin.port}"
    with ForwardProxy(hosts={"images.test": "127.0.0.1"}) as proxy:
        records = [fetch(f"{target}/img/{n}.jpg", proxy=proxy.url()) for n in range(2)]
    for record in records:
        ok(record)
    assert [s.target for s in proxy.seen("GET")] == [f"{target}/img/0.jpg", f"{target}/img/1.jpg"]
    assert proxy.seen("GET")[0].headers["host"] == f"images.test:{origin.port}"
    assert set(spy_connect) == {("127.0.0.1", proxy.port)}  # never the target's address
    assert [log.path for log in origin.requests()] == ["/img/0.jpg", "/img/1.jpg"]


def test_one_proxy_connection_carries_plain_requests_for_many_targets(
    origin: Origin, tmp_dir: Path
) -> None:
    guard = AddressGuard(resolver=lambda host, port: [PUBLIC])
    with ForwardProxy(hosts={"a.test": "127.0.0.1", "b.test": "127.0.0.1"}) as proxy:
        fetcher = HttpFetcher(FetchConfig(proxy=proxy.url(), **CONFIG_KW), tmp_dir, guard=guard)
        try:
            records = [
                fetcher.fetch(Job(position=n, url=f"http://{host}:{origin.port}/img/{n}.jpg"))
                for n, host in enumerate(["a.test", "b.test", "a.test"])
            ]
        finally:
            fetcher.close()
    for record in records:
        ok(record)
    assert len(proxy.seen("GET")) == 3 and proxy.connections == 1


def test_credentials_reach_the_proxy_and_never_the_origin(
    origin: Origin, fetch: Callable[..., Record]
) -> None:
    with ForwardProxy(hosts={"images.test": "127.0.0.1"}, credentials=("ann", "s3cret")) as proxy:
        record = fetch(f"http://images.test:{origin.port}/img/1.jpg", proxy=proxy.url("ann:s3cret"))
    ok(record)
    assert proxy.seen("GET")[0].headers["proxy-authorization"] == "Basic YW5uOnMzY3JldA=="
    assert "proxy-authorization" not in origin.requests()[0].headers


def test_https_goes_through_a_connect_tunnel_verified_against_the_target_name(
    tls_origin: FaultServer, fetch: Callable[..., Record], spy_connect: list[tuple[str, int]]
) -> None:
    url = f"https://images.test:{tls_origin.port}"
    with ForwardProxy(hosts={"images.test": "127.0.0.1"}, credentials=("ann", "pw")) as proxy:
        first = fetch(f"{url}/a.jpg", proxy=proxy.url("ann:pw"))
        wrong_name = fetch(f"https://127.0.0.1:{tls_origin.port}/b.jpg", proxy=proxy.url("ann:pw"),
                           guard=AddressGuard(allow_private_networks=True))  # fmt: skip
    ok(first)
    assert Path(first.temp_path or "").read_bytes() == b"secret body over TLS"
    connects = proxy.seen("CONNECT")
    assert connects[0].target == f"images.test:{tls_origin.port}"
    assert connects[0].headers["proxy-authorization"] == "Basic YW5uOnB3"
    assert proxy.seen("GET") == []  # the GET itself went inside the tunnel, encrypted
    inner = tls_origin.requests[0]
    assert inner.startswith(b"GET /a.jpg HTTP/1.1") and b"roxy-" not in inner
    assert set(spy_connect) == {("127.0.0.1", proxy.port)}
    # The certificate is checked against the target's name, not the address the proxy used.
    assert wrong_name.error_code is ErrorCode.TLS_ERROR, wrong_name.error_message


def test_a_tunnel_is_kept_for_its_target(tls_origin: FaultServer, tmp_dir: Path) -> None:
    guard = AddressGuard(resolver=public_resolver)
    with ForwardProxy(hosts={"images.test": "127.0.0.1"}) as proxy:
        fetcher = HttpFetcher(FetchConfig(proxy=proxy.url(), **CONFIG_KW), tmp_dir, guard=guard)
        try:
            url = f"https://images.test:{tls_origin.port}"
            records = [fetcher.fetch(Job(position=n, url=f"{url}/{n}")) for n in range(3)]
        finally:
            fetcher.close()
    for record in records:
        ok(record)
    assert len(proxy.seen("CONNECT")) == 1 and len(tls_origin.requests) == 3


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_proxy_wanting_credentials_is_a_clear_proxy_error(
    scheme: str, origin: Origin, tls_origin: FaultServer, fetch: Callable[..., Record]
) -> None:
    port = origin.port if scheme == "http" else tls_origin.port
    url = f"{scheme}://images.test:{port}/img/1.jpg"
    with ForwardProxy(hosts={"images.test": "127.0.0.1"}, credentials=("ann", "pw")) as proxy:
        missing = fetch(url, proxy=proxy.url())
        wrong = fetch(url, proxy=proxy.url("ann:not-the-password"))
    assert missing.error_code is wrong.error_code is ErrorCode.PROXY_ERROR
    assert "answered 407" in (missing.error_message or "")
    asked = "CONNECT images.test:" if scheme == "https" else "GET http://images.test:"
    assert asked in (missing.error_message or "")
    assert "the proxy wants credentials" in (missing.error_message or "")
    assert "refused the credentials" in (wrong.error_message or "")
    assert "not-the-password" not in (wrong.error_message or "")
    assert missing.http_status is None  # the target never answered
    assert origin.requests() == [] and tls_origin.requests == []


@pytest.mark.parametrize(("status", "code"), [(403, "proxy_error"), (502, "connect_error")])
def test_a_refused_connect_names_the_proxy_status(
    status: int, code: str, fetch: Callable[..., Record]
) -> None:
    with ForwardProxy(refuse=status) as proxy:
        record = fetch("https://images.test/a.jpg", proxy=proxy.url("ann:pw"))
    assert record.error_code == code
    message = record.error_message or ""
    assert f"answered {status}" in message and "CONNECT images.test:443" in message
    assert "ann:***@127.0.0.1" in message and ":pw@" not in message


def test_an_unreachable_proxy_is_a_connect_error_naming_it(fetch: Callable[..., Record]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    record = fetch("http://images.test/x", proxy=f"http://ann:pw@127.0.0.1:{port}")
    assert record.error_code is ErrorCode.CONNECT_ERROR
    assert f"proxy http://ann:***@127.0.0.1:{port}" in (record.error_message or "")


# -- the address guard behind a proxy ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.jpg",
        "https://127.0.0.1:9/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "https://169.254.169.254/latest/meta-data/",
        "http://inside.test/x.jpg",  # a name that resolves to 10.0.0.5
        "https://inside.test/x.jpg",
    ],
)
def test_the_guard_refuses_blocked_targets_before_the_proxy_is_asked(
    url: str, fetch: Callable[..., Record], spy_connect: list[tuple[str, int]]
) -> None:
    # The proxy itself is on loopback, which the guard would refuse as a target: it is the
    # user's explicit choice and allowed; the targets are still checked.
    with ForwardProxy() as proxy:
        record = fetch(url, proxy=proxy.url())
    assert record.error_code is ErrorCode.BLOCKED_ADDRESS, record.error_message
    assert "--allow-private-networks" in (record.error_message or "")
    assert proxy.log == [] and spy_connect == []


def test_a_redirect_hop_to_a_blocked_address_is_refused_through_the_proxy(
    origin: Origin, fetch: Callable[..., Record]
) -> None:
    hop = f"/redirect-to?url=http://127.0.0.1:{origin.port}/img/1.jpg"
    with ForwardProxy(hosts={"images.test": "127.0.0.1"}) as proxy:
        record = fetch(f"http://images.test:{origin.port}{hop}", proxy=proxy.url())
    assert record.error_code is ErrorCode.BLOCKED_ADDRESS, record.error_message
    assert len(proxy.seen("GET")) == 1  # the first hop only
    assert [log.path for log in origin.requests()] == [hop]


def test_with_every_address_allowed_the_name_is_left_to_the_proxy(
    origin: Origin, fetch: Callable[..., Record]
) -> None:
    """As curl: where only the proxy can resolve names (a closed network), nothing is
    resolved here when there is nothing to check."""

    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError(f"{host} was resolved locally")

    guard = AddressGuard(allow_private_networks=True, resolver=no_dns)
    with ForwardProxy(hosts={"only-the-proxy-knows.test": "127.0.0.1"}) as proxy:
        url = f"http://only-the-proxy-knows.test:{origin.port}/img/2.jpg"
        ok(fetch(url, proxy=proxy.url(), guard=guard))
    assert len(proxy.seen("GET")) == 1


# -- the environment, end to end -------------------------------------------------------------


def test_environment_proxies_are_honoured_and_no_proxy_bypasses(
    origin: Origin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with ForwardProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url())
        report = download([origin.image_url(0)], tmp_path / "d", **LOOPBACK)
        assert report.exit_code == 0 and proxy.log == []  # not asked: direct (RELIABILITY.md)
        env = {"proxy": "env", **LOOPBACK}
        report = download([origin.image_url(n) for n in range(1, 4)], tmp_path / "a", **env)
        assert report.exit_code == 0 and len(proxy.seen("GET")) == 3
        monkeypatch.setenv("no_proxy", "example.org, 127.0.0.0/8")
        report = download([origin.image_url(n) for n in range(4, 6)], tmp_path / "b", **env)
        assert report.exit_code == 0 and len(proxy.seen("GET")) == 3  # direct this time
        monkeypatch.delenv("no_proxy")
        report = download([origin.image_url(6)], tmp_path / "c", proxy="", **LOOPBACK)
        assert report.exit_code == 0 and len(proxy.seen("GET")) == 3  # --proxy ''
    assert len(origin.requests()) == 7


def test_upper_case_http_proxy_is_ignored(
    origin: Origin, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        report = download([origin.image_url(1)], tmp_path / "out", proxy="env", **LOOPBACK)
    assert report.exit_code == 0 and proxy.log == []


def test_fetch_processes_use_the_same_proxy(origin: Origin, tmp_path: Path) -> None:
    urls = [origin.image_url(n) for n in range(6)]
    with ForwardProxy() as proxy:
        report = download(
            urls, tmp_path / "out", proxy=proxy.url(), fetch_processes=2, threads=4, **LOOPBACK
        )
    assert report.exit_code == 0
    assert sorted(s.target for s in proxy.seen("GET")) == sorted(urls)


def test_cli_proxy_options(origin: Origin, tmp_path: Path) -> None:
    source = tmp_path / "urls.txt"
    source.write_text(f"{origin.image_url(1)}\n")
    runner = CliRunner()
    with ForwardProxy() as proxy:
        args = ["get", str(source), "-q", "--allow-private-networks", "--proxy", proxy.url()]
        done = runner.invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert len(proxy.seen("GET")) == 1
    bad = runner.invoke(
        main, ["get", str(source), "-o", str(tmp_path / "x"), "--proxy", "socks5://h:1"]
    )
    assert bad.exit_code == 2 and "--proxy" in bad.output and "only http://" in bad.output


def test_proxy_credentials_never_reach_the_journal(tmp_path: Path) -> None:
    import sqlite3

    from fetchpool.state.journal import Journal
    from fetchpool.state.paths import db_path

    argv = ["fetchpool", "get", "u.txt", "--proxy", "http://ann:s3cret@proxy.corp:3128"]
    with Journal.open(tmp_path / "out", argv=argv):
        pass
    with sqlite3.connect(db_path(tmp_path / "out")) as conn:
        (stored,) = conn.execute("SELECT argv FROM runs").fetchone()
    conn.close()
    assert "s3cret" not in stored and "http://ann:***@proxy.corp:3128" in stored


def test_idle_proxy_connections_are_kept_for_every_fetch_thread() -> None:
    """Plain requests to a proxy share one pool key: it keeps ``shared_idle`` connections
    (one per fetch), where a target's key keeps ``per_host``."""
    from fetchpool.fetch.http11 import Connection, ConnectionPool

    pool = ConnectionPool(per_host=1, max_idle=4, insecure=False, shared_idle=3)
    pairs = [socket.socketpair() for _ in range(8)]
    try:
        shared = ("http", "", 0, "via 127.0.0.1:3128")
        direct = ("http", "a.test", 80, "127.0.0.1")
        for n, (ours, _) in enumerate(pairs):
            pool.put(Connection(ours, shared if n < 4 else direct, 1.0))
        kept_shared = [pool._take_idle(shared) for _ in range(4)]
        kept_direct = [pool._take_idle(direct) for _ in range(2)]
        assert sum(c is not None for c in kept_shared) == 3
        assert sum(c is not None for c in kept_direct) == 1
        for conn in [*kept_shared, *kept_direct]:
            if conn is not None:
                conn.close()
    finally:
        pool.clear()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_proxy_credentials_never_reach_the_recorded_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``runs.settings`` keeps a run's options; a proxy's password is masked there too, and
    of the environment's proxy variables only their names are kept."""
    monkeypatch.setenv("https_proxy", "http://env-user:env-secret@proxy.corp:3128")
    given = Options.from_kwargs(proxy="http://ann:s3cret@proxy.corp:3128").recorded()
    assert given["fetch"]["proxy"] == "http://ann:***@proxy.corp:3128"
    from_env = Options.from_kwargs(proxy="env").recorded()
    assert from_env["fetch"]["proxy"] == "env"
    assert from_env["fetch"]["proxy_environment"] == ["https_proxy"]
    assert "env-secret" not in json.dumps(from_env, default=str)
