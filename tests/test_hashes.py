"""Digests of the downloaded bytes (--hash) and their verification (--verify-hash-column)."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import re
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fetchpool import download
from fetchpool.config import FetchConfig, Options
from fetchpool.errors import ConfigError
from fetchpool.fetch import HttpFetcher
from fetchpool.fetch.digests import expected_digest
from fetchpool.models import ErrorCode, Job
from fetchpool.origin import Origin

LOOPBACK: dict[str, Any] = {"allow_private_networks": True}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --- parsing expected digests -----------------------------------------------------------------


def test_expected_digest_forms() -> None:
    raw = hashlib.sha256(b"x").digest()
    forms = [
        raw.hex(),
        raw.hex().upper(),
        f"  {raw.hex()}\n",
        f"sha256:{raw.hex()}",
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
        "sha256-" + base64.b64encode(raw).decode(),  # Subresource Integrity
        raw,
    ]
    for form in forms:
        assert expected_digest(form, "sha256") == raw, form
    raw5 = hashlib.md5(b"x").digest()
    assert expected_digest(base64.b64encode(raw5).decode(), "md5") == raw5
    assert (
        expected_digest(hashlib.sha512(b"x").hexdigest(), "sha512") == hashlib.sha512(b"x").digest()
    )


@pytest.mark.parametrize(
    "value, reason",
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("abc", "not a md5 digest (32 hex digits, or base64 of 16 bytes)"),
        ("g" * 32, "not a md5 digest"),
        (hashlib.sha256(b"x").hexdigest(), "not a md5 digest"),  # another algorithm
        ("!" * 22, "not a md5 digest"),
        (12345, "is int"),
        (b"\x00" * 5, "not a md5 digest"),
    ],
)
def test_expected_digest_refusals(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        expected_digest(value, "md5")


# --- options ----------------------------------------------------------------------------------


def test_hash_options() -> None:
    assert FetchConfig().digests == ()
    assert FetchConfig(hash="sha256").digests == ()  # fetched_sha256 is always computed
    assert FetchConfig(hash="MD5").digests == ("md5",)  # type: ignore[arg-type]
    verify = FetchConfig(verify_hash_column="h")
    assert verify.verify_hash_type == "sha256"
    assert FetchConfig(verify_hash_column="h", hash="md5").verify_hash_type == "md5"
    both = FetchConfig(verify_hash_column="h", verify_hash_type="sha512", hash="md5")
    assert both.digests == ("md5", "sha512")
    with pytest.raises(ConfigError, match="--hash 'sha1': choose md5, sha256 or sha512"):
        FetchConfig(hash="sha1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--verify-hash-type goes with --verify-hash-column"):
        FetchConfig(verify_hash_type="md5")
    with pytest.raises(ConfigError, match="--verify-hash-column needs a column name"):
        FetchConfig(verify_hash_column=" ")
    with pytest.raises(ConfigError, match="is the URL column"):
        Options.from_kwargs(verify_hash_column="url")


# --- the fetcher ------------------------------------------------------------------------------


def _fetch(tmp_path: Path, url: str, **options: Any):  # type: ignore[no-untyped-def]
    fetcher = HttpFetcher(FetchConfig(**LOOPBACK, **options), tmp_path)
    try:
        return fetcher.fetch(Job(0, url, meta=options.pop("meta", {})))
    finally:
        fetcher.close()


def test_digests_are_computed_while_streaming(origin: Origin, tmp_path: Path) -> None:
    body = origin.image_bytes(4)
    fetcher = HttpFetcher(FetchConfig(hash="sha512", verify_hash_column="m",
                                      verify_hash_type="md5", **LOOPBACK), tmp_path)  # fmt: skip
    try:
        record = fetcher.fetch(Job(0, origin.image_url(4), meta={"m": md5(body)}))
    finally:
        fetcher.close()
    assert record.ok, record.error_message
    assert record.fetched_sha256 == hashlib.sha256(body).hexdigest()
    assert record.md5 == md5(body) and record.sha512 == hashlib.sha512(body).hexdigest()


def test_the_digest_is_of_the_decoded_body(origin: Origin, tmp_path: Path) -> None:
    """Content-Encoding: gzip is undone first: the digest is of the image, as saved."""
    fetcher = HttpFetcher(FetchConfig(hash="md5", **LOOPBACK), tmp_path)
    try:
        record = fetcher.fetch(Job(0, origin.url("/gzip")))
    finally:
        fetcher.close()
    image = gzip.decompress(gzip.compress(origin.image_bytes(0)))
    assert record.ok and record.md5 == md5(image)


def test_mismatch_is_not_saved_nor_retried(origin: Origin, tmp_path: Path) -> None:
    fetcher = HttpFetcher(FetchConfig(verify_hash_column="h", **LOOPBACK), tmp_path)
    try:
        record = fetcher.fetch(Job(0, origin.image_url(1), meta={"h": "ab" * 32}))
    finally:
        fetcher.close()
    assert record.error_code is ErrorCode.HASH_MISMATCH and record.temp_path is None
    assert "sha256 of the downloaded bytes is " in (record.error_message or "")
    assert "ab" * 32 in (record.error_message or "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [None, "", "  ", "not-a-digest"])
def test_a_row_without_a_usable_digest_is_not_fetched(
    origin: Origin, tmp_path: Path, value: object
) -> None:
    fetcher = HttpFetcher(FetchConfig(verify_hash_column="h", **LOOPBACK), tmp_path)
    meta = {} if value is None else {"h": value}
    try:
        record = fetcher.fetch(Job(0, origin.image_url(1), meta=meta))
    finally:
        fetcher.close()
    assert record.error_code is ErrorCode.BAD_INPUT
    assert "--verify-hash-column" in (record.error_message or "")
    assert origin.requests() == []


# --- whole runs -------------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fetchpool", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _manifest(out: Path) -> list[dict[str, Any]]:
    result = _cli("manifest", out)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _rows(origin: Origin) -> list[dict[str, Any]]:
    """Five rows: right hex, right base64, wrong digest, no digest, right uppercase hex."""
    rows = [{"url": origin.image_url(n), "md5": md5(origin.image_bytes(n))} for n in range(5)]
    rows[1]["md5"] = base64.b64encode(bytes.fromhex(rows[1]["md5"])).decode()
    rows[2]["md5"] = md5(b"something else")
    rows[3]["md5"] = ""
    rows[4]["md5"] = rows[4]["md5"].upper()
    return rows


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["url", "md5"])
        writer.writeheader()
        writer.writerows(rows)
        path.write_text(buffer.getvalue())
    else:
        path.write_text("".join(json.dumps({**r, "md5": r["md5"] or None}) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix, processes", [(".csv", "1"), (".jsonl", "2")])
def test_cli_hash_and_verify(origin: Origin, tmp_path: Path, suffix: str, processes: str) -> None:
    source = _write(tmp_path / f"rows{suffix}", _rows(origin))
    out = tmp_path / "out"
    result = _cli(
        "get", source, "-o", out, "--allow-private-networks", "--fetch-processes", processes,
        "--threads", "4", "--hash", "md5", "--verify-hash-column", "md5", "--sidecar",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "hash_mismatch      1" in result.stderr and "bad_input          1" in result.stderr
    assert "hint: hash_mismatch:" in result.stderr
    rows = _manifest(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed", "ok"]
    assert rows[2]["error_code"] == "hash_mismatch" and rows[2]["attempts"] == 1
    assert rows[3]["error_code"] == "bad_input"
    assert "/img/3." not in " ".join(r.path for r in origin.requests())  # never fetched
    for n in (0, 1, 4):
        body = origin.image_bytes(n)
        assert (
            rows[n]["md5"] == md5(body)
            and rows[n]["fetched_sha256"] == hashlib.sha256(body).hexdigest()
        )
        assert (out / rows[n]["path"]).read_bytes() == body
        sidecar = json.loads((out / rows[n]["path"]).with_suffix(".json").read_text())
        assert sidecar["md5"] == md5(body)
    saved = [p for p in out.iterdir() if p.suffix == ".jpg"]
    assert len(saved) == 3


def test_outputs_carry_the_download_digests(origin: Origin, tmp_path: Path) -> None:
    """Re-encoded: sha256 describes the sample, fetched_sha256 and md5 the download."""
    pq = pytest.importorskip("pyarrow.parquet")
    urls = [origin.image_url(n) for n in range(3)]
    for fmt in ("webdataset", "parquet"):
        report = download(urls, tmp_path / fmt, format=fmt, hash="md5", resize=16,
                          encode="png", **LOOPBACK)  # fmt: skip
        assert report.ok == 3, report.errors
    with tarfile.open(tmp_path / "webdataset" / "00000.tar") as tar:
        member = tar.extractfile("000000001.json")
        assert member is not None
        meta = json.loads(member.read())
        png = tar.extractfile("000000001.png")
        assert png is not None
        sample = png.read()
    body = origin.image_bytes(1)
    assert meta["md5"] == md5(body)
    assert meta["fetched_sha256"] == hashlib.sha256(body).hexdigest()
    assert meta["sha256"] == hashlib.sha256(sample).hexdigest() != meta["fetched_sha256"]
    assert "sha512" not in meta
    table = pq.read_table(tmp_path / "parquet" / "00000.parquet")
    assert "md5" in table.column_names and "sha512" not in table.column_names
    (row,) = [r for r in table.to_pylist() if r["position"] == 1]
    assert row["md5"] == md5(body) and row["fetched_sha256"] == meta["fetched_sha256"]
    assert row["sha256"] == hashlib.sha256(row["image"]["bytes"]).hexdigest()


def test_parquet_input_md5_column_stays_apart_without_hash(origin: Origin, tmp_path: Path) -> None:
    """Without --hash the output has no md5 column of ours: the input's keeps its name."""
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"url": origin.image_url(0), "md5": "from the input"}]
    download(rows, tmp_path / "out", format="parquet", **LOOPBACK)
    row = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()[0]
    assert row["md5"] == "from the input" and "meta_md5" not in row
    download(rows, tmp_path / "out2", format="parquet", hash="md5", **LOOPBACK)
    row = pq.read_table(tmp_path / "out2" / "00000.parquet").to_pylist()[0]
    assert row["md5"] == md5(origin.image_bytes(0)) and row["meta_md5"] == "from the input"


def test_verify_from_a_parquet_input(origin: Origin, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    bodies = [origin.image_bytes(n) for n in range(3)]
    table = pa.table(
        {
            "url": [origin.image_url(n) for n in range(3)],
            "sha256": [hashlib.sha256(bodies[0]).hexdigest(), "00" * 32, None],
        }
    )
    pq.write_table(table, tmp_path / "in.parquet")
    report = download(
        tmp_path / "in.parquet", tmp_path / "out", verify_hash_column="sha256", **LOOPBACK
    )
    assert report.ok == 1 and report.errors == {"hash_mismatch": 1, "bad_input": 1}


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("in.csv", "url,caption\nhttp://a.example/1,x\n", "the header (line 1)"),
        ("in.jsonl", '{"url": "http://a.example/1"}\n', "the first object (line 1)"),
        ("in.txt", "http://a.example/1\n", "a text list has no columns"),
    ],
)
def test_cli_missing_verify_column_is_refused_before_anything(
    tmp_path: Path, name: str, content: str, where: str
) -> None:
    source = tmp_path / name
    source.write_text(content)
    result = _cli("get", source, "-o", tmp_path / "out", "--verify-hash-column", "sha256")
    assert result.returncode == 2
    assert where in result.stderr and "--verify-hash-column" in result.stderr
    assert not (tmp_path / "out").exists()


def test_parquet_input_missing_verify_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"url": ["http://a.example/1"]}), tmp_path / "in.parquet")
    with pytest.raises(Exception, match=r"the schema has no column 'md5' .*--verify-hash-column"):
        download(tmp_path / "in.parquet", tmp_path / "out", verify_hash_column="md5")
    assert not (tmp_path / "out").exists()


def test_an_older_journal_gets_the_digest_columns(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    download([origin.image_url(0)], out, **LOOPBACK)
    with sqlite3.connect(out / ".fetchpool" / "state.db") as db:
        for table in ("records", "staged"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN md5")
            db.execute(f"ALTER TABLE {table} DROP COLUMN sha512")
    report = download([origin.image_url(0), origin.image_url(1)], out, hash="md5", **LOOPBACK)
    assert report.ok == 2 and report.resumed == 1
    rows = _manifest(out)
    assert rows[0]["md5"] is None and rows[1]["md5"] == md5(origin.image_bytes(1))
