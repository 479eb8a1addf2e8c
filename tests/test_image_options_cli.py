"""Issue 13's image options end to end: ``fetchpool get`` in a subprocess, over loopback
against the embedded origin's ``/sized/`` images, outputs opened with Pillow, ``webdataset``
and pyarrow."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fetchpool.origin import Origin
from fetchpool.origin.images import sized_image_bytes

CLI = [sys.executable, "-m", "fetchpool"]


def get(urls: list[str], out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    source = out.parent / f"{out.name}-urls.txt"
    source.write_text("".join(u + "\n" for u in urls))
    command = [*CLI, "get", str(source), "-o", str(out), "--allow-private-networks"]
    command += ["--processes", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def manifest(out: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*CLI, "manifest", str(out)], capture_output=True, text=True, timeout=60, check=True
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def codes(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(row["error_code"] or "ok" for row in rows)


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()  # the whole file decodes
        return img.size


# -- resize modes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # 300x100, 100x300, 300x100 shown upright (EXIF orientation 6) as 100x300
        ("keep-ratio", [(192, 64), (64, 192), (64, 192)]),
        ("keep-ratio-largest", [(64, 21), (21, 64), (21, 64)]),
        ("center-crop", [(64, 64), (64, 64), (64, 64)]),
        ("border", [(64, 64), (64, 64), (64, 64)]),
        ("no", [(300, 100), (100, 300), (100, 300)]),
    ],
)
def test_resize_modes(
    origin: Origin, tmp_path: Path, mode: str, expected: list[tuple[int, int]]
) -> None:
    urls = [
        origin.url("/sized/300x100.jpg"),
        origin.url("/sized/100x300.png"),
        origin.url("/sized/300x100.jpg?orientation=6"),
    ]
    out = tmp_path / "out"
    result = get(urls, out, "--resize", "64", "--resize-mode", mode, "--verify")
    assert result.returncode == 0, result.stderr
    rows = manifest(out)
    assert codes(rows) == {"ok": 3}
    sizes = [image_size(out / row["path"]) for row in rows]
    assert sizes == expected == [(row["width"], row["height"]) for row in rows]


def test_border_is_white_end_to_end(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = get([origin.url("/sized/300x100.png")], out, "--resize", "60", "--resize-mode=border")
    assert result.returncode == 0, result.stderr
    (row,) = manifest(out)
    with Image.open(out / row["path"]) as img:
        assert img.format == "JPEG" and img.size == (60, 60)  # --encode: jpeg when resizing
        band = img.convert("RGB").getpixel((30, 2))
    assert isinstance(band, tuple) and min(band) >= 250


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("keep-ratio", (300, 100)), ("keep-ratio-largest", (128, 43)), ("border", (128, 128))],
)
def test_only_down_with_each_mode(
    origin: Origin, tmp_path: Path, mode: str, expected: tuple[int, int]
) -> None:
    out = tmp_path / "out"
    args = ("--resize", "128", "--resize-mode", mode, "--resize-only-down")
    result = get([origin.url("/sized/300x100.jpg")], out, *args)
    assert result.returncode == 0, result.stderr
    (row,) = manifest(out)
    assert image_size(out / row["path"]) == expected


# -- resampling filters --------------------------------------------------------------------


def _colours(path: Path) -> set[Any]:
    with Image.open(path) as img:
        return {colour for _, colour in img.convert("RGB").getcolors(maxcolors=1 << 20) or []}


def test_upsample_filter_reaches_the_workers(origin: Origin, tmp_path: Path) -> None:
    url = origin.url("/sized/20x10.png")
    args = ("--resize", "64", "--encode", "png")
    nearest, auto = tmp_path / "nearest", tmp_path / "auto"
    assert get([url], nearest, *args, "--upsample-filter", "nearest").returncode == 0
    assert get([url], auto, *args).returncode == 0
    (near_row,), (auto_row,) = manifest(nearest), manifest(auto)
    assert image_size(nearest / near_row["path"]) == image_size(auto / auto_row["path"])
    source = tmp_path / "source.png"
    source.write_bytes(sized_image_bytes(20, 10, "png"))  # what the origin served
    # nearest only repeats source pixels; lanczos (auto when enlarging) blends them
    assert _colours(nearest / near_row["path"]) <= _colours(source)
    assert not _colours(auto / auto_row["path"]) <= _colours(source)


def test_downsample_filter_gives_the_sizes(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    urls = [origin.url("/sized/600x400.jpg"), origin.url("/sized/40x30.jpg")]
    result = get(urls, out, "--resize", "100", "--downsample-filter", "area")
    assert result.returncode == 0, result.stderr
    assert [image_size(out / row["path"]) for row in manifest(out)] == [(100, 67), (100, 75)]


# -- filters -------------------------------------------------------------------------------

FILTER_URLS = ("/sized/300x100.jpg", "/sized/80x60.png", "/sized/120x100.jpg", "/html")


@pytest.mark.parametrize(
    ("args", "failed", "hint"),
    [
        (["--max-aspect-ratio", "2"], {"aspect_ratio_too_large": [0]}, "--max-aspect-ratio"),
        (["--min-area", "5000"], {"image_area_too_small": [1]}, "--min-area"),
        (["--max-area", "20000"], {"image_area_too_large": [0]}, "--max-area"),
        (
            ["--min-area", "5000", "--max-area", "20000", "--max-aspect-ratio", "1.3"],
            {"image_area_too_small": [1], "image_area_too_large": [0]},
            "--max-area",
        ),
    ],
)
def test_each_filter_alone(
    origin: Origin, tmp_path: Path, args: list[str], failed: dict[str, list[int]], hint: str
) -> None:
    out = tmp_path / "out"
    result = get([origin.url(path) for path in FILTER_URLS], out, *args)
    assert result.returncode == 1, result.stderr
    rows = manifest(out)
    for code, positions in failed.items():
        assert [row["position"] for row in rows if row["error_code"] == code] == positions
    # The CPU stage is on with the filter alone: the HTML page is not_an_image, not a file.
    assert rows[3]["error_code"] == "not_an_image"
    kept = [row for row in rows if row["status"] == "ok"]
    assert len(kept) == 4 - 1 - sum(len(p) for p in failed.values())
    for row in kept:  # untouched: the original bytes, at their size
        size = tuple(int(n) for n in row["url"].rsplit("/", 1)[1].split(".")[0].split("x"))
        assert image_size(out / row["path"]) == size
        assert row["sha256"] == row["fetched_sha256"]
    assert f"hint: {next(iter(failed))}" in result.stderr and hint in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-aspect-ratio", "0.5"], "--max-aspect-ratio must be >= 1"),
        (["--min-area", "10", "--max-area", "5"], "--min-area must not be above --max-area"),
        (["--min-area", "0"], "--min-area must be >= 1"),
        (["--resize-mode", "pad"], "'pad' is not one of"),
        (["--downsample-filter", "cubic"], "'cubic' is not one of"),
    ],
)
def test_bad_values_are_usage_errors(tmp_path: Path, args: list[str], words: str) -> None:
    out = tmp_path / "out"
    result = get(["http://127.0.0.1:9/a.jpg"], out, *args)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not out.exists()


# -- EXIF ----------------------------------------------------------------------------------

CAMERA_TAGS = {
    "Image Make": "fetchpool-origin",
    "Image Model": "sized 300x100",
    "EXIF DateTimeOriginal": "2024:05:06 07:08:09",
    "EXIF ExposureTime": "1/200",
    "GPS GPSLatitudeRef": "N",
    "GPS GPSLatitude": "[48, 51, 2979/100]",
}
EXIF_URLS = ("/sized/300x100.jpg?exif=1", "/sized/64x48.png")


# webdataset 1.0 leaves its shard files for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_save_exif_in_webdataset_json(origin: Origin, tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "out"
    urls = [origin.url(path) for path in EXIF_URLS]
    result = get(urls, out, "--save-exif", "--format", "webdataset")
    assert result.returncode == 0, result.stderr
    shards = [str(p) for p in sorted(out.glob("*.tar"))]
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    metas = {int(s["__key__"]): json.loads(s["json"]) for s in samples}
    assert set(metas) == {0, 1}
    assert isinstance(metas[0]["exif"], str)  # JSON text, as img2dataset writes it
    assert json.loads(metas[0]["exif"]).items() >= CAMERA_TAGS.items()
    assert metas[1]["exif"] == "{}"  # an image without EXIF: as img2dataset, never null
    with Image.open(_member(shards[0], "000000000.jpg")) as img:
        assert img.getexif()[0x010F] == "fetchpool-origin"  # kept bytes keep their EXIF


def _member(shard: str, name: str) -> Any:
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return io.BytesIO(member.read())


def test_save_exif_in_parquet_with_resize(origin: Origin, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    urls = [origin.url(path) for path in EXIF_URLS]
    result = get(urls, out, "--save-exif", "--format", "parquet", "--resize", "32")
    assert result.returncode == 0, result.stderr
    (shard,) = sorted(out.glob("*.parquet"))
    table = pq.read_table(shard)
    assert str(table.schema.field("exif").type) == "string"
    rows = {row["position"]: row for row in table.to_pylist()}
    assert json.loads(rows[0]["exif"]).items() >= CAMERA_TAGS.items()
    assert rows[1]["exif"] == "{}"
    assert (rows[0]["width"], rows[0]["height"]) == (32, 11)  # EXIF of the original survives


def test_save_exif_in_sidecar_and_manifest(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    urls = [origin.url(path) for path in EXIF_URLS]
    assert get(urls, out, "--save-exif", "--sidecar").returncode == 0
    rows = manifest(out)
    assert json.loads(rows[0]["exif"]).items() >= CAMERA_TAGS.items()
    sidecar = json.loads((out / rows[0]["path"]).with_suffix(".json").read_text())
    assert sidecar["exif"] == rows[0]["exif"]
    assert rows[1]["exif"] == "{}"
    # Without --save-exif nothing is extracted.
    plain = tmp_path / "plain"
    assert get(urls[:1], plain, "--verify").returncode == 0
    assert manifest(plain)[0]["exif"] is None


def test_save_exif_webdataset_loads_in_datasets(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sample without EXIF first, one with EXIF in a later shard: ``exif`` is a string in
    both (``{}``), so ``datasets`` infers one type (a null there broke the cast)."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    urls = [origin.url(path) for path in reversed(EXIF_URLS)]
    # Shards fill in completion order: one fetch thread (and get's one CPU-stage process)
    # make it the input's, so the shard without EXIF comes first.
    args = ("--save-exif", "--format", "webdataset", "--resize", "32", "--shard-size", "1")
    serial = ("--threads", "1")
    assert get(urls, out, *args, *serial).returncode == 0
    shards = [str(p) for p in sorted(out.glob("0*.tar"))]
    assert len(shards) == 2
    dataset = datasets.load_dataset(
        "webdataset", data_files=shards, split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    exifs = {row["json"]["url"]: json.loads(row["json"]["exif"]) for row in dataset}
    with_exif, without = (origin.url(path) for path in EXIF_URLS)
    assert exifs[without] == {} and exifs[with_exif].items() >= CAMERA_TAGS.items()
