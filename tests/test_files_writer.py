"""The files writer: publish, no-clobber, planted symlinks, adopt identical, sidecars."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from fetchpool import fsutil
from fetchpool.errors import DiskFullError
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.outputs import files as files_module
from fetchpool.outputs.files import FilesWriter
from fetchpool.outputs.naming import file_name
from fetchpool.state import tmp_dir

URL = "http://alice:s3cret@a.example/photos/cat.jpg"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    tmp_dir(folder).mkdir(parents=True)
    return folder


def fetched(out: Path, body: bytes = b"JPEGDATA", url: str = URL) -> Record:
    handle, temp = fsutil.create_temp(tmp_dir(out))
    handle.write(body)
    fsutil.finish_temp(handle)
    return Record(
        position=3,
        url=url,
        status=Status.OK,
        bytes=len(body),
        temp_path=temp,
        extension=".jpg",
        final_url=url,
        redirects=[url],
        meta={"caption": "a cat"},
    )


def leftovers(out: Path) -> list[str]:
    return os.listdir(tmp_dir(out))


def test_publishes_under_the_computed_name(out: Path) -> None:
    record = fetched(out)
    temp = record.temp_path
    assert FilesWriter(out).write(record) == [record]
    name = file_name(URL, ".jpg")
    assert record.path == name
    assert record.ok
    assert record.temp_path is None
    assert temp is not None and not os.path.exists(temp)
    assert (out / name).read_bytes() == b"JPEGDATA"
    assert leftovers(out) == []
    assert not (out / f"{name.rsplit('.', 1)[0]}.json").exists()
    assert FilesWriter(out).close() == []


def test_records_without_a_body_pass_through(out: Path) -> None:
    record = Record(position=1, url=URL).fail(ErrorCode.HTTP_ERROR, "404")
    assert FilesWriter(out).write(record) == [record]
    assert record.path is None
    assert list(out.iterdir()) == [out / ".fetchpool"]


def test_identical_existing_file_is_adopted(out: Path) -> None:
    first = fetched(out)
    FilesWriter(out).write(first)
    again = fetched(out)  # a re-run whose journal row was lost
    FilesWriter(out).write(again)
    assert again.ok
    assert again.path == first.path
    assert sorted(p.name for p in out.iterdir()) == sorted([".fetchpool", str(first.path)])
    assert leftovers(out) == []


def test_different_existing_file_is_never_clobbered(out: Path) -> None:
    name = file_name(URL, ".jpg")
    (out / name).write_bytes(b"someone else's file")
    record = fetched(out)
    FilesWriter(out).write(record)
    assert record.ok
    assert record.path == name.replace(".jpg", "-2.jpg")
    assert (out / name).read_bytes() == b"someone else's file"
    assert (out / str(record.path)).read_bytes() == b"JPEGDATA"
    # Same size, different bytes: still not adopted.
    (out / name.replace(".jpg", "-3.jpg")).write_bytes(b"JPEGDATX")
    other = fetched(out, b"JPEGDAT2")
    FilesWriter(out).write(other)
    assert other.path == name.replace(".jpg", "-4.jpg")
    # A re-run of the first item adopts its -2 file instead of making a -5.
    rerun = fetched(out)
    FilesWriter(out).write(rerun)
    assert rerun.path == record.path


def test_planted_symlink_is_not_followed_or_replaced(out: Path, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"JPEGDATA")  # same bytes: adoption must not follow the link either
    name = file_name(URL, ".jpg")
    (out / name).symlink_to(target)
    record = fetched(out)
    FilesWriter(out).write(record)
    assert record.ok
    assert record.path == name.replace(".jpg", "-2.jpg")
    assert (out / name).is_symlink()
    assert os.readlink(out / name) == str(target)
    assert target.read_bytes() == b"JPEGDATA"


def test_dangling_symlink_and_folder_are_left_alone(out: Path, tmp_path: Path) -> None:
    name = file_name(URL, ".jpg")
    (out / name).symlink_to(tmp_path / "does-not-exist")
    (out / name.replace(".jpg", "-2.jpg")).mkdir()
    record = fetched(out)
    FilesWriter(out).write(record)
    assert record.path == name.replace(".jpg", "-3.jpg")
    assert not (tmp_path / "does-not-exist").exists()


def test_names_exhausted_fails_the_item(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "MAX_VARIANTS", 2)
    name = file_name(URL, ".jpg")
    (out / name).write_bytes(b"x")
    (out / name.replace(".jpg", "-2.jpg")).write_bytes(b"y")
    record = fetched(out)
    FilesWriter(out).write(record)
    assert record.status is Status.FAILED
    assert record.error_code is ErrorCode.IO_ERROR
    assert "s3cret" not in str(record.error_message)
    assert record.path is None
    assert leftovers(out) == []


def test_disk_full_stops_the_run(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", full)
    record = fetched(out)
    with pytest.raises(DiskFullError):
        FilesWriter(out).write(record)
    assert leftovers(out) == []  # the temp file is freed


def test_other_os_errors_fail_only_the_item(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "link", denied)
    record = fetched(out)
    assert FilesWriter(out).write(record) == [record]
    assert record.error_code is ErrorCode.IO_ERROR
    assert "Permission denied" in str(record.error_message)
    assert leftovers(out) == []


def test_sidecar(out: Path) -> None:
    record = fetched(out)
    record.width, record.height = 4, 3
    FilesWriter(out, sidecar=True).write(record)
    key = str(record.path).rsplit(".", 1)[0]
    data = json.loads((out / f"{key}.json").read_text())
    assert data["position"] == 3
    assert data["path"] == record.path
    assert data["meta"] == {"caption": "a cat"}
    assert data["width"] == 4
    assert data["url"] == "http://alice:***@a.example/photos/cat.jpg"
    assert data["redirects"] == ["http://alice:***@a.example/photos/cat.jpg"]
    assert "temp_path" not in data
    assert "s3cret" not in (out / f"{key}.json").read_text()
    assert leftovers(out) == []
    # Adopting on a re-run keeps the existing sidecar and leaves no temp behind.
    again = fetched(out)
    FilesWriter(out, sidecar=True).write(again)
    assert again.path == record.path
    assert leftovers(out) == []
    assert len(list(out.glob("*.json"))) == 1


def test_writer_creates_missing_tmp_for_sidecars(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tmp_dir(out).mkdir(parents=True)
    record = fetched(out)
    tmp_dir(out).rename(tmp_path / "moved")  # temp file moved with it
    record.temp_path = str(tmp_path / "moved" / Path(str(record.temp_path)).name)
    FilesWriter(out, sidecar=True).write(record)
    assert record.ok
    assert tmp_dir(out).is_dir()


def test_sidecar_has_exactly_the_manifest_columns(out: Path) -> None:
    from fetchpool.state import schema

    record = fetched(out)
    record.attempts, record.temp_synced = 2, False
    FilesWriter(out, sidecar=True).write(record)
    key = str(record.path).rsplit(".", 1)[0]
    data = json.loads((out / f"{key}.json").read_text())
    assert list(data) == list(schema.NAMES)  # temp_synced, temp_path... are not columns
    assert data["attempts"] == 2 and data["status"] == "ok"
    assert data["final_url"] == "http://alice:***@a.example/photos/cat.jpg"
    assert record.url == URL  # the record itself is not redacted: it is the item's identity


def _manifest_rows(out: Path) -> list[dict[str, object]]:
    import io

    from fetchpool.state.manifest import export_manifest

    text = io.StringIO()
    export_manifest(out, text)
    return [json.loads(line) for line in text.getvalue().splitlines()]


def _sidecar_of(out: Path, row: dict[str, object]) -> dict[str, object]:
    key = str(row["path"]).rsplit(".", 1)[0]
    return json.loads((out / f"{key}.json").read_text())  # type: ignore[no-any-return]


def test_sidecar_equals_its_manifest_row_after_the_image_stage(tmp_path: Path) -> None:
    from fetchpool import download
    from fetchpool.origin import Origin

    out = tmp_path / "images"
    with Origin() as origin:
        report = download(
            [origin.image_url(n) for n in range(3)],
            out,
            sidecar=True,
            verify=True,
            processes=1,
            allow_private_networks=True,
        )
    assert report.ok == 3
    for row in _manifest_rows(out):
        assert row["attempts"] == 1
        assert _sidecar_of(out, row) == row


def test_sidecar_equals_its_manifest_row_when_the_fetch_thread_publishes(
    tmp_path: Path,
) -> None:
    from fetchpool import download
    from fetchpool.origin import Origin

    out = tmp_path / "files"
    with Origin() as origin:
        download([origin.image_url(1)], out, sidecar=True, allow_private_networks=True)
    (row,) = _manifest_rows(out)
    assert row["attempts"] == 1
    assert _sidecar_of(out, row) == row
