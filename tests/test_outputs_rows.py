"""Issue 13 pieces without sockets: option defaults, --accept, the run's Parquet schema, rows
held with their shard, companions settled by the journal, numbered file folders, and the
header-only image check."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from fetchpool.config import FetchConfig, ImageConfig, Options
from fetchpool.errors import ConfigError
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.outputs.files import FilesWriter
from fetchpool.outputs.webdataset import WebDatasetWriter
from fetchpool.process.images import process_image
from fetchpool.state import Journal, db_path, iter_journal

# -- options ---------------------------------------------------------------------------------


def test_encode_is_jpeg_with_resize_unless_given() -> None:
    assert Options.from_kwargs(resize=64).image.encode == "jpeg"
    assert Options.from_kwargs(resize=64, encode=None).image.encode == "jpeg"
    assert Options.from_kwargs(resize=64, encode="keep").image.encode == "keep"
    assert Options.from_kwargs(resize=64, resize_mode="no").image.encode == "keep"
    assert Options.from_kwargs().image.encode == "keep"
    assert Options.from_kwargs(min_size=10).image.encode == "keep"


def test_dataset_formats_identify_every_body_and_files_do_not() -> None:
    for fmt in ("webdataset", "parquet"):
        image = Options.from_kwargs(format=fmt).image
        assert image.identify and image.active and image.header_only
    assert not Options.from_kwargs().image.active
    verified = Options.from_kwargs(format="webdataset", verify=True).image
    assert verified.active and not verified.header_only  # --verify decodes in full


@pytest.mark.parametrize(
    ("accept", "content_type", "wanted"),
    [
        ((), "text/html", True),
        (("image/*",), "image/jpeg", True),
        (("image/*",), "IMAGE/PNG; charset=binary", True),
        (("image/*",), "text/html; charset=utf-8", False),
        (("image/*",), None, False),
        (("application/octet-stream",), None, True),
        (("image/png", "application/pdf"), "application/pdf", True),
        (("image/png",), "image/jpeg", False),
        (("*/*",), "text/plain", True),
    ],
)
def test_accept_matches_media_ranges(
    accept: tuple[str, ...], content_type: str | None, wanted: bool
) -> None:
    assert FetchConfig(accept=accept).accepts(content_type) is wanted


def test_accept_is_parsed_from_the_cli_string_and_checked() -> None:
    assert Options.from_kwargs(accept="image/*, application/pdf").fetch.accept == (
        "image/*",
        "application/pdf",
    )
    assert Options.from_kwargs(accept="").fetch.accept == ()
    for bad in ("image", "*/png", "image/png\r\nX: y"):
        with pytest.raises(ConfigError, match="--accept"):
            FetchConfig(accept=(bad,))


# -- the run's Parquet schema ----------------------------------------------------------------


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (8, 6)) -> Path:
    buffer = io.BytesIO()
    Image.effect_noise(size, 30 + seed).convert("RGB").save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    (folder / ".fetchpool" / "tmp").mkdir(parents=True)
    return folder


def _ok(out: Path, position: int, **meta: object) -> Record:
    temp = _jpeg(out / ".fetchpool" / "tmp" / f"s{position}.part", position)
    return Record(
        position=position,
        url=f"http://img.test/{position}.jpg",
        status=Status.OK,
        temp_path=str(temp),
        extension=".jpg",
        bytes=temp.stat().st_size,
        meta=dict(meta),
    )


def _failed(position: int, **meta: object) -> Record:
    record = Record(position=position, url=f"http://img.test/{position}.html", meta=dict(meta))
    return record.fail(ErrorCode.NOT_AN_IMAGE, "cannot identify image file (html?)")


def test_the_first_shard_pins_types_later_misfits_become_null(
    out: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from fetchpool.outputs.parquet import ParquetWriter

    writer = ParquetWriter(out, shard_size=2)
    first = [
        _ok(out, 0, n=1, mixed="a", empty={}, nothing=None, nested=[{"a": 1}]),
        _ok(out, 1, n=2, mixed=3, empty={}, nothing=None, nested=[{"a": 2}]),
    ]
    for record in first:
        writer.write(record)
    with caplog.at_level(logging.WARNING, logger="fetchpool"):
        writer.write(_ok(out, 2, n="n/a", mixed=True, late="new"))
        writer.write(_ok(out, 3, n=4))
    writer.close()
    schema = pq.read_schema(out / "00000.parquet")
    assert schema.field("n").type == pa.int64()
    assert schema.field("mixed").type == pa.string()  # "a" and 3: JSON text
    assert schema.field("empty").type == pa.string()  # a struct without fields cannot be stored
    assert schema.field("nothing").type == pa.string()
    assert schema.field("nested").type == pa.list_(pa.struct([("a", pa.int64())]))
    later = pq.read_table(out / "00001.parquet")
    assert later.schema == schema
    rows = later.to_pylist()
    assert rows[0]["n"] is None and rows[1]["n"] == 4  # "n/a" does not fit int64
    assert rows[0]["mixed"] == "true"
    assert "late" not in later.column_names
    assert "'n'" in caplog.text and "'late'" in caplog.text
    table = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["mixed"] for r in table] == ["a", "3"]


def test_a_resumed_run_keeps_the_schema_of_the_shards_in_out(out: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    from fetchpool.outputs.parquet import ParquetWriter

    first = ParquetWriter(out, shard_size=1)
    first.write(_ok(out, 0, score=1.5))
    first.close()
    second = ParquetWriter(out, shard_size=1)  # a new run: only ints seen now
    second.write(_ok(out, 1, score=2))
    second.close()
    one, two = (pq.read_schema(out / f"0000{i}.parquet") for i in (0, 1))
    assert one == two and str(two.field("score").type) == "double"
    assert pq.read_table(out / "00001.parquet").column("score").to_pylist() == [2.0]


# -- rows held with their shard --------------------------------------------------------------


def test_failures_are_returned_with_the_shard_and_listed_in_its_metadata(out: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    writer = WebDatasetWriter(out, shard_size=3, caption_column="caption")
    assert writer.write(_failed(1, caption="x")) == []
    assert writer.write(_ok(out, 0, caption="red")) == []
    skipped = Record(position=3, url="http://img.test/0.jpg", status=Status.SKIPPED)
    skipped.error_code = ErrorCode.DUPLICATE
    assert writer.write(skipped) == []
    assert writer.write(_ok(out, 2)) == []
    published = writer.close()
    assert [r.position for r in published] == [0, 1, 2, 3]
    assert [r.path for r in published] == [
        "00000.tar#000000000",
        None,
        "00000.tar#000000002",
        None,
    ]
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [(r["position"], r["status"], r["error_code"]) for r in rows] == [
        (0, "ok", None),
        (1, "failed", "not_an_image"),
        (2, "ok", None),
        (3, "skipped", "duplicate"),
    ]
    assert rows[0]["caption"] == "red" and rows[2]["caption"] == "" and rows[1]["caption"] is None
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 4 and stats["successes"] == 2 and stats["failed"] == 1
    assert stats["errors"] == {"duplicate": 1, "not_an_image": 1}
    assert stats["bytes"] == published[0].bytes + published[2].bytes


def test_a_shard_of_failures_is_sealed_at_shard_size_rows_without_an_empty_tar(
    out: Path,
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    writer = WebDatasetWriter(out, shard_size=3)
    assert writer.write(_failed(0)) == [] and writer.write(_failed(1)) == []
    assert [r.position for r in writer.write(_failed(2))] == [0, 1, 2]
    # An empty tar would stop datasets.load_dataset("webdataset"): only the metadata is left.
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "00000.parquet",
        "00000_stats.json",
    ]
    assert pq.read_table(out / "00000.parquet").column("position").to_pylist() == [0, 1, 2]
    assert writer.write(_ok(out, 3)) == []
    (record,) = writer.close()
    assert record.path == "00001.tar#000000003"  # numbering goes on past the metadata's


def test_a_resumed_run_numbers_its_shards_past_a_metadata_only_shard(out: Path) -> None:
    pytest.importorskip("pyarrow")
    first = WebDatasetWriter(out, shard_size=2)
    first.write(_failed(0))
    assert [r.position for r in first.write(_failed(1))] == [0, 1]
    assert first.close() == []
    second = WebDatasetWriter(out, shard_size=2)  # a new run into the same folder
    assert second._next_index == 1
    second.write(_failed(2))
    (record,) = [r for r in second.close() if r.position == 2]
    assert record.path is None
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json"]


def test_settle_removes_the_companions_of_a_shard_that_got_no_name(out: Path) -> None:
    journal = Journal.open(out)
    journal.stage("00000.tar", 10, [_failed(0)])
    journal.stage("00001.tar", 10, [_failed(1)])
    for name in ("00000_stats.json", "00000.parquet", "00001_stats.json", "00001.parquet"):
        (out / name).write_text("{}")
    (out / "00001.tar").write_bytes(b"x" * 10)  # 00001 got its name, 00000 did not
    journal._pending.clear()  # a kill: nothing flushed
    journal._conn.close()
    assert journal._lock_fd is not None
    os.close(journal._lock_fd)
    journal._lock_fd = None
    with Journal.open(out) as again:
        assert [(r.position, r.error_code) for r in again.iter_records()] == [
            (1, ErrorCode.NOT_AN_IMAGE)
        ]
    left = sorted(p.name for p in out.iterdir() if p.name != ".fetchpool")
    assert left == ["00001.parquet", "00001.tar", "00001_stats.json"]


def test_a_held_failure_put_after_its_shard_clears_the_staged_copy(out: Path) -> None:
    with Journal.open(out) as journal:
        record = _failed(4)
        journal.stage("00000.tar", 10, [record])
        journal.put(record)
        journal.flush()
        conn = sqlite3.connect(db_path(out))
        assert conn.execute("SELECT count(*) FROM staged").fetchone() == (0,)
        conn.close()
    assert [r.status for r in iter_journal(out)] == [Status.FAILED]


# -- numbered folders of the files output ----------------------------------------------------


def test_files_go_into_position_folders_with_captions(out: Path) -> None:
    writer = FilesWriter(out, caption_column="caption", folder_size=2)
    paths = []
    for position in (0, 1, 2, 5):
        (record,) = writer.write(_ok(out, position, caption=f"c{position}"))
        paths.append(record.path)
    assert [p.split("/")[0] for p in paths] == ["00000", "00000", "00001", "00002"]
    for path in paths:
        caption = (out / path).with_suffix(".txt").read_text()
        assert caption == f"c{int(Path(path).stem.split('-')[0])}"
    assert writer._dirty == {"00000", "00001", "00002"}
    writer.sync()
    assert writer._dirty == set()


def test_a_planted_symlink_folder_is_refused(out: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (out / "00000").symlink_to(tmp_path / "elsewhere")
    writer = FilesWriter(out, folder_size=10)
    (record,) = writer.write(_ok(out, 3))
    assert record.error_code is ErrorCode.IO_ERROR and "not a folder" in (
        record.error_message or ""
    )
    assert list((tmp_path / "elsewhere").iterdir()) == []


# -- the header-only check -------------------------------------------------------------------


def test_header_only_rejects_html_and_keeps_images_undecoded(tmp_path: Path) -> None:
    config = ImageConfig(identify=True)
    html = tmp_path / "page"
    html.write_bytes(b"<!doctype html><html><body>Not found</body></html>")
    result = process_image(str(html), str(tmp_path), config)
    assert not result.ok and result.error_code is ErrorCode.NOT_AN_IMAGE
    image = _jpeg(tmp_path / "img", 1, (256, 192))
    data = image.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[: len(data) // 2])  # the header is intact, the pixels are not
    kept = process_image(str(cut), str(tmp_path), config)
    assert kept.ok and kept.temp_path is None and (kept.width, kept.height) == (256, 192)
    assert kept.extension == ".jpg" and kept.image_format == "JPEG"
    verified = process_image(str(cut), str(tmp_path), ImageConfig(identify=True, verify=True))
    assert not verified.ok and verified.error_code is ErrorCode.NOT_AN_IMAGE
