"""Choosing a file extension for a fetched body: what the bytes are, not what the URL claims.

Order of trust: magic bytes, then the server's Content-Type, then the URL's own extension when
it is one of a short safe list, else ``.bin``. A URL ending in ``.exe`` or ``.bashrc`` never
decides a name (RELIABILITY.md case 29).
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote, urlsplit

__all__ = ["HEAD_BYTES", "sniff_extension"]

#: How many leading bytes of a body the fetcher keeps for sniffing.
HEAD_BYTES = 512

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"%PDF-", ".pdf"),
    (b"PK\x03\x04", ".zip"),
    (b"PK\x05\x06", ".zip"),
    (b"\x1f\x8b", ".gz"),
)

_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

# ISO-BMFF brands (bytes 8..12 of an "ftyp" box) that identify still-image formats.
_FTYP_BRANDS: dict[bytes, str] = {
    b"avif": ".avif",
    b"avis": ".avif",
    b"heic": ".heic",
    b"heix": ".heic",
    b"heim": ".heic",
    b"heis": ".heic",
    b"mif1": ".heic",
    b"msf1": ".heic",
}

_CONTENT_TYPES: dict[str, str] = {
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/x-ms-bmp": ".bmp",
    "image/tiff": ".tif",
    "image/avif": ".avif",
    "image/heic": ".heic",
    "image/heif": ".heic",
    "image/svg+xml": ".svg",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/gzip": ".gz",
    "application/json": ".json",
    "text/html": ".html",
    "application/xhtml+xml": ".html",
    "text/plain": ".txt",
    "text/csv": ".csv",
}

# URL extensions trusted as a last resort: data formats only, nothing a shell or OS executes.
_SAFE_URL_EXTENSIONS: dict[str, str] = {
    ".jpg": ".jpg",
    ".jpeg": ".jpg",
    ".png": ".png",
    ".gif": ".gif",
    ".webp": ".webp",
    ".bmp": ".bmp",
    ".tif": ".tif",
    ".tiff": ".tif",
    ".avif": ".avif",
    ".heic": ".heic",
    ".pdf": ".pdf",
    ".txt": ".txt",
    ".json": ".json",
    ".csv": ".csv",
}


def sniff_extension(content_type: str | None, head: bytes, url: str) -> str:
    """The extension (with its dot) for a body starting with ``head``."""
    return _from_magic(head) or _from_content_type(content_type) or _from_url(url) or ".bin"


def _from_magic(head: bytes) -> str | None:
    for signature, extension in _SIGNATURES:
        if head.startswith(signature):
            return extension
    if _is_bmp(head):
        return ".bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12])
    return _from_text(head)


def _is_bmp(head: bytes) -> bool:
    # "BM" alone is too common a prefix (any text starting "BM"): also require a known
    # DIB header size at offset 14.
    if head[:2] != b"BM" or len(head) < 18:
        return False
    return int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES


def _from_text(head: bytes) -> str | None:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text[:HEAD_BYTES] and (text.startswith((b"<?xml", b"<svg", b"<!--"))):
        return ".svg"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return ".html"
    return None


def _from_content_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    media_type = content_type.split(";", 1)[0].strip().lower()
    return _CONTENT_TYPES.get(media_type)


def _from_url(url: str) -> str | None:
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    extension = posixpath.splitext(unquote(path))[1].lower()
    return _SAFE_URL_EXTENSIONS.get(extension)
