"""Deterministic, safe, collision-free file names for downloaded URLs.

``https://example.com/photos/Cat%20Pic.JPG?size=large`` → ``Cat_Pic-1a2b3c4d5e6f.jpg``: a
readable stem from the URL's last path segment, then the first 12 hex digits of sha256(url),
which make names unique per URL (48 bits: a collision is ~1e-5 likely at 75 M URLs, and the
files writer still never overwrites on one), then the extension.

The stem is reduced to ``[A-Za-z0-9._-]`` so a name is safe on every filesystem and in every
shell: no separators, no control characters, no leading dot or dash, no Windows device name.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from urllib.parse import unquote, urlsplit

MAX_STEM = 60
HASH_CHARS = 12
MAX_EXTENSION = 10  # including the dot
DEFAULT_STEM = "item"
DEFAULT_EXTENSION = ".bin"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SHORT_EXTENSION = re.compile(r"[A-Za-z0-9]{1,5}")
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
)


def url_hash(url: str) -> str:
    """The first :data:`HASH_CHARS` hex digits of sha256(url): the name's unique part."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def _last_segment(url: str) -> str:
    try:
        path = urlsplit(url).path
    except ValueError:  # e.g. an unbalanced '[' in the host
        return ""
    segment = path.rsplit("/", 1)[-1]
    return unicodedata.normalize("NFKC", unquote(segment, errors="replace"))


def _split_extension(name: str) -> tuple[str, str | None]:
    """``photo.JPG`` → (``photo``, ``.jpg``); no or unusual extension → (name, None)."""
    stem, dot, ext = name.rpartition(".")
    if dot and stem and _SHORT_EXTENSION.fullmatch(ext):
        return stem, f".{ext.lower()}"
    return name, None


def _safe_stem(raw: str) -> str:
    stem = _UNSAFE.sub("_", raw)
    # A leading dot hides the file, a leading dash reads as an option in shells.
    stem = stem.lstrip("._-")[:MAX_STEM]
    if not stem.strip("._-"):
        return DEFAULT_STEM
    head, sep, tail = stem.partition(".")
    # Windows treats "CON.tar" like "CON": the part before the first dot matters.
    if head.upper() in _WINDOWS_RESERVED:
        stem = f"{head}_{sep}{tail}"[:MAX_STEM]
    return stem


def _safe_extension(extension: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9]", "", extension).lower()[: MAX_EXTENSION - 1]
    return f".{cleaned}" if cleaned else DEFAULT_EXTENSION


def file_name(url: str, extension: str | None) -> str:
    """The final file name for ``url`` with ``extension`` (``".jpg"``), at most 84 characters.

    When ``extension`` is None, the URL's own extension is kept if it is short and
    alphanumeric, otherwise ``.bin``. Same URL → same name; different URLs → different names.
    """
    stem, own_extension = _split_extension(_last_segment(url))
    if extension is not None:
        chosen = _safe_extension(extension)
    else:
        chosen = own_extension or DEFAULT_EXTENSION
    return f"{_safe_stem(stem)}-{url_hash(url)}{chosen}"


def with_counter(name: str, counter: int) -> str:
    """``stem-HASH.jpg`` → ``stem-HASH-2.jpg``: the fallback when a name is taken."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        return f"{name}-{counter}"
    return f"{stem}-{counter}.{ext}"
