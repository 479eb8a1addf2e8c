"""Deterministic, photo-like test images for the embedded origin.

Every image is a pure function of ``(n, seed, ext, small)``: two processes (the origin in a child
process and the test that checks a sha256) produce the same bytes.

How 1,000 distinct images stay cheap
------------------------------------
Drawing and encoding a photo-like picture costs tens of milliseconds, so only a small pool of
:data:`POOL_SIZE` *base* pictures per seed is ever drawn (lazily, one per ``n % POOL_SIZE``) and
encoded once per format. Image ``n`` is then its base's encoded bytes with a small metadata block
naming ``n`` spliced in, which changes the bytes (and the sha256) but not a single pixel:

* JPEG: a COM (comment, ``FF FE``) segment inserted right after the JFIF APP0 segment; decoders
  skip comments, and APP0 must stay first for JFIF readers.
* PNG: a ``tEXt`` chunk inserted right after ``IHDR`` (its CRC is computed, so it is valid).
* WebP: the base is encoded with a fixed-length XMP placeholder (extended ``VP8X`` format) that
  is overwritten in place with the same number of bytes, so no RIFF size field changes.

Splicing is a copy of ~100 KB: microseconds, so 1,000 distinct images take well under a
second once the pool is drawn. Images ``n`` and ``n + POOL_SIZE`` therefore share pixels; tests
that need distinct *pixels* should stay below :data:`POOL_SIZE` images.

The pictures are smooth gradients with soft shapes plus mild uniform noise, which gives
realistic JPEG sizes: 50-200 KB for the default (``small=False``) JPEGs at quality 88.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from typing import Final

from PIL import ExifTags, Image, ImageDraw, ImageFilter
from PIL.TiffImagePlugin import IFDRational

__all__ = [
    "CONTENT_TYPES",
    "EXTENSIONS",
    "POOL_SIZE",
    "content_type",
    "image_bytes",
    "jpeg_bytes",
    "payload_bytes",
    "payload_chunk",
    "sized_image_bytes",
]

#: Number of distinct base pictures drawn per seed.
POOL_SIZE: Final = 16
#: Formats the origin serves, by URL extension.
EXTENSIONS: Final = ("jpg", "png", "webp")
CONTENT_TYPES: Final = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_ALIASES: Final = {"jpeg": "jpg"}

# Landscape and portrait sizes; 1024x768 at quality 88 lands near 175 KB, 640x480 near 70 KB.
_SIZES: Final = (
    (640, 480),
    (800, 600),
    (1024, 768),
    (768, 1024),
    (600, 800),
    (960, 640),
    (720, 540),
    (880, 660),
)
_SMALL_DIVISOR: Final = 10  # small images are the base scaled down ten times (64x48 .. 102x76)
_JPEG_QUALITY: Final = 88
_WEBP_QUALITY: Final = 80
_NOISE: Final = 0.07  # blend weight of uniform noise: what makes JPEG sizes photo-like
_TAG_DIGITS: Final = 20  # fixed width of n in the WebP placeholder
_WEBP_PLACEHOLDER: Final = b"fetchpool-origin n=" + b"X" * _TAG_DIGITS
_PAYLOAD_BLOCK: Final = 64 * 1024
#: Bounds of :func:`sized_image_bytes` (drawing is cheap, but the origin must stay small).
MAX_SIZED_SIDE: Final = 20_000
MAX_SIZED_PIXELS: Final = 4_000_000


def normalize_ext(ext: str) -> str:
    """Return the canonical extension (``jpeg`` -> ``jpg``); raise ValueError if unsupported."""
    ext = _ALIASES.get(ext.lower(), ext.lower())
    if ext not in EXTENSIONS:
        raise ValueError(f"unsupported image extension {ext!r} (use jpg, png or webp)")
    return ext


def content_type(ext: str) -> str:
    """The Content-Type the origin sends for an image extension."""
    return CONTENT_TYPES[normalize_ext(ext)]


@functools.lru_cache(maxsize=512)
def image_bytes(n: int, seed: int = 0, ext: str = "jpg", *, small: bool = False) -> bytes:
    """The bytes of image ``n``: valid, deterministic, and distinct for every ``(n, seed)``.

    ``ext`` is ``jpg`` (default), ``png`` or ``webp``; ``small`` gives a tiny (about 64x48 to
    102x76) version of the same picture. The cache is bounded (512 entries, ~60 MB at most);
    a miss costs a copy of the cached base encoding, plus one base drawing per new
    ``n % POOL_SIZE``.
    """
    if n < 0:
        raise ValueError("image index must be >= 0")
    ext = normalize_ext(ext)
    base = _encoded_base(n % POOL_SIZE, seed, ext, small)
    tag = f"fetchpool-origin n={n} seed={seed}".encode("ascii")
    if ext == "jpg":
        return _jpeg_with_comment(base, tag)
    if ext == "png":
        return _png_with_text(base, tag)
    return _webp_with_tag(base, n)


def jpeg_bytes(n: int, seed: int = 0) -> bytes:
    """The default JPEG of image ``n``: ``image_bytes(n, seed)`` (name the benchmarks probe)."""
    return image_bytes(n, seed)


def payload_bytes(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic pseudo-random bytes: what ``/bytes/{size}`` serves."""
    if size < 0:
        raise ValueError("size must be >= 0")
    block = payload_chunk(seed)
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


@functools.lru_cache(maxsize=8)
def payload_chunk(seed: int = 0) -> bytes:
    """The 64 KiB block that :func:`payload_bytes` repeats (the server streams it)."""
    return random.Random(f"payload-{seed}").randbytes(_PAYLOAD_BLOCK)


@functools.lru_cache(maxsize=64)
def sized_image_bytes(
    width: int, height: int, ext: str = "jpg", *, exif: bool = False, orientation: int = 1
) -> bytes:
    """A ``width`` x ``height`` gradient image (what ``/sized/{W}x{H}.{ext}`` serves).

    ``exif`` adds a camera-like EXIF block (Make, Model, DateTimeOriginal, ExposureTime, GPS);
    ``orientation`` (2..8) adds the EXIF orientation tag, so the upright size is swapped for
    5..8. Raises ValueError outside ``MAX_SIZED_SIDE`` / ``MAX_SIZED_PIXELS``.
    """
    ext = normalize_ext(ext)
    if not (1 <= width <= MAX_SIZED_SIDE and 1 <= height <= MAX_SIZED_SIDE):
        raise ValueError(f"sides must be 1..{MAX_SIZED_SIDE}")
    if width * height > MAX_SIZED_PIXELS:
        raise ValueError(f"at most {MAX_SIZED_PIXELS:,} pixels")
    if not 1 <= orientation <= 8:
        raise ValueError("orientation must be 1..8")
    picture = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize((width, height)),
            Image.linear_gradient("L").rotate(90).resize((width, height)),
            Image.new("L", (width, height), 96),
        ),
    )
    params: dict[str, object] = {}
    if exif or orientation != 1:
        params["exif"] = _sized_exif(width, height, exif, orientation).tobytes()
    out = io.BytesIO()
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    picture.save(out, fmt, **params)
    return out.getvalue()


def _sized_exif(width: int, height: int, camera: bool, orientation: int) -> Image.Exif:
    block = Image.Exif()
    if orientation != 1:
        block[ExifTags.Base.Orientation] = orientation
    if camera:
        block[ExifTags.Base.Make] = "fetchpool-origin"
        block[ExifTags.Base.Model] = f"sized {width}x{height}"
        details = block.get_ifd(ExifTags.IFD.Exif)
        details[ExifTags.Base.DateTimeOriginal] = "2024:05:06 07:08:09"
        details[ExifTags.Base.ExposureTime] = IFDRational(1, 200)
        gps = block.get_ifd(ExifTags.IFD.GPSInfo)
        gps[ExifTags.GPS.GPSLatitudeRef] = "N"
        gps[ExifTags.GPS.GPSLatitude] = (IFDRational(48), IFDRational(51), IFDRational(2979, 100))
    return block


# --- variants -----------------------------------------------------------------------------


def _jpeg_with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """Insert a COM segment after SOI (and after APP0 when present, as JFIF requires)."""
    at = 2
    if jpeg[2:4] == b"\xff\xe0":
        (length,) = struct.unpack(">H", jpeg[4:6])
        at = 4 + length
    segment = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return b"".join((jpeg[:at], segment, jpeg[at:]))


def _png_with_text(png: bytes, text: bytes) -> bytes:
    """Insert a ``tEXt`` chunk right after IHDR (signature 8 bytes + IHDR chunk 25 bytes)."""
    data = b"Comment\x00" + text
    chunk = (
        struct.pack(">I", len(data))
        + b"tEXt"
        + data
        + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    )
    return b"".join((png[:33], chunk, png[33:]))


def _webp_with_tag(webp: bytes, n: int) -> bytes:
    """Overwrite the fixed-length XMP placeholder in place: no RIFF size changes."""
    at = webp.index(_WEBP_PLACEHOLDER) + len(_WEBP_PLACEHOLDER) - _TAG_DIGITS
    digits = str(n).zfill(_TAG_DIGITS).encode("ascii")
    if len(digits) != _TAG_DIGITS:
        raise ValueError("image index too large for a WebP variant")
    return b"".join((webp[:at], digits, webp[at + _TAG_DIGITS :]))


# --- base pictures ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4 * POOL_SIZE)
def _encoded_base(k: int, seed: int, ext: str, small: bool) -> bytes:
    picture = _base_picture(k, seed)
    if small:
        w, h = picture.size
        picture = picture.resize((w // _SMALL_DIVISOR, h // _SMALL_DIVISOR), Image.Resampling.BOX)
    out = io.BytesIO()
    if ext == "jpg":
        picture.save(out, "JPEG", quality=_JPEG_QUALITY)
    elif ext == "png":
        # Level 1: photo-like noise barely compresses anyway, and level 6 is 5x slower.
        picture.save(out, "PNG", compress_level=1)
    else:
        picture.save(out, "WEBP", quality=_WEBP_QUALITY, xmp=_WEBP_PLACEHOLDER)
    return out.getvalue()


# Only a few decoded pictures are kept: once a base is encoded in the formats asked for, its
# pixels are rarely needed again, and each one is 1-2 MB.
@functools.lru_cache(maxsize=4)
def _base_picture(k: int, seed: int) -> Image.Image:
    """Draw base picture ``k`` for ``seed``: gradient background, soft shapes, mild noise."""
    # A str seed hashes the same in every process (no PYTHONHASHSEED dependence for str in
    # random.Random: it uses sha512 of the text).
    rng = random.Random(f"origin-{seed}-{k}")
    size = _SIZES[k % len(_SIZES)]
    picture = Image.merge("RGB", [_gradient(rng, size) for _ in range(3)])
    _draw_shapes(rng, picture)
    picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5)))
    noise = Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).convert("RGB")
    return Image.blend(picture, noise, _NOISE)


def _gradient(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """One colour channel: a rotated linear or an off-centre radial ramp over a random range."""
    if rng.random() < 0.5:
        ramp = Image.linear_gradient("L").rotate(rng.uniform(0, 360), Image.Resampling.BILINEAR)
    else:
        ramp = Image.radial_gradient("L")
        box = (rng.randint(0, 64), rng.randint(0, 64), rng.randint(192, 256), rng.randint(192, 256))
        ramp = ramp.crop(box)
    ramp = ramp.resize(size, Image.Resampling.BILINEAR)
    low, high = rng.randint(0, 120), rng.randint(135, 255)
    return ramp.point(lambda v: low + (high - low) * v // 255)


def _draw_shapes(rng: random.Random, picture: Image.Image) -> None:
    """Semi-transparent ellipses, rectangles and polygons (blended, not pasted)."""
    draw = ImageDraw.Draw(picture, "RGBA")
    w, h = picture.size
    for _ in range(rng.randint(8, 16)):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randint(90, 220))
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(w // 12, w // 3), y0 + rng.randint(h // 12, h // 3)
        kind = rng.random()
        if kind < 0.4:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind < 0.7:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            points = [
                (rng.randint(x0 - w // 4, x1), rng.randint(y0 - h // 4, y1)) for _ in range(4)
            ]
            draw.polygon(points, fill=colour)
