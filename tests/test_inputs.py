"""Input readers and URL validation: every format, bad lines, streaming memory bounds."""

from __future__ import annotations

import collections
import contextlib
import gzip
import io
import itertools
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from fetchpool.errors import ConfigError, InputError
from fetchpool.inputs import (
    InvalidURLError,
    estimate_total,
    read_input,
    redact_url,
    validate_url,
)
from fetchpool.inputs import urls as urls_module
from fetchpool.models import BadInput, ErrorCode, Job
from fetchpool.plainurl import split_plain


def items(*args: Any, **kwargs: Any) -> list[Job | BadInput]:
    return list(read_input(*args, **kwargs))


def jobs(found: list[Job | BadInput]) -> list[Job]:
    return [i for i in found if isinstance(i, Job)]


def bads(found: list[Job | BadInput]) -> list[BadInput]:
    return [i for i in found if isinstance(i, BadInput)]


# --------------------------------------------------------------------------- validate_url


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/",
        "https://example.com/a/b.jpg?x=1#frag",
        "HTTP://EXAMPLE.com",
        "http://127.0.0.1:8080/x",
        "http://[::1]:8080/x",
        "http://user:pw@example.com/x",
        "https://xn--bcher-kva.example/",
        "http://example.com:/x",
    ],
)
def test_valid_urls(url: str) -> None:
    assert validate_url(f"  {url}\t\n") == url


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("", ErrorCode.INVALID_URL),
        ("example.com/x.jpg", ErrorCode.INVALID_URL),
        ("example.com:8080/x", ErrorCode.INVALID_URL),
        ("//example.com/x", ErrorCode.INVALID_URL),
        ("file:///etc/passwd", ErrorCode.UNSUPPORTED_SCHEME),
        ("ftp://example.com/x", ErrorCode.UNSUPPORTED_SCHEME),
        ("data:image/png;base64,AAAA", ErrorCode.UNSUPPORTED_SCHEME),
        ("gopher://example.com/", ErrorCode.UNSUPPORTED_SCHEME),
        ("javascript:alert(1)", ErrorCode.UNSUPPORTED_SCHEME),
        ("http:/example.com", ErrorCode.INVALID_URL),
        ("http://", ErrorCode.INVALID_URL),
        ("http:///path", ErrorCode.INVALID_URL),
        ("http://example.com:99999/", ErrorCode.INVALID_URL),
        ("http://example.com:0/", ErrorCode.INVALID_URL),
        ("http://example.com:80a/", ErrorCode.INVALID_URL),
        ("http://exa mple.com/", ErrorCode.INVALID_URL),
        ("http://example.com/a b", ErrorCode.INVALID_URL),
        ("http://example.com/\r\nX-Injected: 1", ErrorCode.INVALID_URL),
        ("http://example.com/\nx", ErrorCode.INVALID_URL),
        ("http://example.com/\x00", ErrorCode.INVALID_URL),
        ("http://example.com/\x7f", ErrorCode.INVALID_URL),
        ("http://example.com/\u2028x", ErrorCode.INVALID_URL),
        ("http://evil.com\\@good.com/", ErrorCode.INVALID_URL),
        ("http://good.com\\evil.com/", ErrorCode.INVALID_URL),
        ("http://[::1/", ErrorCode.INVALID_URL),
        ("http://[nope]/", ErrorCode.INVALID_URL),
        ("http://user:pw@/x", ErrorCode.INVALID_URL),
        ("http://exa<mple.com/", ErrorCode.INVALID_URL),
    ],
)
def test_invalid_urls(url: str, code: ErrorCode) -> None:
    with pytest.raises(InvalidURLError) as info:
        validate_url(url)
    assert info.value.code is code


def _full_path(url: str) -> str | ErrorCode:
    """What validate_url answers with its one-regex fast path switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(urls_module, "split_plain", lambda _url: None)
        try:
            return validate_url(url)
        except InvalidURLError as exc:
            return exc.code


_URL_PIECES = st.sampled_from(
    ["http", "https", "HTTP", "://", ":", "/", "//", "?", "#", "@", "[", "]", "\\", "%", "-",
     ".", "a", "Z", "0", "9", "80", "65535", "65536", "00", "example.com", "127.0.0.1", " ",
     "\t", "\x00", "\x7f", "\u00fc", "~", "!", "'", "<", "^", "`", "{", "|", "%2F", "%2f",
     "%4", "/.", "/..", "./", "&", "=", "$", "(", "*", ",", ";", "+"]
)  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(["", "http://", "https://"]), st.lists(_URL_PIECES, max_size=12))
def test_fast_path_agrees_with_full_validation(prefix: str, pieces: list[str]) -> None:
    """Whatever the fast path accepts, the full checks accept too, unchanged."""
    url = prefix + "".join(pieces)
    plain = split_plain(url)
    if plain is not None:
        assert _full_path(url) == url
        parsed = parse_url(url)  # the fetcher's general parser splits it the same way
        assert (plain.scheme, plain.host, plain.port, plain.request_uri) == (
            parsed.scheme,
            parsed.host,
            parsed.port,
            parsed.request_uri,
        )


@pytest.mark.parametrize(
    "url",
    ["http://example.com/a.jpg", "https://cdn.example.com:8443/x/y.png?w=1&h=2#f",
     "http://127.0.0.1:18431/lat0/photo/00001.jpg"],
)  # fmt: skip
def test_common_urls_take_the_fast_path(url: str) -> None:
    assert split_plain(url) is not None
    assert validate_url(url) == url == _full_path(url)


def test_unicode_host_becomes_idna() -> None:
    assert validate_url("https://user:pw@bücher.example:8443/p?q=ü") == (
        "https://user:pw@xn--bcher-kva.example:8443/p?q=ü"
    )


def test_url_length_limit() -> None:
    ok = "http://example.com/" + "a" * (8192 - 19)
    assert validate_url(ok) == ok
    with pytest.raises(InvalidURLError, match="limit 8192"):
        validate_url(ok + "a")


def test_messages_redact_credentials() -> None:
    with pytest.raises(InvalidURLError) as info:
        validate_url("http://alice:hunter2@example.com:99999/x")
    assert "hunter2" not in str(info.value)
    assert "alice:***@example.com" in str(info.value)


def test_messages_are_short_for_huge_urls() -> None:
    with pytest.raises(InvalidURLError) as info:
        validate_url("http://example.com/" + "x" * 100_000)
    assert len(info.value.message) < 300


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:pw@host/p", "http://user:***@host/p"),
        ("https://token@host/", "https://***@host/"),
        ("http://host/a@b", "http://host/a@b"),
        ("http://a:b@c:d@host:80/", "http://a:***@host:80/"),
        ("http://host/", "http://host/"),
        ("user:pw@host/x", "user:***@host/x"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


# --------------------------------------------------------------------------- txt


def test_txt_skips_blanks_and_comments_but_counts_lines(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt"
    src.write_bytes(
        b"# header comment\n"
        b"http://a.example/1.jpg\n"
        b"\n"
        b"   \n"
        b"  http://a.example/2.jpg  \r\n"
        b"not a url\n"
        b"ftp://a.example/3\n"
        b"http://a.example/4"  # no final newline
    )
    found = items(src)
    assert [(i.position, i.line) for i in found] == [(0, 2), (1, 5), (2, 6), (3, 7), (4, 8)]
    assert [j.url for j in jobs(found)] == [
        "http://a.example/1.jpg",
        "http://a.example/2.jpg",
        "http://a.example/4",
    ]
    bad = bads(found)
    assert [(b.line, b.code) for b in bad] == [
        (6, ErrorCode.INVALID_URL),
        (7, ErrorCode.UNSUPPORTED_SCHEME),
    ]
    assert bad[0].raw == "not a url"


def test_txt_bom_is_ignored(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt"
    src.write_bytes(b"\xef\xbb\xbfhttp://a.example/x\n")
    assert [j.url for j in jobs(items(src))] == ["http://a.example/x"]


def test_invalid_utf8_fails_only_that_line(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt"
    src.write_bytes(b"http://a.example/1\nhttp://a.example/\xff\xfe\nhttp://a.example/3\n")
    found = items(src)
    assert [type(i) for i in found] == [Job, BadInput, Job]
    bad = found[1]
    assert isinstance(bad, BadInput)
    assert (bad.position, bad.line, bad.code) == (1, 2, ErrorCode.BAD_INPUT)
    assert "UTF-8" in bad.message
    assert bad.raw.startswith("http://a.example/")


def test_header_injection_line(tmp_path: Path) -> None:
    # A lone CR inside a line survives line splitting and must be refused.
    src = tmp_path / "urls.txt"
    src.write_bytes(b"http://a.example/x\rHost: evil\nhttp://a.example/ok\n")
    found = items(src)
    assert isinstance(found[0], BadInput)
    assert found[0].code is ErrorCode.INVALID_URL
    assert "line break" in found[0].message
    assert isinstance(found[1], Job)


def test_100kb_url_is_a_bad_item_not_a_crash(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt"
    src.write_text("http://a.example/" + "x" * 100_000 + "\nhttp://a.example/ok\n")
    found = items(src)
    assert isinstance(found[0], BadInput)
    assert found[0].code is ErrorCode.INVALID_URL
    assert len(found[0].raw) <= 8192 + 3
    assert isinstance(found[1], Job)
    assert found[1].line == 2


def test_overlong_physical_line_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    from fetchpool.inputs import MAX_LINE_BYTES

    src = tmp_path / "urls.txt"
    src.write_bytes(b"x" * (3 * MAX_LINE_BYTES + 5) + b"\nhttp://a.example/ok\n")
    found = items(src)
    assert isinstance(found[0], BadInput)
    assert "longer than" in found[0].message
    assert [(j.position, j.line) for j in jobs(found)] == [(1, 2)]


def test_gzip_txt(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt.gz"
    with gzip.open(src, "wb") as handle:
        handle.write(b"http://a.example/1\n#c\nhttp://a.example/2\n")
    found = items(src)
    assert [(j.url, j.line) for j in jobs(found)] == [
        ("http://a.example/1", 1),
        ("http://a.example/2", 3),
    ]


def test_corrupt_gzip_is_an_input_error(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt.gz"
    data = gzip.compress(b"http://a.example/1\n" * 10_000)
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt"):
        items(src)


def test_stdin_binary_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"http://a.example/1\n\xff\nhttp://a.example/2\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    found = items("-")
    assert [type(i) for i in found] == [Job, BadInput, Job]
    assert not stdin.closed  # stdin is not ours to close


def test_stdin_with_format(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b'{"url": "http://a.example/1", "id": 7}\n'))
    monkeypatch.setattr(sys, "stdin", stdin)
    (job,) = items("-", format="jsonl")
    assert isinstance(job, Job)
    assert job.meta == {"id": 7}


def test_stdin_parquet_refused() -> None:
    with pytest.raises(InputError, match="stdin"):
        read_input("-", format="parquet")


# --------------------------------------------------------------------------- csv / tsv


def test_csv_columns_and_meta(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(
        'id,url,caption\n1,http://a.example/1.jpg,"a cat, sleeping"\n'
        '\n2,http://a.example/2.jpg,"two\nlines"\n3,nope,x\n',
        encoding="utf-8",
    )
    found = items(src)
    assert [(i.position, i.line) for i in found] == [(0, 2), (1, 4), (2, 6)]
    first, second, third = found
    assert isinstance(first, Job)
    assert first.meta == {"id": "1", "caption": "a cat, sleeping"}
    assert isinstance(second, Job)
    assert second.meta["caption"] == "two\nlines"
    assert isinstance(third, BadInput)
    assert third.code is ErrorCode.INVALID_URL


def test_csv_custom_url_column_and_row_shapes(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("link,title\nhttp://a.example/1,t\nhttp://a.example/2,t,extra\n\n")
    found = items(src, url_column="link")
    assert isinstance(found[0], Job)
    assert found[0].meta == {"title": "t"}
    assert isinstance(found[1], BadInput)
    assert "3 fields" in found[1].message
    assert found[1].line == 3


def test_csv_invalid_utf8_row(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b"url,c\nhttp://a.example/1,\xff\nhttp://a.example/2,ok\n")
    found = items(src)
    assert [type(i) for i in found] == [BadInput, Job]
    assert found[0].line == 2


def test_csv_field_over_the_record_bound_is_a_bad_row(tmp_path: Path) -> None:
    from fetchpool.inputs import MAX_LINE_BYTES

    src = tmp_path / "in.csv"
    huge = "y" * (MAX_LINE_BYTES + 10)
    src.write_text(f'url,c\nhttp://a.example/1,"{huge}"\nhttp://a.example/2,ok\n')
    found = items(src)
    assert isinstance(found[0], BadInput)
    assert found[0].code is ErrorCode.BAD_INPUT and found[0].line == 2
    assert isinstance(found[1], Job)
    assert (found[1].position, found[1].line) == (1, 3)


def test_csv_missing_url_column(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("link,title\nhttp://a.example/1,t\n")
    with pytest.raises(InputError, match=r"no column 'url'.*'link'.*--url-column.*url_column="):
        read_input(src)


def test_csv_empty_file_yields_nothing(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("")
    assert items(src) == []


def test_tsv_keeps_quotes(tmp_path: Path) -> None:
    src = tmp_path / "in.tsv"
    src.write_text('url\tcaption\nhttp://a.example/1\the said "hi"\n')
    (job,) = items(src)
    assert isinstance(job, Job)
    assert job.meta == {"caption": 'he said "hi"'}


def test_gzip_csv(tmp_path: Path) -> None:
    src = tmp_path / "in.csv.gz"
    src.write_bytes(gzip.compress(b"url,n\nhttp://a.example/1,1\n"))
    (job,) = items(src)
    assert isinstance(job, Job)
    assert job.meta == {"n": "1"}


# --------------------------------------------------------------------------- jsonl


def test_jsonl(tmp_path: Path) -> None:
    src = tmp_path / "in.ndjson"
    src.write_text(
        '{"url": "http://a.example/1", "caption": "c", "n": 1}\n'
        "\n"
        '"http://a.example/2"\n'
        "{not json\n"
        '{"url": 5}\n'
        '{"other": "x"}\n'
        "[1, 2]\n" + "[" * 100_000 + "\n"
    )
    found = items(src)
    assert [(i.position, i.line) for i in found] == [
        (0, 1),
        (1, 3),
        (2, 4),
        (3, 5),
        (4, 6),
        (5, 7),
        (6, 8),
    ]
    first, second, *rest = found
    assert isinstance(first, Job)
    assert first.meta == {"caption": "c", "n": 1}
    assert isinstance(second, Job)
    assert second.url == "http://a.example/2"
    assert all(isinstance(b, BadInput) and b.code is ErrorCode.BAD_INPUT for b in rest)


def test_jsonl_first_object_without_url_column(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"link": "http://a.example/1"}\n')
    with pytest.raises(InputError, match="'link'"):
        items(src)
    (job,) = items(src, url_column="link")
    assert isinstance(job, Job)


# --------------------------------------------------------------------------- parquet


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.parquet"
    table = pa.table(
        {
            "url": ["http://a.example/1", None, "ftp://x/", "http://a.example/4"],
            "caption": ["a", "b", "c", "d"],
            "n": [1, 2, 3, 4],
        }
    )
    pq.write_table(table, src, row_group_size=2)
    found = items(src)
    assert [(i.position, i.line) for i in found] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert isinstance(found[0], Job)
    assert found[0].meta == {"caption": "a", "n": 1}
    assert isinstance(found[1], BadInput)
    assert isinstance(found[2], BadInput)
    assert found[2].code is ErrorCode.UNSUPPORTED_SCHEME
    assert estimate_total(src) == 4
    with pytest.raises(InputError, match="'caption'"):
        read_input(src, url_column="link")


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.parquet"
    src.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match=r"pip install 'fetchpool\[parquet\]'"):
        read_input(src)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    src = tmp_path / "in.parquet"
    src.write_bytes(b"definitely not parquet")
    with pytest.raises(InputError, match="parquet"):
        read_input(src)


# --------------------------------------------------------------------------- sources


def test_iterable_source() -> None:
    source = ["http://a.example/1", {"url": "http://a.example/2", "k": "v"}, 42, {"x": 1}]
    found = items(source)
    assert [type(i) for i in found] == [Job, Job, BadInput, BadInput]
    assert found[1].meta == {"k": "v"}  # type: ignore[union-attr]
    assert all(i.line is None for i in found)


def test_generator_source_is_consumed_lazily() -> None:
    pulled = 0

    def endless() -> Iterator[str]:
        nonlocal pulled
        for n in itertools.count():
            pulled += 1
            yield f"http://a.example/{n}"

    first = list(itertools.islice(read_input(endless()), 5))
    assert [i.position for i in first] == [0, 1, 2, 3, 4]
    assert pulled <= 6


def test_shards_partition_and_keep_global_positions(tmp_path: Path) -> None:
    src = tmp_path / "urls.txt"
    src.write_text("".join(f"http://a.example/{n}\n" for n in range(10)))
    shards = [[i.position for i in read_input(src, shard=(k, 3))] for k in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(ConfigError):
        read_input(src, shard=(3, 3))


@pytest.mark.parametrize("name", ["missing.txt", "missing.csv", "missing.parquet"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="not found"):
        read_input(tmp_path / name)


def test_unknown_format(tmp_path: Path) -> None:
    src = tmp_path / "urls.dat"
    src.write_text("http://a.example/\n")
    with pytest.raises(InputError, match="format="):
        read_input(src)
    with pytest.raises(InputError, match="unknown input format"):
        read_input(src, format="xml")
    assert len(items(src, format="txt")) == 1


def test_directory_is_not_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "d.txt"
    folder.mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        read_input(folder)


def test_estimate_total(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("http://a/1\nhttp://a/2\nhttp://a/3")
    assert estimate_total(txt) == 3
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("url\nhttp://a/1\nhttp://a/2\n")
    assert estimate_total(csv_file) == 2
    gz = tmp_path / "a.txt.gz"
    gz.write_bytes(gzip.compress(b"x\n"))
    assert estimate_total(gz) is None
    assert estimate_total("-") is None
    assert estimate_total(iter(["http://a/1"])) is None
    assert estimate_total(["http://a/1", "http://a/2"]) == 2
    assert estimate_total(tmp_path / "missing.txt") is None
    empty = tmp_path / "e.txt"
    empty.write_bytes(b"")
    assert estimate_total(empty) == 0


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_million_line_file_is_streamed(tmp_path: Path) -> None:
    src = tmp_path / "big.txt"
    line = b"http://images.example.com/some/fairly/long/path/image-%07d.jpg\n"
    with src.open("wb") as handle:
        for start in range(0, 1_000_000, 10_000):
            handle.write(b"".join(line % n for n in range(start, start + 10_000)))
    assert src.stat().st_size > 50_000_000
    assert estimate_total(src) == 1_000_000

    tracemalloc.start()
    try:
        reader = read_input(src)
        first = list(itertools.islice(reader, 1000))
        _, peak = tracemalloc.get_traced_memory()
        reader.close()  # type: ignore[attr-defined]
    finally:
        tracemalloc.stop()
    assert [i.position for i in first] == list(range(1000))
    # The file is ~60 MB; a reader that slurped it would peak far above this bound.
    assert peak < 5_000_000
    # The whole file streams through (sharding skips validation, not reading).
    last = collections.deque(read_input(src, shard=(9, 10)), maxlen=1)
    assert [(i.position, i.line) for i in last] == [(999_999, 1_000_000)]


def test_jsonl_reader_memory_is_flat(tmp_path: Path) -> None:
    src = tmp_path / "big.jsonl"
    with src.open("w") as handle:
        for n in range(50_000):
            handle.write(json.dumps({"url": f"http://a.example/{n}", "caption": "x" * 50}))
            handle.write("\n")
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_input(src))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 50_000
    assert peak < 3_000_000


# --------------------------------------------------------------------------- messages (issue 11)


def _cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fetchpool", *map(str, args)],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_input_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetchpool: input_error: "), lines
    return lines[0]


def test_cli_missing_column_names_the_option(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("link,title\nhttp://a.example/1,t\n")
    line = _one_input_error(_cli("get", src, "-o", tmp_path / "out", "-q"))
    assert "has no column 'url' (columns: 'link', 'title')" in line
    assert "--url-column" in line and "pass url_column=" not in line


def test_cli_unknown_format_names_the_option(tmp_path: Path) -> None:
    src = tmp_path / "urls.dat"
    src.write_text("http://a.example/1\n")
    line = _one_input_error(_cli("get", src, "-o", tmp_path / "out", "-q"))
    assert "cannot tell the format" in line and "--input-format" in line
    assert "pass format=" not in line


def test_cli_missing_column_on_stdin(tmp_path: Path) -> None:
    result = _cli(
        "get", "-", "--input-format", "jsonl", "-o", tmp_path / "out", "-q",
        stdin=b'{"link": "http://a.example/1"}\n',
    )  # fmt: skip
    line = _one_input_error(result)
    assert "<stdin>: the first object (line 1) has no column 'url'" in line
    assert "--url-column" in line


@pytest.mark.parametrize("case", ["missing column", "garbage", "missing file"])
def test_cli_input_error_creates_no_output_folder(tmp_path: Path, case: str) -> None:
    src = tmp_path / "in.csv"
    if case == "missing column":
        src.write_text("link\nhttp://a.example/1\n")
    elif case == "garbage":
        src.write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    _one_input_error(_cli("get", src, "-o", out, "-q"))
    assert not out.exists()


def test_library_messages_name_option_and_keyword(tmp_path: Path) -> None:
    csv_file = tmp_path / "in.csv"
    csv_file.write_text("URL,TEXT\nhttp://a.example/1,t\n")
    with pytest.raises(InputError) as caught:
        read_input(csv_file)
    assert str(caught.value).endswith(
        "choose the URL column with --url-column (url_column= in Python); "
        "perhaps --url-column URL (url_column='URL')"
    )
    with pytest.raises(InputError, match=r"--input-format \(format= in Python\)"):
        read_input(csv_file, format="xml")
    headerless = tmp_path / "list.csv"
    headerless.write_text("http://a.example/1,cat\n")
    with pytest.raises(InputError, match=r"looks like data.*--input-format txt"):
        read_input(headerless)
    wide = tmp_path / "wide.tsv"
    wide.write_text("\t".join(f"column_{n}_" + "w" * 100 for n in range(50)) + "\n")
    with pytest.raises(InputError, match=r"\.\.\. \(50 in all\)") as caught:
        read_input(wide)
    assert len(str(caught.value)) < 1500


def test_parquet_missing_column_names_the_option(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"image_url": ["http://a.example/1"]}), src)
    with pytest.raises(InputError, match=r"the schema has no column 'url'.*--url-column image_url"):
        read_input(src)


# --------------------------------------------------------------------------- check_input


def test_check_input_refuses_what_read_input_refuses(tmp_path: Path) -> None:
    from fetchpool import inputs

    (tmp_path / "nocol.csv").write_text("link\nhttp://a.example/1\n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "u.dat").write_text("http://a.example/1\n")
    before = sorted(tmp_path.iterdir())
    for name, words in [
        ("nocol.csv", "--url-column"),
        ("bin.txt", "NUL"),
        ("u.dat", "--input-format"),
        ("missing.txt", "not found"),
    ]:
        with pytest.raises(InputError, match=words):
            inputs.check_input(tmp_path / name)
    with pytest.raises(InputError, match=r"no column 'link '.*perhaps --url-column link\b"):
        inputs.check_input(tmp_path / "nocol.csv", format="csv", url_column="link ")
    inputs.check_input(tmp_path / "nocol.csv", url_column="link")
    inputs.check_input(tmp_path / "u.dat", format="txt")
    assert sorted(tmp_path.iterdir()) == before  # it creates nothing


def test_check_input_reads_only_the_start(tmp_path: Path) -> None:
    from fetchpool import inputs

    src = tmp_path / "in.csv.gz"
    whole = gzip.compress(b"url,n\n" + b"http://a.example/1,1\n" * 200_000)
    src.write_bytes(whole[: len(whole) // 2])  # corrupt past the first megabyte or so
    inputs.check_input(src)  # the header is fine
    with pytest.raises(InputError, match="corrupt"):
        items(src)


def test_check_input_leaves_an_iterable_alone() -> None:
    from fetchpool import inputs

    pulled = 0

    def urls() -> Iterator[str]:
        nonlocal pulled
        pulled += 1
        yield "http://a.example/1"

    source = urls()
    inputs.check_input(source)
    assert pulled == 0
    assert [i.position for i in read_input(source)] == [0]


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_check_input_on_a_stdin_pipe_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    import os
    import threading

    from fetchpool import inputs

    rest = range(1, 5000)
    if fmt == "txt":
        body = b"\n# list\nhttp://a.example/0\n" + b"".join(
            b"http://a.example/%d\n" % n for n in rest
        )
    elif fmt == "csv":
        body = b'url,caption\nhttp://a.example/0,"two\nlines"\n'
        body += b"".join(b"http://a.example/%d,c\n" % n for n in rest)
    else:
        body = b'\n{"url": "http://a.example/0"}\n'
        body += b"".join(b'"http://a.example/%d"\n' % n for n in rest)
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        with os.fdopen(write_fd, "wb") as pipe, contextlib.suppress(BrokenPipeError):
            for start in range(0, len(body), 1000):  # small writes: a pipe, not a file
                pipe.write(body[start : start + 1000])
                pipe.flush()

    producer = threading.Thread(target=produce)
    producer.start()
    with os.fdopen(read_fd, "rb") as raw:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
        inputs.check_input("-", format=fmt)
        inputs.check_input("-", format=fmt)  # twice: still nothing consumed
        found = items("-", format=fmt)
    producer.join()
    assert [type(i) for i in found] == [Job] * 5000, bads(found)[:2]
    assert [j.url for j in jobs(found)][:2] == ["http://a.example/0", "http://a.example/1"]
    if fmt == "csv":
        assert found[0].meta == {"caption": "two\nlines"}  # type: ignore[union-attr]


def test_check_input_on_stdin_refuses_a_missing_column(monkeypatch: pytest.MonkeyPatch) -> None:
    from fetchpool import inputs

    monkeypatch.setattr(sys, "stdin", io.StringIO("link\nhttp://a.example/1\n"))  # no .buffer
    with pytest.raises(InputError, match=r"<stdin>: the header .* has no column 'url'"):
        inputs.check_input("-", format="csv")
    found = items("-", format="csv", url_column="link")
    assert [(j.url, j.line) for j in jobs(found)] == [("http://a.example/1", 2)]
