"""Pure, picklable image work run inside the CPU stage's worker processes.

:func:`process_image` is the only entry point. It runs in a separate process (RELIABILITY.md
property 7), never raises, and returns a small :class:`ImageResult` value: everything that can
go wrong with one untrusted file comes back as an error code, never as an exception.

Defences, in the order they apply:

1. ``Image.open(path, formats=ALLOWED_FORMATS)``: only JPEG, PNG, GIF, WEBP, BMP and TIFF are
   ever probed, so EPS (Ghostscript), PDF, PSD, SVG and the many rarely used plugins never see
   hostile bytes.
2. Size and frame count are read from the header and checked against ``max_pixels`` and
   ``max_frames`` **before** any pixel is decoded; Pillow's own bomb limit is tightened to the
   same value and its warning is an error.
3. ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays False: a truncated file is ``not_an_image``.
4. An ``ok`` result has been fully decoded: nothing before the decode may load pixels behind
   its back (Pillow's PNG ``getexif`` does, and a failed ``load`` leaves an image whose next
   ``load`` silently returns black pixels), and the paths that keep the original bytes decode
   every frame first. Any error Pillow raises while parsing or decoding the file is
   ``not_an_image``, with a message about the content (never the temp file's name);
   ``process_failed`` is left to crashes, hangs and running out of memory.

Worker processes also route C libraries' stderr (libtiff prints its errors there) to
``/dev/null``: :func:`quiet_native_stderr`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from fetchpool import fsutil
from fetchpool.config import ImageConfig
from fetchpool.errors import DiskFullError, OutputError
from fetchpool.models import ErrorCode

#: Formats Pillow may probe. Everything else (EPS, PDF, PSD, ICO, ...) is ``not_an_image``.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

#: Pillow's default bomb limit, captured before anything lowers it: never raised above this.
PILLOW_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485

#: Formats that ``encode="keep"`` re-encodes in when pixels changed; others become JPEG
#: (GIF/BMP/TIFF re-encoding is slow, lossy in odd ways or rarely wanted in datasets).
_REENCODE_SAME = frozenset({"JPEG", "PNG", "WEBP"})
_ENCODE_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "png": "PNG"}
_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
}
#: EXIF orientations that swap width and height.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
#: What brings each EXIF orientation upright (as ``ImageOps.exif_transpose``, which is not used:
#: it re-reads and re-serialises the EXIF block, and a broken block would fail the image).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
#: Resampling filter for the exact resize. Measured on a 4000x3000 JPEG -> 256x192 (2 cores):
#: full decode + LANCZOS 104 ms; draft (DCT 1/8) + LANCZOS 16 ms with a mean absolute
#: difference of 0.97/255 from the full-decode result; draft + BICUBIC 15 ms but 2.6/255;
#: draft + BILINEAR 15 ms, 5.7/255. After the draft the remaining resize is cheap, so the best
#: filter costs nothing measurable: LANCZOS. ``reducing_gap=3.0`` halves the time of large
#: non-JPEG downscales (no draft there) for 0.39/255 of difference.
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0
#: ``--downsample-filter`` / ``--upsample-filter`` names (``area`` is img2dataset's name for
#: averaging, Pillow's BOX). ``auto`` is the fast path above for downscaling, LANCZOS for
#: upscaling (img2dataset: cv2 INTER_AREA down, INTER_LANCZOS4 up).
_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
#: Padding of ``border`` by mode: white as img2dataset (which mattes alpha on white first);
#: where there is alpha, transparent white, so a JPEG of it (alpha composited on white) is
#: img2dataset's result and a PNG or WebP keeps the image's own transparency.
_BORDER_FILL: dict[str, int | tuple[int, ...]] = {
    "L": 255,
    "RGB": (255, 255, 255),
    "RGBA": (255, 255, 255, 0),
}

# --save-exif bounds: a hostile file can carry a huge EXIF block (a PNG eXIf or WebP EXIF
# chunk is limited only by --max-bytes; a JPEG's APP1 segment by 64 KiB).
#: A raw EXIF block larger than this is not parsed: the item gets no ``exif``.
MAX_EXIF_SOURCE = 1024 * 1024
#: Characters of one value kept (longer ones are cut), and elements of a list value shown.
MAX_EXIF_VALUE = 1024
_MAX_EXIF_ITEMS = 256
#: Characters of the whole JSON object; tags past it (in file order) are left out.
MAX_EXIF_JSON = 16 * 1024
#: EXIF groups as img2dataset (exifread) names them: "Image Make", "EXIF ExposureTime"...
_EXIF_GROUPS: tuple[tuple[int | None, str, dict[int, str]], ...] = (
    (None, "Image", ExifTags.TAGS),
    (ExifTags.IFD.Exif, "EXIF", ExifTags.TAGS),
    (ExifTags.IFD.GPSInfo, "GPS", ExifTags.GPSTAGS),
    (ExifTags.IFD.Interop, "Interoperability", ExifTags.TAGS),
    (ExifTags.IFD.IFD1, "Thumbnail", ExifTags.TAGS),
)
#: Offsets of sub-blocks (meaningless outside the file) and the maker's private, often large,
#: binary note (exifread leaves it out too unless asked for details).
_EXIF_SKIPPED = frozenset(
    {ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo, ExifTags.IFD.Interop, ExifTags.IFD.MakerNote}
)


@dataclass(frozen=True, slots=True)
class ImageResult:
    """What a worker sends back: small, picklable, never an exception.

    ``temp_path`` is the new output file (a complete, fsynced temp file in ``dst_dir``), or
    None when the source bytes were kept untouched (or when the item failed).
    ``width``/``height`` are the output size, ``orig_*`` the upright source size.
    """

    ok: bool
    error_code: ErrorCode | None = None
    error_message: str | None = None
    temp_path: str | None = None
    extension: str | None = None
    width: int | None = None
    height: int | None = None
    orig_width: int | None = None
    orig_height: int | None = None
    image_format: str | None = None
    bytes: int = 0
    sha256: str | None = None
    exif: str | None = None  # JSON object text with ``save_exif`` (``{}``: none), else None

    @classmethod
    def failure(cls, code: ErrorCode, message: str) -> ImageResult:
        return cls(ok=False, error_code=code, error_message=message)


class _Reject(Exception):
    """Internal: stop processing this item with a code (never leaves this module)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def configure_pillow(max_pixels: int) -> None:
    """Tighten Pillow's process-wide limits (run once in each worker, and per call).

    The bomb limit is only ever lowered; truncated images are never silently padded.
    """
    Image.MAX_IMAGE_PIXELS = min(max_pixels, PILLOW_MAX_PIXELS)
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def process_image(src_path: str, dst_dir: str, config: ImageConfig) -> ImageResult:
    """Check, orient, resize and encode one image file; return the outcome as a value.

    The source file is never modified. Steps: open with the format allow list → header checks
    (pixels, frames, ``min_size``, area, aspect ratio, the resized size) → decode: every frame
    when the original bytes may be kept or ``verify`` is set, else the first frame, after a
    JPEG draft (DCT scaling to at least the target size, the cheap part of a downscale;
    ``auto`` filter only) → EXIF orientation → resize (``RESAMPLE`` or the filter asked for)
    → encode to a new temp file in ``dst_dir``. When nothing about the pixels changes and
    ``encode="keep"``, the original bytes are kept (``temp_path=None``), but only after every
    frame decoded: an ``ok`` always means the image is readable to its end. With
    ``save_exif`` the original's EXIF tags come back as JSON text (never fatal).
    """
    configure_pillow(config.max_pixels)
    src = Path(src_path)
    try:
        with _strict_warnings():
            return _process(src, dst_dir, config)
    except Exception as exc:  # noqa: BLE001 - a worker hands every failure back as a value
        code, message = _classify(exc, min(config.max_pixels, PILLOW_MAX_PIXELS))
        return ImageResult.failure(code, _scrub(message, src))


def quiet_native_stderr() -> None:
    """In a worker process: send C-level writes to fd 2 (libtiff's errors) to ``/dev/null``.

    libtiff prints its errors with ``fprintf(stderr, ...)`` while it decodes (Pillow silences
    only its warnings), which would reach the user's terminal even with ``-q``; the item's own
    error message already says what was wrong. Python's ``sys.stderr`` is moved to a copy of
    the original descriptor, so a traceback or a log line a worker really prints is still
    seen. Pillow's Python logger, which reports broken files at error level (again the
    item's failure already says it), gets a handler that drops its records in the worker.
    """
    logging.getLogger("PIL").addHandler(logging.NullHandler())
    with suppress(Exception):  # a stderr that cannot be flushed has nothing to lose
        sys.stderr.flush()
    try:
        original = os.dup(2)
    except OSError:  # no fd 2 at all: nothing can reach a terminal
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)
    sys.stderr = os.fdopen(original, "w", buffering=1, errors="backslashreplace")


def _classify(exc: Exception, limit: int) -> tuple[ErrorCode, str]:
    if isinstance(exc, _Reject):
        return exc.code, exc.message
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        # Pillow's words name its own threshold (twice the limit for the error): say ours.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found[1]):,} pixels" if found else "the image's size"
        return ErrorCode.IMAGE_TOO_LARGE, f"{pixels} exceed the limit of {limit:,} pixels"
    if isinstance(exc, MemoryError):
        return ErrorCode.PROCESS_FAILED, "out of memory while processing the image"
    if isinstance(exc, DiskFullError):
        return ErrorCode.DISK_FULL, str(exc)
    if isinstance(exc, OutputError):
        return ErrorCode.IO_ERROR, str(exc)
    return ErrorCode.PROCESS_FAILED, f"{type(exc).__name__}: {exc}"


def _scrub(message: str, src: Path) -> str:
    """Never name the temp file (``.fetchpool/tmp/.fp-….part``): it means nothing to a user."""
    for text in (str(src), src.name):
        if text:
            message = message.replace(text, "<image>")
    return message


@contextmanager
def _strict_warnings() -> Iterator[None]:
    # Pillow reports a near-bomb only as a warning; here it is an error. Other Pillow warnings
    # (palette transparency, ...) are noise for a worker nobody watches.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _process(src: Path, dst_dir: str, config: ImageConfig) -> ImageResult:
    with _open(src) as img:
        fmt = img.format or ""
        source_mode = img.mode
        with _reading(fmt):
            frames = _check_header(img, config)
            if config.header_only:  # identified, bounds checked: kept as it is, undecoded
                return _kept(src, fmt, *img.size, None)
            orientation = _header_orientation(img, fmt)
            width, height = _upright_size(img.size, orientation)
            target = _target_size(width, height, config)
            reoriented = _stored_orientation(img, fmt) != 1
            keep = target is None and not reoriented and config.encode == "keep"
            if keep or config.verify:
                _decode_all_frames(img, frames)  # the bytes kept must decode to their end
            else:
                if target is not None and _drafts(fmt, target, config):
                    # DCT scaling: decode at 1/2, 1/4 or 1/8 while staying >= the target size.
                    img.draft("RGB", _stored_size(target.resize_to, orientation))
                img.load()
            if (found := _orientation(img)) != orientation:  # PNG eXIf after the pixel data
                orientation, reoriented = found, True
                width, height = _upright_size(img.size, orientation)
                target = _target_size(width, height, config)
        exif = _exif_json(img) if config.save_exif else None  # after the decode (PNG eXIf)
        if target is None and not reoriented and config.encode == "keep":
            return _kept(src, fmt, width, height, exif)
        out = _normalize_mode(img)
        icc = img.info.get("icc_profile") if source_mode in ("RGB", "RGBA") else None
    if orientation in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[orientation])
    if target is not None:
        out = _apply_resize(out, target, config)
    return _encode(
        out,
        source_format=fmt,
        dst_dir=dst_dir,
        config=config,
        orig=(width, height),
        icc=icc,
        exif=exif,
    )


@contextmanager
def _open(src: Path) -> Iterator[ImageFile.ImageFile]:
    try:
        handle = src.open("rb")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise _Reject(ErrorCode.IO_ERROR, f"cannot read the fetched file: {reason}") from exc
    with handle:
        try:
            # A file object, not the path: Pillow's messages then never carry the temp name.
            img = Image.open(handle, formats=list(ALLOWED_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
            raise
        except Exception as exc:  # plugins raise many types on garbage
            raise _Reject(ErrorCode.NOT_AN_IMAGE, _unidentified(handle, exc)) from exc
        with img:
            yield img


@contextmanager
def _reading(fmt: str) -> Iterator[None]:
    """Errors Pillow raises while parsing or decoding the file are the content's fault.

    ``TypeError: Missing dimensions`` (a TIFF frame without a size), ``SyntaxError: APNG
    contains frame sequence errors``, ``OSError: image file is truncated``, ``decoder error
    -2``: all ``not_an_image``. Running out of memory stays ``process_failed``.
    """
    try:
        yield
    except (_Reject, Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as exc:  # any parse or decode error of hostile bytes
        detail = str(exc).strip() or type(exc).__name__
        if isinstance(exc, OSError) and "out of memory" in detail:  # decoder status -9
            raise MemoryError(detail) from exc
        if not isinstance(exc, OSError | SyntaxError | ValueError | EOFError | TypeError):
            detail = f"{type(exc).__name__}: {detail}"
        raise _Reject(ErrorCode.NOT_AN_IMAGE, f"{fmt or 'image'} decoder: {detail}") from exc


#: Signatures of the allowed formats: content that starts like one but does not open has a
#: broken header (and the plugin's own error says how).
_ALLOWED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)
#: Content that is something else, never decoded (label for the message).
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "PostScript/EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"qoif", "QOI"),
    (b"\x1f\x8b", "gzip data"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x00\x00\x00", "binary data"),  # checked last: ISO media (ftyp) is tested before
)


def _unidentified(handle: io.BufferedReader, exc: Exception) -> str:
    """Why ``Image.open`` refused the content, in words about the content."""
    try:
        handle.seek(0)
        head = handle.read(512)
    except OSError:
        head = b""
    fmt = _allowed_signature(head)
    if fmt is not None:
        return f"broken {fmt} header: {_plugin_error(handle, fmt, exc)}"
    if not isinstance(exc, UnidentifiedImageError):  # a plugin took it, then gave up
        return f"cannot open the image: {str(exc).strip() or type(exc).__name__}"
    return f"cannot identify image file ({_sniff(head)})"


def _allowed_signature(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _ALLOWED_SIGNATURES:
        if head.startswith(magic):
            return fmt
    return None


def _plugin_error(handle: io.BufferedReader, fmt: str, exc: Exception) -> str:
    """The format plugin's own error (``Image.open`` hides it behind "cannot identify")."""
    reason = str(exc)
    if isinstance(exc, UnidentifiedImageError):
        reason = "not a valid file of this format"
        factory = Image.OPEN.get(fmt, (None, None))[0]
        if factory is not None:
            try:
                handle.seek(0)
                factory(handle, "").close()
            except Exception as inner:  # noqa: BLE001 - the error is what we came for
                reason = str(inner).strip() or type(inner).__name__
    return reason


def _sniff(head: bytes) -> str:
    """A short guess at what content that no allowed format accepted is."""
    if not head:
        return "the file is empty"
    if head[4:8] == b"ftyp":
        return f"ISO media ({head[8:12].decode('latin-1').strip()}): AVIF, HEIF or video"
    label = next((label for magic, label in _OTHER_SIGNATURES if head.startswith(magic)), None)
    return label or _sniff_text(head.lstrip(b"\xef\xbb\xbf \t\r\n").lower(), head)


def _sniff_text(text: bytes, head: bytes) -> str:
    if text.startswith(b"<!doctype html") or b"<html" in text or b"<body" in text:
        return "html?"
    if b"<svg" in text:
        return "SVG?"
    if text.startswith(b"<?xml"):
        return "XML?"
    if text.startswith((b"{", b"[")):
        return "JSON?"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head[:64]):
        return "text?"
    return f"starts with {head[:8].hex(' ')}"


def _check_header(img: ImageFile.ImageFile, config: ImageConfig) -> int:
    """Bounds from the header only (no pixel decoded yet); returns the frame count."""
    width, height = img.size
    if width < 1 or height < 1:
        raise _Reject(ErrorCode.NOT_AN_IMAGE, f"image has an empty size {width}x{height}")
    limit = min(config.max_pixels, PILLOW_MAX_PIXELS)
    if width * height > limit:
        raise _Reject(
            ErrorCode.IMAGE_TOO_LARGE, f"{width}x{height} exceeds the limit of {limit:,} pixels"
        )
    frames = _frame_count(img)
    if frames > config.max_frames:
        raise _Reject(
            ErrorCode.IMAGE_TOO_LARGE, f"{frames} frames exceed the limit of {config.max_frames}"
        )
    if config.min_size is not None and min(width, height) < config.min_size:
        raise _Reject(
            ErrorCode.IMAGE_TOO_SMALL,
            f"{width}x{height} is smaller than the minimum side {config.min_size}",
        )
    _check_shape(width, height, config)
    return frames


def _check_shape(width: int, height: int, config: ImageConfig) -> None:
    """The dataset filters on area and aspect ratio (img2dataset's ``max_image_area``,
    ``max_aspect_ratio``). Both are the same for the stored and the upright size (an EXIF
    rotation swaps width and height), so the header's size is the upright one's."""
    area = width * height
    if config.min_area is not None and area < config.min_area:
        raise _Reject(
            ErrorCode.IMAGE_AREA_TOO_SMALL,
            f"{width}x{height} has {area:,} pixels, below --min-area {config.min_area:,}",
        )
    if config.max_area is not None and area > config.max_area:
        raise _Reject(
            ErrorCode.IMAGE_AREA_TOO_LARGE,
            f"{width}x{height} has {area:,} pixels, above --max-area {config.max_area:,}",
        )
    ratio = max(width, height) / min(width, height)
    if config.max_aspect_ratio is not None and ratio > config.max_aspect_ratio:
        raise _Reject(
            ErrorCode.ASPECT_RATIO_TOO_LARGE,
            f"{width}x{height} has an aspect ratio of {ratio:.4g}, above --max-aspect-ratio "
            f"{config.max_aspect_ratio:g}",
        )


def _frame_count(img: ImageFile.ImageFile) -> int:
    # n_frames walks frame headers without decoding pixels (GIF seeks with update_image off).
    frames = getattr(img, "n_frames", 1)
    return frames if isinstance(frames, int) and frames >= 1 else 1


def _header_orientation(img: ImageFile.ImageFile, fmt: str) -> int:
    """The EXIF orientation still to apply to ``img.size``, read without decoding a pixel.

    TIFF: Pillow applies the orientation itself while loading, and reports the upright size
    already. PNG: an eXIf chunk may follow the pixel data, and Pillow's ``getexif`` decodes
    the whole image to look for it (swallowing that decode's error would leave black pixels
    behind a later ``load`` that does nothing); it is read after the decode instead.
    """
    if fmt == "TIFF" or (fmt == "PNG" and "exif" not in img.info):
        return 1
    return _orientation(img)


def _stored_orientation(img: ImageFile.ImageFile, fmt: str) -> int:
    """The orientation recorded in the file (a TIFF's tag, although Pillow applies it)."""
    if fmt == "TIFF":
        tags = getattr(img, "tag_v2", None)
        value = tags.get(_EXIF_ORIENTATION, 1) if tags is not None else 1
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    return _header_orientation(img, fmt)


def _orientation(img: ImageFile.ImageFile) -> int:
    had_tiles = bool(img.tile)
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is ignored, not fatal
        if had_tiles and not img.tile:  # getexif started the decode, and the decode failed
            raise
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _SWAPPING_ORIENTATIONS else size


def _stored_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return _upright_size(size, orientation)  # the swap is its own inverse


@dataclass(frozen=True, slots=True)
class _Target:
    """A resize: the whole image to ``resize_to``, then cropped or padded to ``canvas``."""

    resize_to: tuple[int, int]
    canvas: tuple[int, int]
    downscale: bool  # the side matched to the size was larger than it (img2dataset's test)


#: Modes that match the shorter side to the size (the others match the longer side).
_SHORT_SIDE_MODES = frozenset({"keep-ratio", "center-crop"})


def _target_size(width: int, height: int, config: ImageConfig) -> _Target | None:
    """Sizes for the configured resize, or None when the image is left at its size.

    As img2dataset's resizer: ``keep-ratio`` and ``center-crop`` bring the shorter side to
    the size (``center-crop`` then keeps the middle size x size), ``keep-ratio-largest`` and
    ``border`` the longer side (``border`` then pads to size x size). ``resize_only_down``
    leaves an image alone entirely (no crop, no pad) when that side is not above the size.
    An output above the pixel limit (a 1x5000 strip with ``keep-ratio 256`` would be
    256x1,280,000) is ``image_too_large`` before anything is decoded.
    """
    size = config.resize
    if size is None or config.resize_mode == "no":
        return None
    short = config.resize_mode in _SHORT_SIDE_MODES
    downscale = (min(width, height) if short else max(width, height)) > size
    if config.resize_only_down and not downscale:
        return None
    resize_to = _scale_side(width, height, size, longer=not short)
    square = config.resize_mode in ("center-crop", "border")
    target = _Target(resize_to, (size, size) if square else resize_to, downscale)
    if target.resize_to == target.canvas == (width, height):
        return None
    limit = min(config.max_pixels, PILLOW_MAX_PIXELS)
    if target.canvas[0] * target.canvas[1] > limit:
        raise _Reject(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{width}x{height} resized ({config.resize_mode} {size}) would be "
            f"{target.canvas[0]}x{target.canvas[1]}, above the limit of {limit:,} pixels",
        )
    return target


def _scale_side(width: int, height: int, size: int, *, longer: bool) -> tuple[int, int]:
    """Scale so the longer (or shorter) side becomes ``size``, keeping the aspect ratio."""
    if (width >= height) == longer:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def _drafts(fmt: str, target: _Target, config: ImageConfig) -> bool:
    """The JPEG DCT-scaling shortcut belongs to ``auto`` downscaling only: a filter asked for
    by name gets a full decode, so its output is that filter's exact result."""
    return fmt in ("JPEG", "MPO") and target.downscale and config.downsample_filter == "auto"


def _resample(target: _Target, config: ImageConfig) -> tuple[Image.Resampling, float | None]:
    """The filter and ``reducing_gap`` for this resize."""
    name = config.downsample_filter if target.downscale else config.upsample_filter
    if name == "auto":
        return RESAMPLE, (REDUCING_GAP if target.downscale else None)
    return _FILTERS[name], None


def _decode_all_frames(img: ImageFile.ImageFile, frames: int) -> None:
    """Decode every frame (count already capped by ``_check_header``), then frame 0 again."""
    for index in range(frames):
        img.seek(index)
        img.load()
    if frames > 1:
        img.seek(0)
        img.load()


def _kept(src: Path, fmt: str, width: int, height: int, exif: str | None) -> ImageResult:
    with src.open("rb") as handle:  # streamed: the source may be up to max_bytes
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = handle.tell()
    return ImageResult(
        ok=True,
        extension=_EXTENSIONS.get(fmt),
        width=width,
        height=height,
        orig_width=width,
        orig_height=height,
        image_format=fmt,
        bytes=size,
        sha256=digest,
        exif=exif,
    )


def _normalize_mode(img: Image.Image) -> Image.Image:
    """Bring exotic modes to L, RGB or RGBA so resize and every encoder accept them."""
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_8bit(img)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode in ("LA", "La", "RGBa"):
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _to_8bit(img: Image.Image) -> Image.Image:
    # A plain convert("L") clips 16-bit values at 255 (a white image); scale instead.
    wide = img.convert("I") if img.mode != "F" else img
    if img.mode.startswith("I;16"):
        wide = wide.point(lambda value: value * (1 / 256))
    return wide.convert("L")


def _apply_resize(img: Image.Image, target: _Target, config: ImageConfig) -> Image.Image:
    resize_to, canvas = target.resize_to, target.canvas
    resample, gap = _resample(target, config)
    if config.resize_mode == "center-crop" and resize_to != canvas:
        # Resample only the source region that survives the crop, straight to the canvas:
        # the same pixels as resize-then-crop, without resizing what is thrown away.
        scale_x, scale_y = img.width / resize_to[0], img.height / resize_to[1]
        left = (resize_to[0] - canvas[0]) // 2
        top = (resize_to[1] - canvas[1]) // 2
        box = (
            left * scale_x,
            top * scale_y,
            (left + canvas[0]) * scale_x,
            (top + canvas[1]) * scale_y,
        )
        if img.size == resize_to:  # the shorter side is already the size: a plain crop
            return img.crop((left, top, left + canvas[0], top + canvas[1]))
        return img.resize(canvas, resample, box=box, reducing_gap=gap)
    out = img
    if img.size != resize_to:
        out = img.resize(resize_to, resample, reducing_gap=gap)
    if resize_to == canvas:
        return out
    # border: centred on white (transparent white where there is alpha), as img2dataset
    background = Image.new(out.mode, canvas, _BORDER_FILL.get(out.mode, 0))
    background.paste(out, ((canvas[0] - resize_to[0]) // 2, (canvas[1] - resize_to[1]) // 2))
    return background


def _output_format(source_format: str, config: ImageConfig) -> str:
    if config.encode != "keep":
        return _ENCODE_FORMAT[config.encode]
    if source_format == "MPO":
        return "JPEG"
    return source_format if source_format in _REENCODE_SAME else "JPEG"


def _for_encoder(img: Image.Image, fmt: str) -> Image.Image:
    """Modes each encoder takes: JPEG is always RGB (alpha composited on white)."""
    if fmt == "JPEG":
        if img.mode == "RGBA":
            white = Image.new("RGB", img.size, (255, 255, 255))
            white.paste(img, mask=img.getchannel("A"))
            return white
        return img if img.mode == "RGB" else img.convert("RGB")
    if fmt == "WEBP" and img.mode == "L":
        return img.convert("RGB")
    return img


def _encode(
    img: Image.Image,
    *,
    source_format: str,
    dst_dir: str,
    config: ImageConfig,
    orig: tuple[int, int],
    icc: object,
    exif: str | None,
) -> ImageResult:
    fmt = _output_format(source_format, config)
    img = _for_encoder(img, fmt)
    buffer = io.BytesIO()
    params: dict[str, object] = {}
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = config.quality
    if isinstance(icc, bytes) and img.mode in ("RGB", "RGBA"):
        # An RGB source's profile keeps colours right; EXIF is dropped (already applied).
        params["icc_profile"] = icc
    img.save(buffer, format=fmt, **params)
    data = buffer.getvalue()
    path = _write_temp(dst_dir, data)
    return ImageResult(
        ok=True,
        temp_path=path,
        extension=_EXTENSIONS[fmt],
        width=img.width,
        height=img.height,
        orig_width=orig[0],
        orig_height=orig[1],
        image_format=fmt,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        exif=exif,
    )


def _exif_json(img: Image.Image) -> str:
    """The image's EXIF tags as a JSON object text, as img2dataset's ``extract_exif``:
    ``{"Image Make": "Canon", "EXIF ExposureTime": "1/200", "GPS GPSLatitude": "[48, 51,
    2979/100]", ...}``, every value a string; ``{}`` when there is none.

    Always a string, never None (a column of nulls and strings breaks ``datasets``' type
    inference on WebDataset shards). Bounded (see ``MAX_EXIF_*``) and never fatal: an
    oversized or unreadable block gives ``{}``, a broken sub-block (GPS, ...) leaves out its
    tags only, and the image is processed as usual.
    """
    raw = img.info.get("exif")
    if isinstance(raw, bytes) and len(raw) > MAX_EXIF_SOURCE:
        return "{}"
    try:
        exif = img.getexif()
    except Exception:  # noqa: BLE001 - a broken EXIF block only means no tags
        return "{}"
    tags: dict[str, str] = {}
    room = [MAX_EXIF_JSON - 2]  # the braces
    for ifd, group, names in _EXIF_GROUPS:
        try:
            entries = exif if ifd is None else exif.get_ifd(ifd)
            if not _add_exif_tags(tags, entries, group, names, room):
                break
        except Exception:  # noqa: BLE001, S112 - a broken sub-block: its tags are left out
            continue
    return json.dumps(tags, ensure_ascii=False)


def _add_exif_tags(
    tags: dict[str, str],
    entries: Mapping[int, object],
    group: str,
    names: dict[int, str],
    room: list[int],
) -> bool:
    """Add one group's tags while they fit in ``room[0]`` characters; False once full."""
    for tag, value in entries.items():
        if tag in _EXIF_SKIPPED or not isinstance(tag, int):
            continue
        key = f"{group} {names.get(tag) or f'Tag 0x{tag:04X}'}"
        text = _exif_text(value)[:MAX_EXIF_VALUE]
        cost = len(json.dumps(key, ensure_ascii=False)) + len(json.dumps(text, ensure_ascii=False))
        room[0] -= cost + 2  # ": " or ", "
        if room[0] < 0:
            return False
        tags[key] = text
    return True


def _exif_text(value: object) -> str:
    """One EXIF value as text: ratios as ``n/d``, lists as ``[a, b]``, text without NULs,
    binary as hex; never more than about :data:`MAX_EXIF_VALUE` characters of work."""
    if isinstance(value, str):
        text = value.replace("\0", "").strip()
        return text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    if isinstance(value, bytes):
        data = value.rstrip(b"\0")[:MAX_EXIF_VALUE]
        if data.isascii() and all(32 <= byte < 127 for byte in data):
            return data.decode("ascii").strip()
        return data[: MAX_EXIF_VALUE // 2].hex()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_exif_text(item) for item in value[:_MAX_EXIF_ITEMS]) + "]"
    return _exif_number(value)


def _exif_number(value: object) -> str:
    numerator = getattr(value, "numerator", None)
    denominator = getattr(value, "denominator", None)
    if isinstance(value, float) or not isinstance(numerator, int):
        return str(value)[:MAX_EXIF_VALUE]
    if denominator in (None, 1):
        return str(numerator)
    return f"{numerator}/{denominator}"


def _write_temp(dst_dir: str, data: bytes) -> str:
    handle, path = fsutil.create_temp(dst_dir)
    try:
        handle.write(data)
        fsutil.finish_temp(handle, sync=False)  # the writer fsyncs before naming it
    except OSError as exc:
        fsutil.abandon(handle, path)
        raise fsutil.translate_os_error(exc, "cannot write the processed image") from exc
    return path
