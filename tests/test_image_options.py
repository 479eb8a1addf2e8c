"""Issue 13's image options, in-process: img2dataset's resize modes, resampling filters,
area / aspect-ratio filters and ``save_exif`` (the CLI end to end is test_image_options_cli)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import ExifTags, Image, JpegImagePlugin
from PIL.TiffImagePlugin import IFDRational

from fetchpool.config import ImageConfig
from fetchpool.errors import ConfigError
from fetchpool.models import ErrorCode
from fetchpool.process.images import (
    MAX_EXIF_JSON,
    MAX_EXIF_SOURCE,
    MAX_EXIF_VALUE,
)
from image_helpers import opened as _opened
from image_helpers import run_image as _run

ORIENTATION = 0x0112


def _gradient(size: tuple[int, int]) -> Image.Image:
    red = Image.linear_gradient("L").resize(size)
    green = Image.linear_gradient("L").rotate(90).resize(size)
    return Image.merge("RGB", (red, green, Image.new("L", size, 96)))


def _png(path: Path, img: Image.Image, **params: Any) -> Path:
    img.save(path, "PNG", **params)
    return path


def _colours(img: Image.Image) -> set[Any]:
    return {colour for _, colour in img.getcolors(maxcolors=1 << 20) or []}


# -- sizes per mode (odd sizes, 1xN strips) ------------------------------------------------

# (source size, --resize, mode, expected output): worked out by hand from img2dataset's
# resizer (albumentations SmallestMaxSize / LongestMaxSize: round(side * size / matched side)).
SIZES = [
    ((333, 111), 100, "keep-ratio", (300, 100)),
    ((333, 111), 100, "keep-ratio-largest", (100, 33)),
    ((333, 111), 100, "center-crop", (100, 100)),
    ((333, 111), 100, "border", (100, 100)),
    ((101, 99), 50, "keep-ratio", (51, 50)),
    ((101, 99), 50, "keep-ratio-largest", (50, 49)),
    ((99, 101), 50, "keep-ratio", (50, 51)),
    ((1, 300), 64, "keep-ratio", (64, 19200)),  # a 1-pixel strip: the short side becomes 64
    ((1, 300), 64, "keep-ratio-largest", (1, 64)),  # never a 0-pixel side
    ((300, 1), 64, "keep-ratio-largest", (64, 1)),
    ((1, 300), 64, "center-crop", (64, 64)),
    ((300, 1), 64, "border", (64, 64)),
    ((7, 5), 3, "center-crop", (3, 3)),
    ((640, 480), 480, "center-crop", (480, 480)),  # shorter side already 480: a plain crop
    ((480, 640), 480, "border", (480, 480)),
    ((640, 480), 480, "keep-ratio", None),  # already the size: untouched (bytes kept)
    ((640, 480), 640, "keep-ratio-largest", None),
    ((640, 480), 64, "no", None),
]


@pytest.mark.parametrize(("size", "target", "mode", "expected"), SIZES)
def test_sizes_per_mode(
    tmp_path: Path,
    size: tuple[int, int],
    target: int,
    mode: str,
    expected: tuple[int, int] | None,
) -> None:
    src = _png(tmp_path / "src.png", _gradient(size))
    result = _run(src, tmp_path, resize=target, resize_mode=mode, verify=True)
    assert (result.orig_width, result.orig_height) == size
    if expected is None:
        assert result.ok and result.temp_path is None
        assert (result.width, result.height) == size
        return
    assert _opened(result).size == expected == (result.width, result.height)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep-ratio", (50, 150)),
        ("keep-ratio-largest", (17, 50)),
        ("center-crop", (50, 50)),
        ("border", (50, 50)),
    ],
)
def test_sizes_follow_the_upright_image(
    tmp_path: Path, mode: str, expected: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 300x100, shown 100x300
    src = tmp_path / "rot.jpg"
    _gradient((300, 100)).save(src, "JPEG", exif=exif.tobytes())
    result = _run(src, tmp_path, resize=50, resize_mode=mode)
    assert (result.orig_width, result.orig_height) == (100, 300)
    assert _opened(result).size == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep-ratio", None),  # the shorter side (100) is not above 200: left alone
        ("center-crop", None),
        ("keep-ratio-largest", (200, 67)),  # the longer side (300) is
        ("border", (200, 200)),
    ],
)
def test_only_down_tests_the_side_each_mode_matches(
    tmp_path: Path, mode: str, expected: tuple[int, int] | None
) -> None:
    src = _png(tmp_path / "src.png", _gradient((300, 100)))
    result = _run(src, tmp_path, resize=200, resize_mode=mode, resize_only_down=True)
    if expected is None:
        assert (
            result.ok
            and result.temp_path is None
            and (result.width, result.height)
            == (
                300,
                100,
            )
        )
    else:
        assert _opened(result).size == expected


def test_an_output_above_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    # 1x2000 with keep-ratio 256 would be 256x512,000 pixels: refused from the header, so a
    # body that is garbage after the header is never even decoded.
    src = _png(tmp_path / "strip.png", Image.new("L", (1, 2000), 7))
    src.write_bytes(src.read_bytes()[:60])  # the header and a sliver of the pixel data
    result = _run(src, tmp_path, resize=256, resize_mode="keep-ratio", max_pixels=1_000_000)
    assert result.error_code is ErrorCode.IMAGE_TOO_LARGE
    assert "256x512000" in (result.error_message or "")
    assert "keep-ratio 256" in (result.error_message or "")


def test_border_pads_white_and_keeps_transparency(tmp_path: Path) -> None:
    src = _png(tmp_path / "a.png", Image.new("RGBA", (40, 20), (200, 10, 10, 255)))
    png = _opened(_run(src, tmp_path, resize=20, resize_mode="border"))
    assert png.mode == "RGBA" and png.size == (20, 20)
    assert png.getpixel((10, 1)) == (255, 255, 255, 0)  # band: transparent white
    assert png.getpixel((10, 10)) == (200, 10, 10, 255)
    jpeg = _opened(_run(src, tmp_path, resize=20, resize_mode="border", encode="jpeg"))
    band = jpeg.getpixel((10, 1))
    assert isinstance(band, tuple) and min(band) >= 250  # white, as img2dataset's


def test_border_of_a_grey_image_is_white(tmp_path: Path) -> None:
    src = _png(tmp_path / "g.png", Image.new("L", (10, 30), 40))
    out = _opened(_run(src, tmp_path, resize=30, resize_mode="border"))
    assert out.mode == "L" and out.getpixel((0, 15)) == 255 and out.getpixel((15, 15)) == 40


# -- resampling filters --------------------------------------------------------------------


def _checker(size: int, cell: int) -> Image.Image:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    for y in range(0, size, cell):
        for x in range((y // cell) % 2 * cell, size, 2 * cell):
            img.paste((255, 255, 255), (x, y, x + cell, y + cell))
    return img


def test_nearest_never_blends_and_area_averages(tmp_path: Path) -> None:
    src = _png(tmp_path / "c.png", _checker(96, 2))
    nearest = _opened(_run(src, tmp_path, resize=32, downsample_filter="nearest"))
    assert _colours(nearest) <= {(0, 0, 0), (255, 255, 255)}
    area = _opened(_run(src, tmp_path, resize=32, downsample_filter="area"))
    assert _colours(area).isdisjoint({(0, 0, 0), (255, 255, 255)})  # 3x3 boxes: greys
    box = _opened(_run(src, tmp_path, resize=32, downsample_filter="box"))
    assert area.tobytes() == box.tobytes()  # area is img2dataset's name for Pillow's box


def test_upsample_filter_applies_when_enlarging(tmp_path: Path) -> None:
    src = _png(tmp_path / "c.png", _checker(8, 1))
    nearest = _opened(_run(src, tmp_path, resize=64, upsample_filter="nearest"))
    assert nearest.size == (64, 64) and _colours(nearest) == {(0, 0, 0), (255, 255, 255)}
    auto = _opened(_run(src, tmp_path, resize=64))  # auto: lanczos when enlarging
    lanczos = _opened(_run(src, tmp_path, resize=64, upsample_filter="lanczos"))
    assert auto.tobytes() == lanczos.tobytes() and len(_colours(auto)) > 2
    # the downsample filter plays no part in an enlargement
    other = _opened(_run(src, tmp_path, resize=64, downsample_filter="nearest"))
    assert other.tobytes() == auto.tobytes()


def test_a_named_downsample_filter_decodes_jpeg_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "big.jpg"
    _gradient((1600, 1200)).save(src, "JPEG", quality=90)
    drafted: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Any, mode: Any, size: Any) -> Any:
        drafted.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    exact = _opened(_run(src, tmp_path, resize=100, downsample_filter="lanczos"))
    assert drafted == []
    fast = _opened(_run(src, tmp_path, resize=100))
    assert drafted == [(100, 75)]  # auto: the reduced decode
    assert exact.size == fast.size == (100, 75)
    with Image.open(src) as full:
        reference = full.convert("RGB").resize((100, 75), Image.Resampling.LANCZOS)
    assert _mean_difference(exact, reference) < 1.5  # only JPEG re-encoding apart
    assert _mean_difference(fast, reference) < 3.0


def _mean_difference(a: Image.Image, b: Image.Image) -> float:
    pairs = zip(a.tobytes(), b.tobytes(), strict=True)
    return sum(abs(x - y) for x, y in pairs) / len(a.tobytes())


# -- filters: area and aspect ratio --------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "options", "code"),
    [
        ((300, 100), {"max_aspect_ratio": 3}, None),  # exactly 3: kept
        ((300, 100), {"max_aspect_ratio": 2.9}, ErrorCode.ASPECT_RATIO_TOO_LARGE),
        ((100, 300), {"max_aspect_ratio": 2.9}, ErrorCode.ASPECT_RATIO_TOO_LARGE),
        ((1, 50), {"max_aspect_ratio": 49.5}, ErrorCode.ASPECT_RATIO_TOO_LARGE),
        ((50, 50), {"max_aspect_ratio": 1}, None),
        ((100, 50), {"min_area": 5000}, None),
        ((100, 50), {"min_area": 5001}, ErrorCode.IMAGE_AREA_TOO_SMALL),
        ((100, 50), {"max_area": 5000}, None),
        ((100, 50), {"max_area": 4999}, ErrorCode.IMAGE_AREA_TOO_LARGE),
        ((100, 50), {"min_area": 10, "max_area": 20}, ErrorCode.IMAGE_AREA_TOO_LARGE),
    ],
)
def test_area_and_aspect_filters(
    tmp_path: Path, size: tuple[int, int], options: dict[str, Any], code: ErrorCode | None
) -> None:
    src = _png(tmp_path / "src.png", _gradient(size))
    result = _run(src, tmp_path, **options)
    assert result.error_code is code, result
    if code is None:
        assert result.ok and (result.width, result.height) == size
    else:
        assert result.temp_path is None and f"{size[0]}x{size[1]}" in (result.error_message or "")


def test_filter_messages_use_the_cli_words(tmp_path: Path) -> None:
    src = _png(tmp_path / "src.png", _gradient((300, 100)))
    aspect = _run(src, tmp_path, max_aspect_ratio=2.5).error_message or ""
    assert aspect == "300x100 has an aspect ratio of 3, above --max-aspect-ratio 2.5"
    small = _run(src, tmp_path, min_area=40_000).error_message or ""
    assert small == "300x100 has 30,000 pixels, below --min-area 40,000"
    large = _run(src, tmp_path, max_area=20_000).error_message or ""
    assert large == "300x100 has 30,000 pixels, above --max-area 20,000"


def test_filters_are_decided_from_the_header(tmp_path: Path) -> None:
    """A file whose pixel data is broken still gets the filter's code, not not_an_image."""
    src = _png(tmp_path / "src.png", _gradient((300, 100)))
    data = src.read_bytes()
    src.write_bytes(data[:60])  # the header and a sliver of the pixel data
    assert _run(src, tmp_path, verify=True).error_code is ErrorCode.NOT_AN_IMAGE
    result = _run(src, tmp_path, max_aspect_ratio=2)
    assert result.error_code is ErrorCode.ASPECT_RATIO_TOO_LARGE
    assert _run(src, tmp_path, max_area=100).error_code is ErrorCode.IMAGE_AREA_TOO_LARGE


def test_filters_see_the_upright_image(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = 8
    src = tmp_path / "rot.jpg"
    _gradient((300, 100)).save(src, "JPEG", exif=exif.tobytes())
    result = _run(src, tmp_path, max_aspect_ratio=2)
    assert result.error_code is ErrorCode.ASPECT_RATIO_TOO_LARGE
    kept = _run(src, tmp_path, max_aspect_ratio=3, max_area=30_000)
    assert kept.ok and (kept.width, kept.height) == (100, 300)


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_aspect_ratio": 0.5}, "--max-aspect-ratio"),
        ({"min_area": 0}, "--min-area"),
        ({"max_area": 0}, "--max-area"),
        ({"min_area": 10, "max_area": 5}, "--min-area must not be above --max-area"),
        ({"downsample_filter": "cubic"}, "--downsample-filter"),
        ({"upsample_filter": "lanczos4"}, "--upsample-filter"),
        ({"resize_mode": "pad"}, "border"),  # renamed: the message lists the modes
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        ImageConfig(**options)


@pytest.mark.parametrize(
    ("options", "active"),
    [
        ({"max_aspect_ratio": 2}, True),
        ({"min_area": 1}, True),
        ({"max_area": 10**6}, True),
        ({"save_exif": True}, True),
        ({"downsample_filter": "lanczos", "upsample_filter": "nearest"}, False),
        ({"resize_mode": "border"}, False),
        ({}, False),
    ],
)
def test_each_filter_turns_the_stage_on(options: dict[str, Any], active: bool) -> None:
    assert ImageConfig(**options).active is active


# -- EXIF ----------------------------------------------------------------------------------


def _camera_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "Acme"
    exif[ExifTags.Base.Model] = "Acme One\0"
    if orientation != 1:
        exif[ORIENTATION] = orientation
    details = exif.get_ifd(ExifTags.IFD.Exif)
    details[ExifTags.Base.ExposureTime] = IFDRational(1, 250)
    details[ExifTags.Base.DateTimeOriginal] = "2023:01:02 03:04:05"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitude] = (IFDRational(48), IFDRational(51), IFDRational(2979, 100))
    return exif


EXPECTED_TAGS = {
    "Image Make": "Acme",
    "Image Model": "Acme One",
    "EXIF ExposureTime": "1/250",
    "EXIF DateTimeOriginal": "2023:01:02 03:04:05",
    "GPS GPSLatitude": "[48, 51, 2979/100]",
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("options", [{}, {"resize": 20, "encode": "jpeg"}])
def test_exif_tags_as_img2dataset_names_them(
    tmp_path: Path, fmt: str, options: dict[str, Any]
) -> None:
    src = tmp_path / "cam.img"
    _gradient((40, 30)).save(src, fmt, exif=_camera_exif(orientation=6).tobytes())
    result = _run(src, tmp_path, save_exif=True, **options)
    assert result.ok and result.exif is not None
    tags = json.loads(result.exif)
    assert tags.items() >= EXPECTED_TAGS.items()
    assert tags["Image Orientation"] == "6"
    assert all(isinstance(value, str) for value in tags.values())
    assert not any("ExifOffset" in key or "GPSInfo" in key for key in tags)  # pointers


def test_exif_is_only_saved_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "cam.jpg"
    _gradient((40, 30)).save(src, "JPEG", exif=_camera_exif().tobytes())
    assert _run(src, tmp_path, verify=True).exif is None
    plain = tmp_path / "plain.jpg"
    _gradient((40, 30)).save(plain, "JPEG")
    result = _run(plain, tmp_path, save_exif=True)
    assert result.ok and result.exif == "{}"  # asked for, none there: as img2dataset's


def _jpeg_with_app1(path: Path, payload: bytes) -> Path:
    _gradient((40, 30)).save(path, "JPEG")
    data = path.read_bytes()
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(data[:2] + segment + data[2:])
    return path


@pytest.mark.parametrize(
    "payload",
    [
        b"Exif\0\0II*\0\xff\xff\xff\x7f" + b"\x01" * 40,  # IFD offset far beyond the block
        b"Exif\0\0MM\0*\0\0\0\x08\xff\xff" + b"\0" * 30,  # 65535 entries announced, none there
        b"Exif\0\0garbage",
    ],
)
def test_broken_exif_is_no_exif_and_the_image_is_ok(tmp_path: Path, payload: bytes) -> None:
    src = _jpeg_with_app1(tmp_path / "broken.jpg", payload)
    result = _run(src, tmp_path, save_exif=True, resize=20)
    assert result.ok and result.exif == "{}"
    assert _opened(result).size == (20, 15)


def test_a_broken_gps_block_loses_only_its_tags(tmp_path: Path) -> None:
    exif = _camera_exif()
    data = bytearray(exif.tobytes())
    # Point the GPS IFD offset (the value of tag 0x8825 in IFD0) past the end of the block.
    entry = data.index(b"\x88\x25\x00\x04\x00\x00\x00\x01")  # tag, LONG, count 1 (MM)
    data[entry + 8 : entry + 12] = (0x7FFF0000).to_bytes(4, "big")
    src = tmp_path / "gps.jpg"
    _gradient((40, 30)).save(src, "JPEG", exif=bytes(data))
    result = _run(src, tmp_path, save_exif=True)
    assert result.ok and result.exif is not None
    tags = json.loads(result.exif)
    assert tags["Image Make"] == "Acme" and tags["EXIF ExposureTime"] == "1/250"
    assert not any(key.startswith("GPS ") for key in tags)


def _png_with_exif(path: Path, exif: bytes) -> Path:
    """A PNG whose eXIf chunk is written by hand (no size limit, as a hostile file's)."""
    _gradient((40, 30)).save(path, "PNG")
    data = path.read_bytes()
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    path.write_bytes(data[:33] + chunk + data[33:])
    return path


def test_huge_exif_block_is_not_parsed(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = "x" * (MAX_EXIF_SOURCE + 10)
    src = _png_with_exif(tmp_path / "huge.png", exif.tobytes())
    result = _run(src, tmp_path, save_exif=True)
    assert result.ok and result.exif == "{}" and (result.width, result.height) == (40, 30)


def test_exif_values_and_the_whole_object_are_capped(tmp_path: Path) -> None:
    exif = Image.Exif()
    for n in range(40):  # 40 long private tags: about 40 KB of text
        exif[0xC000 + n] = f"{n:02d}" + "v" * 5000
    src = _png_with_exif(tmp_path / "many.png", exif.tobytes())
    result = _run(src, tmp_path, save_exif=True)
    assert result.ok and result.exif is not None
    assert len(result.exif) <= MAX_EXIF_JSON
    tags = json.loads(result.exif)
    assert 10 <= len(tags) < 40  # the tags that fit under the cap, the rest left out
    for key, value in tags.items():
        n = int(key.removeprefix("Image Tag 0x"), 16) - 0xC000
        assert value == f"{n:02d}" + "v" * (MAX_EXIF_VALUE - 2)  # each value cut
