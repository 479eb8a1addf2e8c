"""Input size bounds and garbage input (issue 11, RELIABILITY case 49).

One record (a txt/jsonl line, a csv/tsv row) may be up to MAX_LINE_BYTES: longer fields than
the csv module's default 128 KiB are kept, a longer record is one ``bad_input`` naming its
line and the bound, and a header that cannot be one stops the run with exit 2, no traceback.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fetchpool.errors import InputError
from fetchpool.inputs import MAX_LINE_BYTES, read_input
from fetchpool.models import BadInput, ErrorCode, Job

CAPTION = 200_000  # captions of 200 KB exist (case 49); csv's own limit is 131072
BOUND = "1 MiB (1048576 bytes)"


def items(*args: Any, **kwargs: Any) -> list[Job | BadInput]:
    return list(read_input(*args, **kwargs))


def write_rows(path: Path, fmt: str, rows: list[tuple[str, str]]) -> Path:
    """Write ``(url, caption)`` rows as csv, tsv or jsonl, with a header for csv/tsv."""
    if fmt == "jsonl":
        text = "".join(
            json.dumps({"url": u, "caption": c}, ensure_ascii=False) + "\n" for u, c in rows
        )
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = f"url{sep}caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in rows)
    path.write_text(text, encoding="utf-8")
    return path


def cli(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fetchpool", *map(str, args)],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --------------------------------------------------------------------------- fields up to the bound


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
@pytest.mark.parametrize("size", [140_000, CAPTION, MAX_LINE_BYTES - 100])
def test_a_long_caption_is_kept_whole(tmp_path: Path, fmt: str, size: int) -> None:
    caption = "é" * 100 + "y" * (size - 200)  # size bytes, some of them multi-byte
    src = write_rows(
        tmp_path / f"in.{fmt}",
        fmt,
        [("http://a.example/1", caption), ("http://a.example/2", "short")],
    )
    found = items(src)
    assert [type(i) for i in found] == [Job, Job]
    assert found[0].meta["caption"] == caption  # type: ignore[union-attr]
    assert [i.position for i in found] == [0, 1]


def test_a_long_quoted_multiline_caption_is_kept(tmp_path: Path) -> None:
    caption = ("x" * 100_000 + "\n") * 3 + "end"
    src = tmp_path / "in.csv"
    src.write_text(f'url,caption\nhttp://a.example/1,"{caption}"\nhttp://a.example/2,b\n')
    first, second = items(src)
    assert isinstance(first, Job) and first.meta["caption"] == caption
    assert isinstance(second, Job) and second.line == 6


def test_the_programs_field_limit_is_raised_to_the_bound_never_lowered(tmp_path: Path) -> None:
    """csv's limit is process-wide: fetchpool raises a lower one to one record's bound (a
    host program then accepts longer fields, nothing else changes) and keeps a higher one."""
    src = write_rows(
        tmp_path / "in.csv", "csv", [(f"http://a.example/{n}", "y" * CAPTION) for n in range(3)]
    )
    before = csv.field_size_limit()
    csv.field_size_limit(131_072)
    try:
        assert all(isinstance(item, Job) for item in read_input(src))
        assert csv.field_size_limit() == MAX_LINE_BYTES
        csv.field_size_limit(10 * MAX_LINE_BYTES)
        assert all(isinstance(item, Job) for item in read_input(src))
        assert csv.field_size_limit() == 10 * MAX_LINE_BYTES
    finally:
        csv.field_size_limit(before)


def test_parquet_cells_have_no_bound_of_their_own(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.parquet"
    caption = "y" * (2 * MAX_LINE_BYTES)
    pq.write_table(pa.table({"url": ["http://a.example/1"], "caption": [caption]}), src)
    (job,) = items(src)
    assert isinstance(job, Job) and job.meta["caption"] == caption


# --------------------------------------------------------------------------- beyond the bound


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl"])
def test_a_record_over_the_bound_is_bad_input_with_line_and_bound(tmp_path: Path, fmt: str) -> None:
    huge = "y" * (MAX_LINE_BYTES + 1)
    src = tmp_path / f"in.{fmt}"
    if fmt == "txt":
        src.write_text(f"http://a.example/1\nhttp://a.example/{huge}\nhttp://a.example/3\n")
    else:
        rows = [
            ("http://a.example/1", "a"),
            ("http://a.example/2", huge),
            ("http://a.example/3", "c"),
        ]
        write_rows(src, fmt, rows)
    found = items(src)
    assert [type(i) for i in found] == [Job, BadInput, Job]
    bad = found[1]
    assert isinstance(bad, BadInput)
    line = 2 if fmt in ("txt", "jsonl") else 3
    assert bad.code is ErrorCode.BAD_INPUT and bad.line == line
    assert f"line {line} " in bad.message and BOUND in bad.message
    assert len(bad.raw) <= 8192 + 3  # the journal does not get the megabyte
    assert (found[2].position, found[2].line) == (2, line + 1)


def test_a_multiline_csv_row_over_the_bound_is_one_bad_row(tmp_path: Path) -> None:
    part = "x" * (MAX_LINE_BYTES // 3)
    src = tmp_path / "in.csv"
    src.write_text(
        f'url,caption\nhttp://a.example/1,"{part}\n{part}\n{part}{part}"\nhttp://a.example/2,b\n'
    )
    bad, job = items(src)
    assert isinstance(bad, BadInput) and bad.line == 2
    assert "lines 2-4" in bad.message and BOUND in bad.message
    assert isinstance(job, Job) and (job.position, job.line) == (1, 5)


# --------------------------------------------------------------------------- garbage headers


def _nul_header(path: Path) -> None:
    path.write_bytes(b"\x00" * 300_000 + b"\nhttp://a.example/1\n")


def _huge_field_header(path: Path) -> None:
    path.write_bytes(b"name," + b"x" * 300_000 + b"\nhttp://a.example/1,c\n")


def _binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 400)


def _header_over_the_bound(path: Path) -> None:
    path.write_bytes(b"url," + b"h" * (2 * MAX_LINE_BYTES) + b"\nhttp://a.example/1,c\n")


def _gzip_without_gz(path: Path) -> None:
    path.write_bytes(gzip.compress(b"url\nhttp://a.example/1\n"))


def _latin1_header(path: Path) -> None:
    path.write_bytes(b"url,l\xe9gende\nhttp://a.example/1,c\n")


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_nul_header, "NUL bytes"),
        (_huge_field_header, "has no column 'url'"),
        (_binary, "NUL bytes"),
        (_header_over_the_bound, BOUND),
        (_gzip_without_gz, "gzip"),
        (_latin1_header, "not valid UTF-8"),
    ],
)
def test_a_garbage_header_is_an_input_error_in_one_line(
    tmp_path: Path, make: Any, words: str
) -> None:
    src = tmp_path / "in.csv"
    make(src)
    with pytest.raises(InputError, match=re.escape(words)) as caught:
        read_input(src)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600
    result = cli("get", src, "-o", tmp_path / "out", "-q")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetchpool: input_error: "), lines
    assert words in lines[0]


def test_a_garbage_header_on_stdin_is_an_input_error(tmp_path: Path) -> None:
    result = cli(
        "get", "-", "--input-format", "tsv", "-o", tmp_path / "out", "-q",
        stdin=b"\x00\x01" * 100_000 + b"\n",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("fetchpool: input_error: <stdin>: line 1 contains NUL")


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        ("in.txt", b"PAR1\x15\x04\x15", "is a parquet file: choose --input-format parquet"),
        ("in.jsonl", b"PK\x03\x04\x14\x00", "zip archive"),
        ("in.txt", "url\nhttp://a.example/1\n".encode("utf-16"), "UTF-16"),
        ("in.jsonl", b'{"url": "http://a.example/1"}\x00\n', "NUL bytes"),
    ],
)
def test_binary_data_under_a_text_name_is_named(
    tmp_path: Path, name: str, data: bytes, words: str
) -> None:
    src = tmp_path / name
    src.write_bytes(data)
    with pytest.raises(InputError, match=words):
        read_input(src)
