"""Opt-out directives (X-Robots-Tag noai..., tdm-reservation: 1) and the user-agent token.

From the parser up: which header values opt out, the wire layer keeping repeated fields
apart, the fetcher refusing before reading the body, and the command line over loopback.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import ENGINES, engine_args
from fetchpool import download
from fetchpool.config import DEFAULT_DISALLOWED_HEADER_DIRECTIVES, FetchConfig, Options
from fetchpool.errors import ConfigError
from fetchpool.fetch import HttpFetcher, h1, http11
from fetchpool.fetch.optout import agent_tokens, opt_out
from fetchpool.models import ErrorCode, Job, Status
from fetchpool.origin import Origin
from socketserver_faults import FaultServer, read_request, response, serve_forever_keepalive

DEFAULT = frozenset(DEFAULT_DISALLOWED_HEADER_DIRECTIVES)
US = agent_tokens("fetchpool/1.0", None)


def headers(*fields: tuple[str, str]):  # type: ignore[no-untyped-def]
    def get_all(name: str) -> list[str]:
        return [value for key, value in fields if key.lower() == name]

    return get_all


def decide(*fields: tuple[str, str], agents: frozenset[str] = US, disallowed=DEFAULT):  # type: ignore[no-untyped-def]
    return opt_out(headers(*fields), frozenset(disallowed), agents)


# --- the parser -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "noai",
        "NoAI",
        "noimageai",
        "noml",
        "noindex",
        "noimageindex",
        "none",  # = noindex, nofollow
        "nofollow, noai",
        "max-snippet: 20, noimageai",
        "fetchpool: noai",
        "FetchPool: NoImageAI",
        "otherbot: nofollow, fetchpool: noai",
        "*: noai",
        "unavailable_after: Thursday, 25-Jun-2010 15:00:00 GMT, noai",
    ],
)
def test_x_robots_tag_values_that_opt_out(value: str) -> None:
    reason = decide(("X-Robots-Tag", value))
    assert reason is not None
    assert "X-Robots-Tag" in reason and value in reason


@pytest.mark.parametrize(
    "value",
    [
        "nofollow",
        "noarchive, nosnippet",
        "all",
        "otherbot: noai",
        "otherbot: noindex, noai",  # the scope runs to the end of its line
        "max-image-preview: large",
        "unavailable_after: 25 Jun 2010 15:00:00 PST",
        "noaix",  # a name, not a prefix
        "",
    ],
)
def test_x_robots_tag_values_that_do_not(value: str) -> None:
    assert decide(("X-Robots-Tag", value)) is None


def test_each_header_line_keeps_its_own_scope() -> None:
    # Joined into one value, "otherbot: noai, noml" would scope noml to otherbot too.
    reason = decide(("X-Robots-Tag", "otherbot: noai"), ("X-Robots-Tag", "noml"))
    assert reason is not None and reason.startswith("noml")
    assert decide(("X-Robots-Tag", "otherbot: noai"), ("X-Robots-Tag", "nofollow")) is None


def test_the_user_agent_token_scopes_directives_to_us() -> None:
    img2dataset = agent_tokens("fetchpool/1.0", "img2dataset")
    assert decide(("X-Robots-Tag", "img2dataset: noai")) is None
    assert decide(("X-Robots-Tag", "IMG2DATASET: noai"), agents=img2dataset) is not None
    assert decide(("X-Robots-Tag", "fetchpool: noai"), agents=img2dataset) is not None
    assert decide(("X-Robots-Tag", "otherbot: noai"), agents=img2dataset) is None
    # A custom User-Agent's product name counts as ours too.
    mine = agent_tokens("MyCrawler/2.1 (+https://example.org)", None)
    assert mine == {"fetchpool", "mycrawler"}
    assert decide(("X-Robots-Tag", "mycrawler: noimageai"), agents=mine) is not None


def test_tdm_reservation_header() -> None:
    reason = decide(("tdm-reservation", "1"))
    assert reason == "tdm-reservation (header tdm-reservation: 1)"
    assert decide(("tdm-reservation", "0")) is None
    assert decide(("tdm-reservation", " 1 ")) is not None
    assert decide(("tdm-reservation", "1"), disallowed={"noai"}) is None


def test_the_list_decides_and_empty_honours_nothing() -> None:
    assert decide(("X-Robots-Tag", "noindex"), disallowed={"noai"}) is None
    assert decide(("X-Robots-Tag", "noai"), ("tdm-reservation", "1"), disallowed=()) is None
    assert decide(("X-Robots-Tag", "nofollow"), disallowed={"nofollow"}) is not None


# --- the configuration ------------------------------------------------------------------------


def test_directive_option_parsing_and_validation() -> None:
    assert FetchConfig().disallowed_header_directives == DEFAULT_DISALLOWED_HEADER_DIRECTIVES
    parsed = FetchConfig(disallowed_header_directives="NoAI, noml,,noai")  # type: ignore[arg-type]
    assert parsed.disallowed_header_directives == ("noai", "noml")
    assert FetchConfig(disallowed_header_directives="").disallowed_header_directives == ()  # type: ignore[arg-type]
    options = Options.from_kwargs(disallowed_header_directives=["noai"])
    assert options.fetch.disallowed_header_directives == ("noai",)
    for bad in ("noai;noml", "fetchpool: noai", "no ai", "-noai"):
        with pytest.raises(ConfigError, match="--disallowed-header-directives"):
            FetchConfig(disallowed_header_directives=bad)  # type: ignore[arg-type]


def test_user_agent_token() -> None:
    config = FetchConfig(user_agent_token="img2dataset")
    assert config.request_user_agent.startswith("fetchpool/")
    assert config.request_user_agent.endswith(" (compatible; img2dataset)")
    custom = FetchConfig(user_agent="Bot/1", user_agent_token="tok")
    assert custom.request_user_agent == "Bot/1 (compatible; tok)"
    assert FetchConfig(user_agent_token="  ").request_user_agent == FetchConfig().user_agent
    for bad in ("two words", "semi;colon", "x" * 65, "new\nline", "(paren)"):
        with pytest.raises(ConfigError, match="--user-agent-token"):
            FetchConfig(user_agent_token=bad)


# --- the wire layer and the fetcher -----------------------------------------------------------


CONFIG = FetchConfig(allow_private_networks=True, connect_timeout=2, read_timeout=2, min_speed=0)


@pytest.fixture
def fetcher(tmp_path: Path) -> Iterator[HttpFetcher]:
    made = HttpFetcher(CONFIG, tmp_path)
    yield made
    made.close()


def test_repeated_header_lines_are_kept_apart(
    fetcher: HttpFetcher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Robots-Tag: otherbot: noai\r\n"
        b"x-robots-tag: noml\r\nX-Robots-Tag: nofollow,\r\n  noarchive\r\n\r\nabc"
    )
    seen: list[list[str]] = []
    real = http11.Response.get_all

    def spy(self: http11.Response, name: str) -> list[str]:
        values = real(self, name)
        seen.append(values)
        return values

    monkeypatch.setattr(http11.Response, "get_all", spy)
    with FaultServer(serve_forever_keepalive(lambda request: raw)) as server:
        record = fetcher.fetch(Job(0, server.url("/x")))
    assert record.error_code is ErrorCode.OPTED_OUT
    assert seen[0] == ["otherbot: noai", "noml", "nofollow, noarchive"]
    assert "noml (header X-Robots-Tag: noml)" in (record.error_message or "")
    assert list(tmp_path.iterdir()) == []  # nothing left in the temp folder


def test_single_header_line_is_a_one_item_list() -> None:
    _, _, _, fields, repeated = h1.parse_head(
        b"HTTP/1.1 200 OK\r\nX-Robots-Tag: noai\r\nVary: a\r\nvary: b"
    )
    assert repeated == {"vary": ["a", "b"]} and fields["vary"] == "a, b"
    assert fields["x-robots-tag"] == "noai"


def test_opt_out_decided_before_the_body_is_read(fetcher: HttpFetcher, tmp_path: Path) -> None:
    """A large body is not read at all: the connection is closed after the head."""
    sent: list[int] = []

    def handler(sock: socket.socket, server: FaultServer) -> None:
        read_request(sock)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\nX-Robots-Tag: noai\r\n\r\n"
        sock.sendall(head)
        total = 0
        try:
            while total < 50_000_000 and not server.stopping.is_set():
                sock.sendall(b"x" * 65536)
                total += 65536
        except OSError:
            pass
        sent.append(total)

    with FaultServer(handler) as server:
        record = fetcher.fetch(Job(0, server.url("/big")))
    assert record.status is Status.FAILED and record.error_code is ErrorCode.OPTED_OUT
    assert record.http_status == 200 and record.temp_path is None
    assert sent and sent[0] < 50_000_000  # the client hung up long before the end
    assert list(tmp_path.iterdir()) == []


def test_small_opted_out_body_keeps_the_connection(fetcher: HttpFetcher) -> None:
    answer = response(200, b"tiny", {"X-Robots-Tag": "noimageai"})
    with FaultServer(serve_forever_keepalive(lambda request: answer)) as server:
        first = fetcher.fetch(Job(0, server.url("/a")))
        second = fetcher.fetch(Job(1, server.url("/b")))
    assert first.error_code is second.error_code is ErrorCode.OPTED_OUT
    assert server.connections == 1  # drained like an error page, then reused


def test_error_status_wins_over_opt_out(fetcher: HttpFetcher) -> None:
    answer = response(404, b"gone", {"X-Robots-Tag": "noai"})
    with FaultServer(serve_forever_keepalive(lambda request: answer)) as server:
        record = fetcher.fetch(Job(0, server.url("/a")))
    assert record.error_code is ErrorCode.HTTP_ERROR and record.http_status == 404


def test_user_agent_token_is_sent(tmp_path: Path, origin: Origin) -> None:
    config = FetchConfig(allow_private_networks=True, user_agent_token="img2dataset")
    fetcher = HttpFetcher(config, tmp_path)
    try:
        record = fetcher.fetch(Job(0, origin.url("/headers")))
    finally:
        fetcher.close()
    assert record.ok and record.temp_path is not None
    sent = json.loads(Path(record.temp_path).read_bytes())
    assert sent["user-agent"].startswith("fetchpool/")
    assert sent["user-agent"].endswith("(compatible; img2dataset)")


# --- whole runs -------------------------------------------------------------------------------


def _urls(origin: Origin) -> dict[str, bool]:
    """URL -> whether the default run saves it."""
    return {
        origin.url("/opt-out/1?robots=noai"): False,
        origin.url("/opt-out/2?robots=otherbot:%20noai"): True,
        origin.url("/opt-out/3?robots=fetchpool:%20noimageai"): False,
        origin.url("/opt-out/4?tdm=1"): False,
        origin.url("/opt-out/5?tdm=0"): True,
        origin.url("/opt-out/6?robots=otherbot:%20noai&robots=noml"): False,
        origin.url("/opt-out/7?robots=img2dataset:%20noai"): True,
        origin.url("/opt-out/8?robots=nofollow"): True,
        origin.url("/img/9.jpg"): True,
    }


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fetchpool", "get", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _saved(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != ".fetchpool")


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_opted_out_items_are_not_saved(origin: Origin, tmp_path: Path, engine: str) -> None:
    urls = _urls(origin)
    source = tmp_path / "urls.txt"
    source.write_text("".join(f"{url}\n" for url in urls))
    out = tmp_path / "out"
    common = ["--allow-private-networks", *engine_args(engine), "--threads", "4"]
    result = _run(source, "-o", out, *common)
    assert result.returncode == 1, result.stderr
    assert "opted_out      4" in result.stderr
    assert "hint: opted_out:" in result.stderr and "--disallowed-header-directives" in result.stderr
    assert len(_saved(out)) == sum(urls.values()) == 5
    manifest = subprocess.run(
        [sys.executable, "-m", "fetchpool", "manifest", str(out), "--status", "failed"],
        capture_output=True,
        text=True,
        check=True,
    )
    failed = [json.loads(line) for line in manifest.stdout.splitlines()]
    assert [row["url"] for row in failed] == [url for url, saved in urls.items() if not saved]
    assert {row["error_code"] for row in failed} == {"opted_out"}
    assert all(row["attempts"] == 1 for row in failed)  # not retried
    assert "noai (header X-Robots-Tag: noai)" in failed[0]["error_message"]
    assert "tdm-reservation" in failed[2]["error_message"]

    # The token makes "img2dataset: noai" ours; '' honours nothing.
    out2 = tmp_path / "out2"
    result = _run(source, "-o", out2, *common, "--user-agent-token", "img2dataset")
    assert "opted_out      5" in result.stderr, result.stderr
    out3 = tmp_path / "out3"
    result = _run(source, "-o", out3, *common, "--disallowed-header-directives", "")
    assert result.returncode == 0, result.stderr
    assert len(_saved(out3)) == len(urls)
    with sqlite3.connect(out3 / ".fetchpool" / "state.db") as db:
        argv, settings = db.execute("SELECT argv, settings FROM runs").fetchone()
    assert "--disallowed-header-directives" in json.loads(argv)
    assert json.loads(settings)["fetch"]["disallowed_header_directives"] == []


def test_cli_rejects_a_bad_directive_before_anything(tmp_path: Path) -> None:
    source = tmp_path / "urls.txt"
    source.write_text("http://127.0.0.1:9/x\n")
    result = _run(source, "-o", tmp_path / "out", "--disallowed-header-directives", "noai;noml")
    assert result.returncode == 2
    assert "--disallowed-header-directives" in result.stderr
    assert not (tmp_path / "out").exists()


def test_library_run_records_its_directives(origin: Origin, tmp_path: Path) -> None:
    urls = list(_urls(origin))
    report = download(
        urls,
        tmp_path / "out",
        allow_private_networks=True,
        disallowed_header_directives=["noml"],
        user_agent_token="img2dataset",
    )
    assert report.errors == {"opted_out": 1}  # only the noml one
    with sqlite3.connect(tmp_path / "out" / ".fetchpool" / "state.db") as db:
        (settings,) = db.execute("SELECT settings FROM runs").fetchone()
    fetch = json.loads(settings)["fetch"]
    assert fetch["disallowed_header_directives"] == ["noml"]
    assert fetch["user_agent"].endswith("(compatible; img2dataset)")
    assert fetch["user_agent_token"] == "img2dataset"


def test_older_journal_gets_the_settings_column(tmp_path: Path, origin: Origin) -> None:
    out = tmp_path / "out"
    (out / ".fetchpool").mkdir(parents=True)
    with sqlite3.connect(out / ".fetchpool" / "state.db") as db:
        db.execute(
            "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, "
            "finished REAL, version TEXT NOT NULL, argv TEXT NOT NULL, pid INTEGER NOT NULL)"
        )
    download([origin.image_url(1)], out, allow_private_networks=True)
    with sqlite3.connect(out / ".fetchpool" / "state.db") as db:
        (settings,) = db.execute("SELECT settings FROM runs").fetchone()
    assert json.loads(settings)["fetch"]["disallowed_header_directives"] == list(
        DEFAULT_DISALLOWED_HEADER_DIRECTIVES
    )
