"""Content-Encoding: a body decoded as it streams in, under the same bounds as any body.

Servers send compressed bodies even to clients that asked for ``identity`` (CDNs, a gzip
module switched on for everything, a stored ``.svgz``). What a user downloading images wants is
the image, so the fetcher decodes what curl decodes (``--compressed``): ``gzip`` (and its
alias ``x-gzip``), ``deflate`` with or without its zlib wrapper, ``br`` when a Brotli library
that can bound its output is importable (``brotli`` ≥ 1.2 or ``brotlicffi``; neither is a
dependency), and stacks of them (``gzip, gzip``) up to :data:`MAX_CODINGS`, curl's limit.
Anything else fails the item with a message naming the coding.

Bounds, so that a small body cannot inflate into gigabytes of memory or disk:

* every decode step returns at most ``size`` bytes (zlib's ``max_length``, Brotli's
  ``output_buffer_limit``); the rest of its input waits, so memory stays flat whatever the
  ratio;
* the fetcher counts decoded bytes against ``max_bytes`` (``too_large``), as it counts the
  bytes on the wire;
* :meth:`Decoder.check_ratio` stops a body that expands more than :data:`MAX_RATIO` times
  (``too_large``): one deflate layer cannot exceed 1032:1, so only stacked bombs reach it.

A body whose compressed stream is cut short fails ``incomplete_body`` (retried); one that does
not decode fails with :data:`ENCODING_ERROR`.
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any, Protocol

from fetchpool.errors import FetchError
from fetchpool.models import ErrorCode

__all__ = [
    "ENCODING_ERROR",
    "MAX_CODINGS",
    "MAX_RATIO",
    "Decoder",
    "decoder_for",
]

#: Codings applied on top of each other that are decoded (curl's MAX_ENCODE_STACK).
MAX_CODINGS = 5
#: Decoded bytes allowed per byte received, once past :data:`RATIO_FLOOR` decoded bytes.
MAX_RATIO = 1100
RATIO_FLOOR = 1024 * 1024
#: The code of a body that cannot be decoded: an unknown or unsupported coding, or corrupt
#: compressed data. Not retried (curl's CURLE_BAD_CONTENT_ENCODING): asking again gets the
#: same body.
ENCODING_ERROR = ErrorCode.BAD_CONTENT_ENCODING
#: Media types whose gzip coding is the file itself: kept as sent, as wget does, so that a
#: ``.tar.gz`` served with ``Content-Encoding: gzip`` stays a ``.tar.gz``.
_GZIP_TYPES = frozenset({"application/gzip", "application/x-gzip", "application/x-gunzip"})
_GZIP_MAGIC = b"\x1f\x8b"
_BROTLI_MODULES = ("brotli", "brotlicffi")
_PREVIEW = 40


class _Layer(Protocol):
    """One coding's decoder: input is fed, output read in bounded pieces."""

    name: str

    def feed(self, data: bytes) -> None: ...

    def read(self, size: int) -> bytes:
        """Up to ``size`` decoded bytes from the input fed so far; ``b""``: it needs more."""

    def finished(self) -> bool:
        """Whether the coded stream reached its end."""


def decoder_for(content_encoding: str | None, content_type: str | None = None) -> Decoder | None:
    """The decoder for a response's ``Content-Encoding``, or None when there is nothing to
    decode (absent, ``identity``, or a gzip file served as ``application/gzip``).

    Raises :class:`FetchError` (:data:`ENCODING_ERROR`) for a coding that cannot be decoded.
    """
    if not content_encoding:
        return None
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if codings in (["gzip"], ["x-gzip"]) and media_type in _GZIP_TYPES:
        return None
    if len(codings) > MAX_CODINGS:
        raise FetchError(
            ENCODING_ERROR,
            f"Content-Encoding stacks {len(codings)} codings (at most {MAX_CODINGS} are decoded)",
        )
    # Listed in the order they were applied: the last one is undone first.
    return Decoder([_layer(coding) for coding in reversed(codings)])


def _layer(coding: str) -> _Layer:
    if coding in ("gzip", "x-gzip"):
        return _Zlib("gzip", zlib.MAX_WBITS | 16)
    if coding == "deflate":
        return _Zlib("deflate", None)
    shown = coding if len(coding) <= _PREVIEW else coding[:_PREVIEW] + "..."
    if coding == "br":
        module = _brotli()
        if module is None:
            raise FetchError(
                ENCODING_ERROR,
                "the body is Content-Encoding 'br' (Brotli), which needs the brotli (>= 1.2) "
                "or brotlicffi package: pip install brotli",
            )
        return _Brotli(module)
    raise FetchError(
        ENCODING_ERROR,
        f"the body is Content-Encoding {shown!r}, which fetchpool cannot decode "
        "(gzip, deflate and br are decoded)",
    )


class Decoder:
    """The stack of decoders of one body: :meth:`feed` it what arrives, :meth:`read` it out
    in bounded pieces until it returns ``b""``."""

    def __init__(self, layers: list[_Layer]) -> None:
        self._layers = layers  # the first undoes the last coding applied

    def feed(self, data: bytes) -> None:
        """Bytes off the wire (at most one read's worth: they wait here until read)."""
        self._layers[0].feed(data)

    def read(self, size: int) -> bytes:
        """Up to ``size`` decoded bytes; ``b""`` when everything fed so far is decoded."""
        return self._read(len(self._layers) - 1, size)

    def _read(self, index: int, size: int) -> bytes:
        layer = self._layers[index]
        while True:
            try:
                piece = layer.read(size)
            except Exception as exc:  # zlib.error, brotli.error: corrupt compressed data
                raise FetchError(
                    ENCODING_ERROR, f"the {layer.name}-compressed body does not decode: {exc}"
                ) from exc
            if piece or index == 0:
                return piece
            below = self._read(index - 1, size)
            if not below:
                return b""
            layer.feed(below)

    def finish(self) -> None:
        """The body has ended: every coded stream must have reached its own end."""
        for layer in self._layers:
            if not layer.finished():
                raise FetchError(
                    ErrorCode.INCOMPLETE_BODY,
                    f"the {layer.name}-compressed body ended before its compressed stream did",
                )

    @staticmethod
    def check_ratio(decoded: int, received: int) -> None:
        """Refuse a body that expands more than :data:`MAX_RATIO` times (a bomb)."""
        if decoded > RATIO_FLOOR and decoded > MAX_RATIO * max(received, 1):
            raise FetchError(
                ErrorCode.TOO_LARGE,
                f"the compressed body expands more than {MAX_RATIO}x ({received} bytes "
                f"received, {decoded} decoded so far): refused as a decompression bomb",
            )


class _Zlib:
    """gzip (``wbits`` 31; members one after another, as gzip -d reads them) or deflate
    (``wbits`` None: with its zlib wrapper or raw, told apart by the first two bytes; curl
    accepts both, since servers have always sent both)."""

    def __init__(self, name: str, wbits: int | None) -> None:
        self.name = name
        self._wbits = wbits
        self._obj: Any = None
        self._input = b""
        self._seen = False
        self._done = False

    def feed(self, data: bytes) -> None:
        if data and not self._done:  # bytes after the end of the stream are ignored
            self._seen = True
            self._input += data

    def read(self, size: int) -> bytes:
        while self._input and not self._done:
            if self._obj is None or self._obj.eof:
                if len(self._input) < 2:
                    return b""  # two bytes tell what comes next
                self._start(self._input[:2])
                continue
            out: bytes = self._obj.decompress(self._input, size)
            self._input = self._obj.unconsumed_tail
            if self._obj.eof:
                self._input = self._obj.unused_data + self._input
            if out:
                return out
        return b""

    def _start(self, head: bytes) -> None:
        if self._obj is None:
            wbits = self._wbits
            if wbits is None:
                wbits = zlib.MAX_WBITS if _zlib_header(head) else -zlib.MAX_WBITS
            self._obj = zlib.decompressobj(wbits)
        elif self._wbits is not None and head == _GZIP_MAGIC:
            self._obj = zlib.decompressobj(self._wbits)  # the next gzip member
        else:
            self._done, self._input = True, b""  # trailing bytes: ignored, as curl does

    def finished(self) -> bool:
        # An empty body is complete; a started stream must have reached its end.
        return not self._seen or self._done or (self._obj is not None and self._obj.eof)


def _zlib_header(head: bytes) -> bool:
    """RFC 1950: CM 8 (deflate), a window of at most 32 KiB, and the check bits."""
    cmf, flg = head[0], head[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0


class _Brotli:
    """``br`` through a Brotli library whose decoder can bound each output."""

    name = "br"

    def __init__(self, module: Any) -> None:
        self._obj = module.Decompressor()
        self._process = getattr(self._obj, "process", None) or self._obj.decompress
        self._input = b""
        self._seen = False

    def feed(self, data: bytes) -> None:
        if data:
            self._seen = True
            self._input += data

    def read(self, size: int) -> bytes:
        if self._obj.is_finished():
            self._input = b""
            return b""
        if not self._obj.can_accept_more_data():  # output from earlier input is waiting
            return bytes(self._process(b"", output_buffer_limit=size))
        if not self._input:
            return b""
        data, self._input = self._input, b""
        return bytes(self._process(data, output_buffer_limit=size))

    def finished(self) -> bool:
        return not self._seen or bool(self._obj.is_finished())


_BROTLI: list[Any] = []


def _brotli() -> Any | None:
    """The first Brotli module whose decoder bounds its output, or None (checked once)."""
    if not _BROTLI:
        found = None
        for name in _BROTLI_MODULES:
            try:
                module = importlib.import_module(name)
                probe = module.Decompressor()
                process = getattr(probe, "process", None) or probe.decompress
                process(b"", output_buffer_limit=1)  # older versions: TypeError
                probe.can_accept_more_data()
                probe.is_finished()
            except Exception:  # noqa: BLE001, S112 - not installed, or too old to be bounded
                continue
            found = module
            break
        _BROTLI.append(found)
    return _BROTLI[0]
