"""process_image, called in-process: resize modes, orientation, modes, hostile inputs."""

from __future__ import annotations

import hashlib
import pickle
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, JpegImagePlugin

from fetchpool.config import ImageConfig
from fetchpool.models import ErrorCode
from fetchpool.process.images import ImageResult, process_image
from image_helpers import opened as _opened
from image_helpers import run_image as _run


def _photo(size: tuple[int, int]) -> Image.Image:
    """A smooth RGB image with structure (gradients), so resizes are checkable."""
    w, h = size
    red = Image.linear_gradient("L").resize(size)
    green = Image.linear_gradient("L").rotate(90).resize(size)
    blue = Image.new("L", size, 96)
    img = Image.merge("RGB", (red, green, blue))
    assert img.size == (w, h)
    return img


def _save(path: Path, img: Image.Image, fmt: str, **params: Any) -> Path:
    img.save(path, format=fmt, **params)
    return path


@pytest.fixture
def jpeg(tmp_path: Path) -> Path:
    return _save(tmp_path / "src.jpg", _photo((800, 600)), "JPEG", quality=92)


# -- resize modes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "mode", "expected"),
    [
        ((800, 600), "keep-ratio", (341, 256)),  # shorter side to 256 (img2dataset)
        ((600, 800), "keep-ratio", (256, 341)),
        ((800, 600), "keep-ratio-largest", (256, 192)),  # longer side to 256
        ((600, 800), "keep-ratio-largest", (192, 256)),
        ((800, 600), "center-crop", (256, 256)),
        ((600, 800), "center-crop", (256, 256)),
        ((800, 600), "border", (256, 256)),
        ((100, 50), "keep-ratio", (512, 256)),  # upscaling allowed by default
        ((100, 50), "keep-ratio-largest", (256, 128)),
    ],
)
def test_resize_modes_give_exact_sizes(
    tmp_path: Path, size: tuple[int, int], mode: str, expected: tuple[int, int]
) -> None:
    src = _save(tmp_path / "src.png", _photo(size), "PNG")
    result = _run(src, tmp_path, resize=256, resize_mode=mode)
    img = _opened(result)
    assert img.size == expected == (result.width, result.height)
    assert (result.orig_width, result.orig_height) == size
    assert result.extension == ".png" and result.image_format == "PNG"


def test_border_fills_with_white_and_centres(tmp_path: Path) -> None:
    src = _save(tmp_path / "src.png", Image.new("RGB", (400, 200), (20, 30, 40)), "PNG")
    img = _opened(_run(src, tmp_path, resize=100, resize_mode="border"))
    assert img.size == (100, 100)
    assert img.getpixel((50, 5)) == (255, 255, 255)  # band above, white as img2dataset
    assert img.getpixel((50, 94)) == (255, 255, 255)  # band below
    assert img.getpixel((50, 50)) == (20, 30, 40)  # the image itself (rows 25..74)
    assert img.getpixel((50, 25)) == (20, 30, 40) and img.getpixel((50, 24)) == (255, 255, 255)


def test_center_crop_keeps_the_middle(tmp_path: Path) -> None:
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle third
    src = _save(tmp_path / "src.png", img, "PNG")
    out = _opened(_run(src, tmp_path, resize=50, resize_mode="center-crop"))
    assert out.size == (50, 50)
    assert out.getpixel((25, 25)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["keep-ratio", "keep-ratio-largest", "center-crop", "border"])
def test_only_down_leaves_small_images_alone(tmp_path: Path, mode: str) -> None:
    src = _save(tmp_path / "src.png", _photo((120, 80)), "PNG")
    result = _run(src, tmp_path, resize=256, resize_mode=mode, resize_only_down=True)
    assert result.ok and result.temp_path is None  # original bytes kept
    assert (result.width, result.height) == (120, 80)
    assert result.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()


def test_only_down_still_shrinks_large_images(tmp_path: Path) -> None:
    src = _save(tmp_path / "src.png", _photo((600, 300)), "PNG")
    result = _run(src, tmp_path, resize=256, resize_only_down=True)
    assert _opened(result).size == (256, 128)


def test_mode_no_keeps_the_original_bytes(jpeg: Path, tmp_path: Path) -> None:
    result = _run(jpeg, tmp_path, resize=64, resize_mode="no", verify=True)
    assert result.ok and result.temp_path is None
    assert (result.width, result.height) == (800, 600)
    assert result.bytes == jpeg.stat().st_size
    assert result.extension == ".jpg"


# -- JPEG fast path ------------------------------------------------------------------------


def test_jpeg_downscale_uses_draft_and_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _save(tmp_path / "big.jpg", _photo((2000, 1500)), "JPEG", quality=90)
    calls: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Any, mode: Any, size: Any) -> Any:
        answer = original(self, mode, size)
        calls.append(self.size)  # the size the decoder will produce
        return answer

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    result = _run(src, tmp_path, resize=200)
    assert calls == [(250, 188)]  # DCT scale 1/8, still >= the 200x150 target
    img = _opened(result)
    assert img.size == (200, 150) and img.format == "JPEG"
    # plausible: the gradients survive (dark top-left, bright right edge in red)
    with Image.open(src) as full:
        expected = full.convert("RGB").resize((200, 150))
    for point in [(10, 10), (100, 75), (190, 140), (190, 10)]:
        got, want = img.getpixel(point), expected.getpixel(point)
        assert isinstance(got, tuple) and isinstance(want, tuple)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 16, point


# -- orientation and modes -----------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    src = _save(tmp_path / "rot.jpg", img, "JPEG", exif=exif.tobytes(), quality=95)
    result = _run(src, tmp_path, encode="keep", verify=True)
    out = _opened(result)
    assert out.size == (20, 40) == (result.width, result.height)
    assert (result.orig_width, result.orig_height) == (20, 40)
    top = out.getpixel((10, 5))
    assert isinstance(top, tuple) and top[2] > 200 and top[0] < 60  # blue went to the top
    assert out.getexif().get(0x0112) is None


def test_exif_orientation_with_resize_uses_upright_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    src = _save(tmp_path / "rot.jpg", _photo((800, 400)), "JPEG", exif=exif.tobytes())
    result = _run(src, tmp_path, resize=100)
    assert _opened(result).size == (50, 100)


def _cmyk_jpeg(path: Path) -> Path:
    return _save(path, Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")


def _palette_png(path: Path) -> Path:
    img = Image.new("P", (64, 48), 1)
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    return _save(path, img, "PNG", transparency=0)


def _rgba_png(path: Path) -> Path:
    return _save(path, Image.new("RGBA", (64, 48), (10, 20, 30, 0)), "PNG")


def _la_png(path: Path) -> Path:
    return _save(path, Image.new("LA", (64, 48), (128, 255)), "PNG")


def _i16_png(path: Path) -> Path:
    return _save(path, Image.new("I;16", (64, 48), 32768), "PNG")


def _bilevel_gif(path: Path) -> Path:
    return _save(path, Image.new("1", (64, 48), 1), "GIF")


@pytest.mark.parametrize(
    ("make", "pixel"),
    [
        (_cmyk_jpeg, None),
        (_palette_png, (200, 30, 30)),
        (_rgba_png, (255, 255, 255)),  # fully transparent → white
        (_la_png, (128, 128, 128)),
        (_i16_png, (128, 128, 128)),  # 16-bit scaled down, not clipped to white
        (_bilevel_gif, (255, 255, 255)),
    ],
)
def test_exotic_modes_become_valid_rgb_jpeg(
    tmp_path: Path, make: Any, pixel: tuple[int, int, int] | None
) -> None:
    src = make(tmp_path / "src.img")
    out = _opened(_run(src, tmp_path, encode="jpeg", resize=32))
    assert out.format == "JPEG" and out.mode == "RGB"
    assert out.size[0] == 32
    if pixel is not None:
        got = out.getpixel((out.width // 2, out.height // 2))
        assert isinstance(got, tuple)
        assert max(abs(a - b) for a, b in zip(got, pixel, strict=True)) <= 6, got


@pytest.mark.parametrize(
    ("encode", "fmt", "ext"), [("webp", "WEBP", ".webp"), ("png", "PNG", ".png")]
)
def test_encode_targets(jpeg: Path, tmp_path: Path, encode: str, fmt: str, ext: str) -> None:
    result = _run(jpeg, tmp_path, encode=encode, quality=80)
    out = _opened(result)
    assert out.format == fmt and result.extension == ext and out.size == (800, 600)
    assert result.temp_path is not None
    data = Path(result.temp_path).read_bytes()
    assert result.bytes == len(data) and result.sha256 == hashlib.sha256(data).hexdigest()


def test_keep_reencodes_bmp_as_jpeg_when_resized(tmp_path: Path) -> None:
    src = _save(tmp_path / "src.bmp", _photo((90, 60)), "BMP")
    result = _run(src, tmp_path, resize=30)
    assert _opened(result).format == "JPEG" and result.extension == ".jpg"


# -- hostile inputs ------------------------------------------------------------------------


def test_html_is_not_an_image(tmp_path: Path) -> None:
    src = tmp_path / "page.jpg"
    src.write_bytes(b"<!doctype html><html><body>Not found</body></html>")
    result = _run(src, tmp_path, resize=64)
    assert not result.ok and result.error_code is ErrorCode.NOT_AN_IMAGE
    assert result.temp_path is None


def test_eps_disguised_as_png_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "evil.png"
    src.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    result = _run(src, tmp_path, verify=True)
    assert result.error_code is ErrorCode.NOT_AN_IMAGE


def test_truncated_jpeg_is_rejected(jpeg: Path, tmp_path: Path) -> None:
    src = tmp_path / "cut.jpg"
    data = jpeg.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    assert _run(src, tmp_path, resize=64).error_code is ErrorCode.NOT_AN_IMAGE
    assert _run(src, tmp_path, verify=True).error_code is ErrorCode.NOT_AN_IMAGE


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def test_bomb_header_is_rejected_before_decoding(tmp_path: Path) -> None:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 10^10 RGB pixels
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + _png_chunk(b"IEND", b"")
    )
    src = tmp_path / "bomb.png"
    src.write_bytes(png)
    assert src.stat().st_size < 200
    began = time.monotonic()
    result = _run(src, tmp_path, resize=64)
    assert time.monotonic() - began < 1.0
    assert result.error_code is ErrorCode.IMAGE_TOO_LARGE


def test_lowered_pixel_limit_applies(jpeg: Path, tmp_path: Path) -> None:
    result = _run(jpeg, tmp_path, resize=64, max_pixels=100_000)  # 800x600 = 480,000
    assert result.error_code is ErrorCode.IMAGE_TOO_LARGE
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 100_000
    _run(jpeg, tmp_path, resize=64)  # the next call restores the default limit
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_frame_cap(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(5)]
    src = tmp_path / "anim.gif"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=10)
    assert _run(src, tmp_path, resize=4, max_frames=3).error_code is ErrorCode.IMAGE_TOO_LARGE
    assert _run(src, tmp_path, resize=4, max_frames=5).ok


def test_min_size(jpeg: Path, tmp_path: Path) -> None:
    result = _run(jpeg, tmp_path, min_size=601)
    assert result.error_code is ErrorCode.IMAGE_TOO_SMALL
    assert _run(jpeg, tmp_path, min_size=600).ok


def test_missing_output_folder_is_a_value_not_an_exception(jpeg: Path, tmp_path: Path) -> None:
    result = process_image(str(jpeg), str(tmp_path / "nope"), ImageConfig(resize=32))
    assert not result.ok and result.error_code is ErrorCode.IO_ERROR


def test_function_and_result_pickle(jpeg: Path, tmp_path: Path) -> None:
    result = _run(jpeg, tmp_path, resize=16)
    assert pickle.loads(pickle.dumps(result)) == result
    assert pickle.loads(pickle.dumps(process_image)) is process_image
    failure = ImageResult.failure(ErrorCode.NOT_AN_IMAGE, "x")
    assert pickle.loads(pickle.dumps(failure)) == failure
