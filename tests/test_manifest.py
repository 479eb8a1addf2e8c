"""Manifest export: jsonl, csv and parquet read back, redaction, no lock taken."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from fetchpool.errors import ConfigError, StateError
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.state import Journal, export_manifest, lock_path
from fetchpool.state.schema import NAMES


def fill(out: Path, n: int = 30) -> None:
    with Journal.open(out) as journal:
        for position in range(n):
            if position % 3 == 0:
                record = Record(position=position, url=f"http://a.example/{position}")
                record.fail(ErrorCode.HTTP_ERROR, "404 Not Found")
                record.http_status = 404
            else:
                record = Record(
                    position=position,
                    url=f"http://alice:s3cret@a.example/{position}.jpg",
                    status=Status.OK,
                    bytes=position * 10,
                    final_url="https://bob:pw@cdn.example/x.jpg",
                    redirects=[f"http://alice:s3cret@a.example/{position}.jpg"],
                    path=f"{position}-abc.jpg",
                    meta={"caption": f"pic {position}", "id": position},
                    width=4,
                    height=3,
                )
            journal.put(record)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    fill(folder)
    return folder


def test_jsonl_to_path(out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "manifest.jsonl"
    assert export_manifest(out, dest, fmt="jsonl") == 30
    rows = [json.loads(line) for line in dest.read_text(encoding="utf-8").splitlines()]
    assert [r["position"] for r in rows] == list(range(30))
    assert list(rows[1]) == list(NAMES)
    assert rows[1]["status"] == "ok"
    assert rows[1]["meta"] == {"caption": "pic 1", "id": 1}
    assert rows[1]["url"] == "http://alice:***@a.example/1.jpg"
    assert rows[1]["final_url"] == "https://bob:***@cdn.example/x.jpg"
    assert rows[1]["redirects"] == ["http://alice:***@a.example/1.jpg"]
    assert rows[0]["error_code"] == "http_error"
    assert "s3cret" not in dest.read_text()
    assert not list(tmp_path.glob(".fp-*"))  # the temp file was renamed away


def test_jsonl_to_binary_and_text_streams(out: Path) -> None:
    binary = io.BytesIO()
    assert export_manifest(out, binary, fmt="jsonl", status=Status.FAILED) == 10
    assert not binary.closed
    text = io.StringIO()
    export_manifest(out, text, fmt="jsonl", status=Status.FAILED)
    assert binary.getvalue().decode() == text.getvalue()
    assert all(json.loads(x)["status"] == "failed" for x in text.getvalue().splitlines())


def test_csv(out: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m.csv"
    assert export_manifest(out, dest, fmt="csv", status=Status.OK) == 20
    with dest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 20
    assert list(rows[0]) == list(NAMES)
    assert rows[0]["position"] == "1"
    assert json.loads(rows[0]["meta"]) == {"caption": "pic 1", "id": 1}
    assert json.loads(rows[0]["redirects"]) == ["http://alice:***@a.example/1.jpg"]
    assert "s3cret" not in dest.read_text()


def test_parquet(out: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    dest = tmp_path / "m.parquet"
    assert export_manifest(out, dest, fmt="parquet") == 30
    table = pq.read_table(dest)
    assert table.num_rows == 30
    assert table.column_names == list(NAMES)
    rows = table.to_pylist()
    assert rows[1]["url"] == "http://alice:***@a.example/1.jpg"
    assert rows[1]["redirects"] == ["http://alice:***@a.example/1.jpg"]
    assert json.loads(rows[1]["meta"]) == {"caption": "pic 1", "id": 1}
    assert rows[0]["http_status"] == 404
    assert rows[1]["width"] == 4


def test_parquet_many_batches_and_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    from fetchpool.state import manifest

    monkeypatch.setattr(manifest, "PARQUET_BATCH", 7)
    out = tmp_path / "out"
    fill(out, 50)
    sink = io.BytesIO()
    assert export_manifest(out, sink, fmt="parquet", status=Status.OK) == 33
    sink.seek(0)
    table = pq.read_table(sink)
    assert table.num_rows == 33


def test_empty_journal_gives_empty_but_valid_outputs(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    Journal.open(out).close()
    assert export_manifest(out, tmp_path / "m.parquet", fmt="parquet") == 0
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 0
    assert export_manifest(out, tmp_path / "m.csv", fmt="csv") == 0
    assert (tmp_path / "m.csv").read_text().startswith("position,url,")


def test_export_while_a_run_holds_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out) as journal:
        journal.put(Record(position=0, url="http://a.example/0", status=Status.OK))
        journal.flush()
        journal.put(Record(position=1, url="http://a.example/1", status=Status.OK))
        sink = io.StringIO()
        # Only committed rows are visible; the lock is neither needed nor taken.
        assert export_manifest(out, sink, fmt="jsonl") == 1
        assert lock_path(out).read_text().strip().isdigit()
        journal.put(Record(position=2, url="http://a.example/2", status=Status.OK))
    assert export_manifest(out, io.StringIO(), fmt="jsonl") == 3


def test_no_journal(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no journal"):
        export_manifest(tmp_path, io.StringIO(), fmt="jsonl")
    assert not (tmp_path / ".fetchpool").exists()  # export creates nothing


def test_unknown_format(out: Path) -> None:
    with pytest.raises(ConfigError, match="manifest format"):
        export_manifest(out, io.StringIO(), fmt="xml")


def test_failed_export_leaves_no_partial_file(
    out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetchpool.state import manifest

    def boom(rows: object, dest: object) -> int:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(manifest, "_write_csv", boom)
    dest = tmp_path / "m.csv"
    with pytest.raises(RuntimeError):
        export_manifest(out, dest, fmt="csv")
    assert not dest.exists()
    assert not list(tmp_path.glob(".fp-*"))
