"""WebDataset and Parquet writers: shards readable by their own ecosystems, durable, resumable."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from fetchpool.config import OutputConfig
from fetchpool.models import Record, Status
from fetchpool.outputs import make_writer
from fetchpool.outputs.parquet import ParquetWriter
from fetchpool.outputs.webdataset import WebDatasetWriter


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    (folder / ".fetchpool" / "tmp").mkdir(parents=True)
    return folder


def _record(out: Path, position: int, **meta: object) -> Record:
    """A processed record: a small JPEG in the run's temp folder, image facts filled."""
    buffer = io.BytesIO()
    Image.new("RGB", (8 + position, 6), (position * 10 % 256, 0, 0)).save(buffer, "JPEG")
    data = buffer.getvalue()
    temp = out / ".fetchpool" / "tmp" / f".fp-{position:016x}.part"
    temp.write_bytes(data)
    return Record(
        position=position,
        url=f"http://img.test/{position}.jpg",
        status=Status.OK,
        temp_path=str(temp),
        extension=".jpg",
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_type="image/jpeg",
        http_status=200,
        width=8 + position,
        height=6,
        orig_width=80,
        orig_height=60,
        meta=dict(meta),
    )


def _write_all(writer: WebDatasetWriter | ParquetWriter, records: list[Record]) -> list[list[int]]:
    """Returns, per write call, the positions that came back durable."""
    return [[r.position for r in writer.write(record)] for record in records]


# -- WebDataset ----------------------------------------------------------------------------


def test_webdataset_returns_records_only_when_a_shard_is_published(out: Path) -> None:
    writer = WebDatasetWriter(out, shard_size=2)
    records = [_record(out, i) for i in range(5)]
    returned = _write_all(writer, records)
    assert returned == [[], [0, 1], [], [2, 3], []]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert [r.position for r in writer.close()] == [4]
    assert writer.close() == []
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert records[3].path == "00001.tar#000000003"
    assert all(r.temp_path is None for r in records)
    assert list((out / ".fetchpool" / "tmp").iterdir()) == []  # sample temps discarded
    assert not list(out.glob(".fp-*"))  # no shard temp left


def test_webdataset_shards_read_back_with_tarfile(out: Path) -> None:
    writer = WebDatasetWriter(out, shard_size=10)
    record = _record(out, 7, caption="a red square", tags=["x", "y"])
    body = Path(record.temp_path or "").read_bytes()
    writer.write(record)
    writer.close()
    with tarfile.open(out / "00000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000000007.jpg", "000000007.json"]
        assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
        image = tar.extractfile(members[0])
        meta_file = tar.extractfile(members[1])
        assert image is not None and meta_file is not None
        assert image.read() == body
        meta = json.loads(meta_file.read())
    assert meta["url"] == "http://img.test/7.jpg" and meta["position"] == 7
    assert meta["caption"] == "a red square" and meta["tags"] == ["x", "y"]
    assert (meta["width"], meta["height"], meta["orig_width"]) == (15, 6, 80)
    assert meta["sha256"] == hashlib.sha256(body).hexdigest()
    assert meta["content_type"] == "image/jpeg" and meta["http_status"] == 200


# webdataset 1.0 leaves its shard files for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_webdataset_shards_read_back_with_webdataset(out: Path) -> None:
    wds = pytest.importorskip("webdataset")
    writer = WebDatasetWriter(out, shard_size=3)
    records = [_record(out, i, caption=f"c{i}") for i in range(7)]
    bodies = {r.position: Path(r.temp_path or "").read_bytes() for r in records}
    _write_all(writer, records)
    writer.close()
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    for sample in samples:
        position = int(sample["__key__"])
        assert sample["jpg"] == bodies[position]
        assert json.loads(sample["json"])["caption"] == f"c{position}"


def test_webdataset_resume_continues_numbering(out: Path) -> None:
    first = WebDatasetWriter(out, shard_size=2)
    _write_all(first, [_record(out, i) for i in range(3)])
    first.close()
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert sorted(before) == ["00000.tar", "00001.tar"]
    (out / ".fp-0123456789abcdef.tar.part").write_bytes(b"left by a crash")
    second = WebDatasetWriter(out, shard_size=2)
    assert not (out / ".fp-0123456789abcdef.tar.part").exists()  # stale temp removed
    durable = second.write(_record(out, 3)) + second.write(_record(out, 4))
    assert [r.path for r in durable] == ["00002.tar#000000003", "00002.tar#000000004"]
    second.close()
    assert {p.name: p.read_bytes() for p in out.glob("0000[01].tar")} == before


def test_webdataset_rejects_records_without_a_body(out: Path) -> None:
    writer = WebDatasetWriter(out)
    with pytest.raises(ValueError):
        writer.write(Record(position=0, url="http://img.test/0", status=Status.OK))
    assert writer.close() == []
    assert not list(out.glob("*.tar")) and not list(out.glob(".fp-*"))


def test_webdataset_keeps_odd_extensions_safe(out: Path) -> None:
    writer = WebDatasetWriter(out)
    record = _record(out, 1)
    record.extension = ".../../evil"
    writer.write(record)
    writer.close()
    with tarfile.open(out / "00000.tar") as tar:
        assert tar.getnames() == ["000000001.bin", "000000001.json"]


# -- Parquet -------------------------------------------------------------------------------


def test_parquet_reads_back_with_pyarrow(out: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    writer = ParquetWriter(out, shard_size=3)
    records = [_record(out, i, caption=f"c{i}", score=i / 2, url="dup") for i in range(4)]
    bodies = [Path(r.temp_path or "").read_bytes() for r in records]
    returned = _write_all(writer, records)
    assert returned == [[], [], [0, 1, 2], []]
    assert [r.position for r in writer.close()] == [3]
    assert records[3].path == "00001.parquet#000000003"
    assert list((out / ".fetchpool" / "tmp").iterdir()) == []
    table = pq.read_table(out / "00000.parquet")
    assert table.column_names == [
        "key",
        "position",
        "url",
        "image",
        "ext",
        "status",
        "error_code",
        "error_message",
        "final_url",
        "width",
        "height",
        "orig_width",
        "orig_height",
        "image_format",
        "bytes",
        "sha256",
        "content_type",
        "http_status",
        "fetched_sha256",
        "exif",
        "caption",
        "score",
        "meta_url",
    ]
    rows = table.to_pylist()
    assert [row["key"] for row in rows] == ["000000000", "000000001", "000000002"]
    assert rows[1]["image"] == {"bytes": bodies[1], "path": "000000001.jpg"}
    assert rows[1]["ext"] == "jpg" and rows[1]["status"] == "ok"
    assert rows[1]["url"] == "http://img.test/1.jpg" and rows[1]["meta_url"] == "dup"
    assert rows[2]["caption"] == "c2" and rows[2]["score"] == 1.0  # a float stays a float
    assert rows[0]["width"] == 8 and rows[0]["orig_height"] == 60
    assert pq.read_table(out / "00001.parquet").num_rows == 1


def test_parquet_resume_continues_numbering(out: Path) -> None:
    pytest.importorskip("pyarrow")
    first = ParquetWriter(out, shard_size=1)
    assert [r.path for r in first.write(_record(out, 0))] == ["00000.parquet#000000000"]
    first.close()
    second = ParquetWriter(out, shard_size=1)
    assert [r.path for r in second.write(_record(out, 1))] == ["00001.parquet#000000001"]
    assert second.close() == []


def test_make_writer_picks_the_format(out: Path) -> None:
    pytest.importorskip("pyarrow")
    assert isinstance(make_writer(out, OutputConfig(format="webdataset")), WebDatasetWriter)
    writer = make_writer(out, OutputConfig(format="parquet", shard_size=5))
    assert isinstance(writer, ParquetWriter) and writer.shard_size == 5
    files = make_writer(out, OutputConfig(format="files"))
    assert type(files).__name__ == "FilesWriter"


# -- a shard and its rows become durable together (RELIABILITY.md cases 39, 43) ---------------


class _Ledger:
    """Records what a sharded writer tells the journal, and what OUT held at that moment."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.calls: list[tuple[str, str, list[str | None], bool]] = []

    def stage(self, shard: str, size: int, records: object) -> None:
        paths = [r.path for r in records]  # type: ignore[attr-defined]
        self.calls.append(("stage", shard, paths, (self.out / shard).exists()))

    def unstage(self, shard: str) -> None:
        self.calls.append(("unstage", shard, [], (self.out / shard).exists()))


@pytest.mark.parametrize("cls", [WebDatasetWriter, ParquetWriter])
def test_shard_rows_are_staged_before_the_shard_gets_its_name(out: Path, cls: type) -> None:
    ledger = _Ledger(out)
    writer = cls(out, shard_size=2, ledger=ledger)
    seen_temps: list[list[str]] = []
    for i in range(2):
        writer.write(_record(out, i))
        seen_temps.append(sorted(p.name for p in out.iterdir() if p.name.startswith(".fp-")))
    suffix = cls.suffix
    assert ledger.calls == [
        ("stage", f"00000{suffix}", [f"00000{suffix}#000000000", f"00000{suffix}#000000001"], False)
    ]
    assert (out / f"00000{suffix}").is_file()
    assert seen_temps == [[], []], "shard temps live in .fetchpool/tmp, never in OUT"


def test_a_planted_shard_name_is_unstaged_and_the_next_name_used(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fetchpool import fsutil

    ledger = _Ledger(out)
    writer = WebDatasetWriter(out, shard_size=1, ledger=ledger)
    real_publish = fsutil.publish

    def plant_then_publish(temp: str, final: str, **kw: bool) -> bool:
        if final.endswith("00000.tar") and not Path(final).exists():
            Path(final).write_bytes(b"planted")  # appears between the check and the link
        return real_publish(temp, final, **kw)

    monkeypatch.setattr(fsutil, "publish", plant_then_publish)
    (record,) = writer.write(_record(out, 0))
    assert [c[:2] for c in ledger.calls] == [
        ("stage", "00000.tar"),
        ("unstage", "00000.tar"),
        ("stage", "00001.tar"),
    ]
    assert record.path == "00001.tar#000000000"
    assert (out / "00000.tar").read_bytes() == b"planted"


def test_shard_temps_left_in_out_by_older_runs_are_removed(out: Path) -> None:
    stale = out / ".fp-1a2b3c4d5e6f0.tar.part"  # the counter-style names of 0.1
    stale.write_bytes(b"half a shard")
    mine = out / "notes.tar.part"
    mine.write_bytes(b"not ours")
    WebDatasetWriter(out, shard_size=2)
    assert not stale.exists() and mine.exists()
