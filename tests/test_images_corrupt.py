"""Broken, truncated and hostile files through process_image: an ``ok`` means it fully decoded.

Every file here is built in code (a few KB each, nothing committed). The last test runs a
sample of Pillow's own test images (``Tests/images`` from the Pillow sdist) when they are on
this machine, and is skipped otherwise.
"""

from __future__ import annotations

import io
import os
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fetchpool import ErrorCode, download
from fetchpool.config import ImageConfig
from fetchpool.process.images import ALLOWED_FORMATS, ImageResult, process_image
from reliability_helpers import LOOPBACK, content_server, records
from socketserver_faults import response

#: Each image option alone, plus a few combinations: with any of them the stage is on, and an
#: ``ok`` must mean "decoded to the end".
ALONE: dict[str, dict[str, Any]] = {
    "verify": {"verify": True},
    "resize-same-size": {"resize": 128},
    "resize-only-down": {"resize": 256, "resize_only_down": True},
    "resize-down": {"resize": 64},
    "center-crop": {"resize": 64, "resize_mode": "center-crop"},
    "encode-jpeg": {"encode": "jpeg"},
    "encode-webp": {"encode": "webp"},
    "min-size": {"min_size": 1},
    "max-pixels": {"max_pixels": 1_000_000},
    "max-frames": {"max_frames": 50},
    "verify+encode-jpeg": {"verify": True, "encode": "jpeg"},
}


def _noise(size: tuple[int, int] = (128, 128)) -> Image.Image:
    """Incompressible pixels: a file cut anywhere loses image data, not just trailing bytes."""
    bands = [Image.effect_noise(size, 40 + 20 * i) for i in range(3)]
    return Image.merge("RGB", bands)


def _encoded(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IHDR_64_RGB = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))


def _png_garbage_idat() -> bytes:
    """A valid PNG header, then an IDAT chunk (right length and CRC) of 5,000 random bytes."""
    garbage = random.Random(11).randbytes(5000)
    return PNG_SIGNATURE + IHDR_64_RGB + _png_chunk(b"IDAT", garbage) + _png_chunk(b"IEND", b"")


def _png_garbage_after_ihdr() -> bytes:
    return PNG_SIGNATURE + IHDR_64_RGB + random.Random(12).randbytes(5000)


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _animated_gif_with_a_cut_last_frame() -> bytes:
    frames = [_noise((48, 48)).convert("P") for _ in range(3)]
    data = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    return data[: len(data) - 400]  # inside the last frame's LZW data


def tiff_bytes(frames: list[list[tuple[int, int, int]]], pixels: bytes) -> bytes:
    """Little-endian TIFF: one IFD per frame (tag, type, value); every strip is ``pixels``."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    data_offset = len(out)
    out += pixels
    previous_link = 4  # where the offset of the next IFD goes
    for entries in frames:
        struct.pack_into("<I", out, previous_link, len(out))
        full = sorted([*entries, (273, 4, data_offset), (279, 4, len(pixels))])
        out += struct.pack("<H", len(full))
        for tag, kind, value in full:
            packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        previous_link = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


def _gray_tiff_tags(compression: int = 1, **extra: int) -> list[tuple[int, int, int]]:
    tags = {256: 4, 257: 4, 258: 8, 259: compression, 262: 1, 277: 1, 278: 4}
    tags.update({int(tag[1:]): value for tag, value in extra.items()})
    return [(tag, 3, value) for tag, value in tags.items()]


def _tiff_second_frame_without_width() -> bytes:
    second = [entry for entry in _gray_tiff_tags() if entry[0] != 256]
    return tiff_bytes([_gray_tiff_tags(), second], bytes(range(16)))


def tiff_deflate_garbage() -> bytes:
    """Deflate-compressed TIFF whose strip is not zlib data: libtiff fails (and prints)."""
    return tiff_bytes([_gray_tiff_tags(compression=8)], b"\x13" * 16)


def tiff_with_absurd_samples_per_pixel() -> bytes:
    """Pillow refuses it while opening, and logs that at error level first."""
    return tiff_bytes([_gray_tiff_tags(t277=65535)], bytes(16))


def _apng_with_a_sequence_error() -> bytes:
    frames = [Image.new("RGB", (16, 16), (i * 80, 0, 0)) for i in range(3)]
    data = _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=20)
    out, pos, fctl = bytearray(data[:8]), 8, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], bytearray(data[pos + 8 : pos + 8 + length])
        if kind == b"fcTL":
            fctl += 1
            if fctl == 3:
                struct.pack_into(">I", body, 0, 99)  # sequence number out of order
        out += _png_chunk(kind, bytes(body))
        pos += 12 + length
    return bytes(out)


#: name -> (bytes, the start of the message it must fail with)
CORRUPT: dict[str, tuple[Callable[[], bytes], str]] = {
    "png-garbage-idat": (_png_garbage_idat, "PNG decoder: "),
    "png-garbage-after-ihdr": (_png_garbage_after_ihdr, "broken PNG header: "),
    "png-cut": (lambda: _cut(_encoded(_noise(), "PNG")), "PNG decoder: image file is truncated"),
    "jpeg-cut": (lambda: _cut(_encoded(_noise(), "JPEG")), "JPEG decoder: image file is trunc"),
    "gif-cut": (lambda: _cut(_encoded(_noise().convert("P"), "GIF")), "GIF decoder: "),
    "webp-cut": (lambda: _cut(_encoded(_noise(), "WEBP")), "broken WEBP header: "),
    "bmp-cut": (lambda: _cut(_encoded(_noise(), "BMP")), "BMP decoder: image file is trunc"),
    "tiff-cut": (lambda: _cut(_encoded(_noise(), "TIFF")), "TIFF decoder: image file is trunc"),
    "tiff-frame-missing-dimensions": (
        _tiff_second_frame_without_width,
        "TIFF decoder: Missing dimensions",
    ),
    "tiff-deflate-garbage": (tiff_deflate_garbage, "TIFF decoder: decoder error"),
    "tiff-absurd-samples-per-pixel": (
        tiff_with_absurd_samples_per_pixel,
        "broken TIFF header: Invalid value for samples per pixel",
    ),
}


def _temp_like(tmp_path: Path, data: bytes) -> Path:
    """The source as the fetcher leaves it: an anonymous ``.fp-….part`` in the run's tmp."""
    folder = tmp_path / "out" / ".fetchpool" / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / ".fp-3f2a9c01d4e7.part"
    src.write_bytes(data)
    return src


def _run(src: Path, **config: Any) -> ImageResult:
    return process_image(str(src), str(src.parent), ImageConfig(**config))


def _decode_every_frame(path: Path | str, formats: list[str] | None = None) -> tuple[int, int]:
    """The check itself, with plain Pillow: raises unless every frame decodes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about odd EXIF or APNG chunks
        with Image.open(path, formats=formats) as img:
            size = img.size
            for index in range(getattr(img, "n_frames", 1)):
                img.seek(index)
                img.load()
    return size


# -- 1: corrupt images are never ok --------------------------------------------------------


@pytest.mark.parametrize("option", list(ALONE))
@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_image_is_not_an_image_with_every_option(
    tmp_path: Path, case: str, option: str
) -> None:
    make, prefix = CORRUPT[case]
    src = _temp_like(tmp_path, make())
    result = _run(src, **ALONE[option])
    assert not result.ok, result
    assert result.error_code is ErrorCode.NOT_AN_IMAGE, result
    assert result.temp_path is None and os.listdir(src.parent) == [src.name]
    message = result.error_message or ""
    assert message.startswith(prefix), message
    assert ".fp-" not in message and str(tmp_path) not in message, message


def test_garbage_idat_never_becomes_a_black_jpeg(tmp_path: Path) -> None:
    # Reading EXIF first (PNG's getexif decodes) must not hide the failed decode from `verify`.
    src = _temp_like(tmp_path, _png_garbage_idat())
    for config in ({"verify": True}, {"verify": True, "encode": "jpeg"}, {"encode": "jpeg"}):
        result = _run(src, **config)
        assert result.error_code is ErrorCode.NOT_AN_IMAGE, (config, result)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_already_at_target_size_is_still_decoded(tmp_path: Path, fmt: str) -> None:
    src = _temp_like(tmp_path, _cut(_encoded(_noise(), fmt)))
    result = _run(src, resize=128)
    assert result.error_code is ErrorCode.NOT_AN_IMAGE, result
    assert "truncated" in (result.error_message or "")


@pytest.mark.parametrize("option", ["resize-same-size", "min-size", "max-pixels", "verify"])
def test_a_good_image_kept_as_is_still_passes(tmp_path: Path, option: str) -> None:
    data = _encoded(_noise(), "PNG")
    src = _temp_like(tmp_path, data)
    result = _run(src, **ALONE[option])
    assert result.ok and result.temp_path is None, result
    assert (result.width, result.height) == (128, 128) and result.bytes == len(data)


ANIMATIONS: dict[str, tuple[Callable[[], bytes], Callable[[], bytes], str]] = {
    # name -> (whole file, the same with a later frame broken, the failure's message)
    "gif-last-frame-cut": (
        lambda: _animation("GIF"),
        _animated_gif_with_a_cut_last_frame,
        "GIF decoder: image file is truncated",
    ),
    "apng-sequence-error": (
        lambda: _animation("PNG"),
        _apng_with_a_sequence_error,
        "PNG decoder: APNG contains frame sequence errors",
    ),
}


def _animation(fmt: str) -> bytes:
    frames = [_noise((48, 48)).convert("P" if fmt == "GIF" else "RGB") for _ in range(3)]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50)


@pytest.mark.parametrize("option", ["verify", "min-size", "max-frames", "resize-only-down"])
@pytest.mark.parametrize("case", list(ANIMATIONS))
def test_every_frame_of_a_kept_animation_is_decoded(tmp_path: Path, case: str, option: str) -> None:
    whole, broken, message = ANIMATIONS[case]
    assert _run(_temp_like(tmp_path, whole()), **ALONE[option]).ok
    result = _run(_temp_like(tmp_path, broken()), **ALONE[option])
    assert result.error_code is ErrorCode.NOT_AN_IMAGE, result
    assert (result.error_message or "").startswith(message), result.error_message


@pytest.mark.parametrize("case", list(ANIMATIONS))
def test_a_resized_animation_claims_only_its_first_frame(tmp_path: Path, case: str) -> None:
    # Resizing or re-encoding outputs the first frame alone: that frame decoded, so it is ok
    # even though a later frame of the source is broken (as img2dataset would take it).
    src = _temp_like(tmp_path, ANIMATIONS[case][1]())
    result = _run(src, resize=24)
    assert result.ok and result.temp_path is not None, result
    with Image.open(result.temp_path) as out:
        assert getattr(out, "n_frames", 1) == 1 and out.size == (24, 24)
        out.load()


def _jpeg_with_app1(payload: bytes) -> bytes:
    data = _encoded(Image.new("RGB", (40, 20), (10, 200, 30)), "JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


BAD_EXIF: dict[str, Callable[[], bytes]] = {
    "jpeg-exif-garbage": lambda: _jpeg_with_app1(b"Exif\x00\x00" + random.Random(3).randbytes(90)),
    "jpeg-exif-bad-ifd-offset": lambda: _jpeg_with_app1(
        b"Exif\x00\x00II*\x00" + struct.pack("<I", 0xFFFFFF00) + bytes(32)
    ),
    "png-exif-garbage": lambda: _encoded(
        Image.new("RGB", (40, 20), (10, 200, 30)), "PNG", exif=b"MM\x00*\xff\xff\xff\xff" * 4
    ),
}


@pytest.mark.parametrize("case", list(BAD_EXIF))
@pytest.mark.parametrize("option", ["verify", "resize-down", "encode-jpeg", "min-size"])
def test_a_broken_exif_block_is_ignored_not_fatal(tmp_path: Path, case: str, option: str) -> None:
    src = _temp_like(tmp_path, BAD_EXIF[case]())
    result = _run(src, **ALONE[option])
    assert result.ok, result
    size = _decode_every_frame(result.temp_path or src)
    assert size == (result.width, result.height)


def test_png_exif_after_the_pixel_data_is_still_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encoded(img, "PNG")
    end = data.rindex(b"IEND") - 4  # eXIf placed between the last IDAT and IEND
    src = _temp_like(tmp_path, data[:end] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + data[end:])
    with Image.open(src) as probe:
        assert "exif" not in probe.info  # only found once the pixel data has been read
    result = _run(src, min_size=1)
    assert result.ok and result.temp_path is not None, result
    assert (result.width, result.height) == (20, 40)
    with Image.open(result.temp_path) as out:
        top = out.convert("RGB").getpixel((10, 5))
    assert isinstance(top, tuple) and top[2] > 200 and top[0] < 60


def test_tiff_orientation_is_applied_once(tmp_path: Path) -> None:
    img = Image.new("L", (40, 20), 255)
    img.paste(0, (0, 0, 20, 20))  # left half black
    src = _temp_like(tmp_path, _encoded(img, "TIFF", exif=_orientation_exif(6)))
    result = _run(src, min_size=1)
    assert result.ok and result.temp_path is not None, result  # re-encoded upright
    assert (result.width, result.height) == (result.orig_width, result.orig_height) == (20, 40)
    with Image.open(result.temp_path) as out:
        assert out.size == (20, 40)
        assert out.convert("L").getpixel((10, 5)) < 60  # black went to the top


def _orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# -- 4: messages describe the content, never the temp file -----------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"<!doctype html><html><body>Not found</body></html>",
            "cannot identify image file (html?)",
        ),
        (b"", "cannot identify image file (the file is empty)"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", "(PostScript/EPS)"),
        (b"%PDF-1.7\n1 0 obj\n", "(PDF)"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "(SVG?)"),
        (b'{"error": "not found"}', "(JSON?)"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "AVIF, HEIF or video"),
        (b"\x1f\x8b\x08\x00" + bytes(20), "(gzip data)"),
        (b"\xde\xad\xbe\xef\x01\x02\x03\x04\x05", "(starts with de ad be ef 01 02 03 04)"),
        (PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR", "broken PNG header: "),
        (b"GIF89a\x01", "broken GIF header: "),
    ],
)
def test_not_an_image_messages_say_what_the_content_is(
    tmp_path: Path, data: bytes, expected: str
) -> None:
    result = _run(_temp_like(tmp_path, data), verify=True)
    assert result.error_code is ErrorCode.NOT_AN_IMAGE, result
    message = result.error_message or ""
    assert expected in message, message
    assert ".fp-" not in message and ".part" not in message and str(tmp_path) not in message


# -- 2: every option takes effect on its own -------------------------------------------------


@pytest.mark.parametrize(
    ("option", "active"),
    [
        ({}, False),
        ({"resize": 64}, True),
        ({"resize": 64, "resize_mode": "no"}, False),
        ({"encode": "png"}, True),
        ({"min_size": 10}, True),
        ({"verify": True}, True),
        ({"max_pixels": 1000}, True),
        ({"max_pixels": 10**12}, False),  # capped at Pillow's default: nothing asked
        ({"max_frames": 1}, True),
        ({"quality": 50, "resize_only_down": True}, False),  # modifiers of other options
    ],
)
def test_which_options_turn_the_stage_on(option: dict[str, Any], active: bool) -> None:
    assert ImageConfig(**option).active is active


def test_each_option_alone_does_its_work(tmp_path: Path) -> None:
    photo = _temp_like(tmp_path, _encoded(_noise((300, 200)), "PNG"))
    big = _run(photo, max_pixels=50_000)
    assert big.error_code is ErrorCode.IMAGE_TOO_LARGE
    assert big.error_message == "60,000 pixels exceed the limit of 50,000 pixels"
    assert _run(photo, min_size=201).error_code is ErrorCode.IMAGE_TOO_SMALL
    webp = _run(photo, encode="webp")
    assert webp.ok and webp.image_format == "WEBP" and webp.temp_path is not None
    assert _decode_every_frame(webp.temp_path) == (300, 200)
    resized = _run(photo, resize=30)
    assert resized.ok and (resized.width, resized.height) == (30, 20)
    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(4)]
    gif = _temp_like(tmp_path, _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    assert _run(gif, max_frames=3).error_code is ErrorCode.IMAGE_TOO_LARGE


def test_max_pixels_alone_rejects_large_images_in_a_download(tmp_path: Path) -> None:
    small = _encoded(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG")
    large = _encoded(Image.new("RGB", (200, 200), (1, 2, 3)), "PNG")
    routes = {
        "/small.png": response(200, small, {"Content-Type": "image/png"}),
        "/large.png": response(200, large, {"Content-Type": "image/png"}),
        "/cut.png": response(
            200, _cut(_encoded(_noise((64, 64)), "PNG")), {"Content-Type": "image/png"}
        ),
    }
    with content_server(routes) as server:
        report = download(
            [server.url(path) for path in routes],
            tmp_path / "out",
            max_pixels=10_000,
            processes=1,
            **LOOPBACK,
        )
    ok, too_large, cut = records(report)
    assert ok.ok and ok.bytes == len(small), ok
    assert too_large.error_code is ErrorCode.IMAGE_TOO_LARGE, too_large
    assert cut.error_code is ErrorCode.NOT_AN_IMAGE, cut  # small enough, so it was decoded


# -- Pillow's own test images ----------------------------------------------------------------


def _pillow_corpus() -> Path | None:
    """``Tests/images`` of a Pillow source tree: $FETCHPOOL_PILLOW_IMAGES, or an sdist unpacked
    under /tmp/pillow-sdist (``pip download --no-binary :all: --no-deps pillow==X``)."""
    given = os.environ.get("FETCHPOOL_PILLOW_IMAGES")
    candidates = (
        [Path(given)] if given else sorted(Path("/tmp/pillow-sdist").glob("*/Tests/images"))
    )
    return next((path for path in candidates if path.is_dir()), None)


CORPUS_CONFIGS: list[dict[str, Any]] = [
    {"verify": True},
    {"min_size": 1},  # kept as is: must still have decoded every frame
    {"resize": 64, "resize_mode": "center-crop"},
    {"encode": "jpeg"},
    {"max_pixels": 2_000_000},
]


@pytest.mark.slow
def test_pillow_test_images_are_ok_only_when_they_decode(tmp_path: Path) -> None:
    corpus = _pillow_corpus()
    if corpus is None:
        pytest.skip("Pillow's Tests/images not found (set FETCHPOOL_PILLOW_IMAGES)")
    files = sorted(path for path in corpus.rglob("*") if path.is_file())
    sample = random.Random(11).sample(files, min(150, len(files)))
    out = tmp_path / "out"
    out.mkdir()
    allowed = {ErrorCode.NOT_AN_IMAGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.IMAGE_TOO_SMALL}
    outcomes: dict[str, int] = {}
    for path in sample:
        for config in CORPUS_CONFIGS:
            result = process_image(str(path), str(out), ImageConfig(**config))
            where = (path.name, config, result.error_code, result.error_message)
            key = result.error_code.value if result.error_code else "ok"
            outcomes[key] = outcomes.get(key, 0) + 1
            if not result.ok:
                assert result.error_code in allowed, where
                assert str(path) not in (result.error_message or ""), where
                continue
            if result.temp_path is None:  # kept: the original must decode to its end
                _decode_every_frame(path, list(ALLOWED_FORMATS))
            else:
                size = _decode_every_frame(result.temp_path)
                assert size == (result.width, result.height), where
                Path(result.temp_path).unlink()
    assert outcomes.get("ok", 0) > 100 and outcomes.get("not_an_image", 0) > 50, outcomes
