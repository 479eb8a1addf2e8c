"""HTTP/1.1 as bytes in and events out: the response parser and the request's bytes, no I/O.

A driver moves the bytes: the blocking one (:mod:`fetchpool.fetch.http11`) calls ``recv``
and feeds what came, a non-blocking one feeds what a selector loop read. Both get the same
framing rules and the same :class:`WireError` for the same bytes, however they were split::

    parser = ResponseParser(header_budget)
    parser.feed(data) / parser.feed_eof()      # as bytes arrive, or the peer closes
    parser.next_head()  -> Head | None          # None: feed more (interim 1xx are skipped)
    parser.read(size)   -> bytes | None         # body bytes; b"" at the message's end;
                                                # None: feed more
    parser.reusable                             # after b"": may the connection be reused?
    parser.want(size)                           # how many bytes to ask the kernel for next

Framing (RFC 9112 6.3): no body for 204 and 304; a chunked final transfer coding; else
Content-Length; else the body runs to the connection's end. Limits are the reader's: the
head within ``header_budget`` bytes (interim answers included), a chunk-size line within
:data:`MAX_CHUNK_LINE`, trailers within :data:`TRAILER_LIMIT`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

from fetchpool.errors import FetchError
from fetchpool.models import ErrorCode

__all__ = [
    "BLANK_LINE",
    "HEAD_READ",
    "MAX_CHUNK_LINE",
    "TRAILER_LIMIT",
    "Head",
    "ResponseParser",
    "WireError",
    "parse_head",
    "protocol_error",
    "request_bytes",
]

#: Bytes asked of the kernel per read while looking for the end of the headers: a small
#: response (headers + body) usually arrives in one read.
HEAD_READ = 64 * 1024
#: A chunk-size line longer than this is not a chunk size.
MAX_CHUNK_LINE = 4096
#: The trailer fields after the last chunk, all lines together.
TRAILER_LIMIT = 64 * 1024

_NO_BODY_STATUSES = frozenset({204, 304})
#: The end of a head: the first empty line (bare LF line ends are tolerated).
BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

_LINE_TOO_LONG = "chunk framing line too long"
_TRAILERS_TOO_LONG = "chunked trailers exceed the size limit"

# Parser states: what the next bytes are.
_HEAD, _LENGTH, _UNTIL_CLOSE, _SIZE_LINE, _CHUNK, _CHUNK_END, _TRAILERS, _DONE = range(8)


class WireError(FetchError):
    """A transport failure, already classified (connect, TLS, timeout, protocol)."""


def protocol_error(message: str) -> WireError:
    return WireError(ErrorCode.PROTOCOL_ERROR, f"protocol error: {message}")


def _ended_in_chunks() -> WireError:
    return protocol_error("chunked body ended before its last chunk")


class Head(NamedTuple):
    """A response's status line and fields.

    ``headers`` maps lowercased names to values, a repeated field's values joined with
    ``", "`` (RFC 9110 5.3); ``repeated`` keeps each line's value apart for the fields that
    came more than once (None when none did), for readers of fields whose values are not
    plain lists (an ``X-Robots-Tag: bot: rule`` scope ends with its line).
    """

    status: int
    version: int  # 11 or 10
    reason: str
    headers: dict[str, str]
    repeated: dict[str, list[str]] | None = None

    def get_all(self, name: str) -> list[str]:
        """Every value of the field ``name`` (lowercase), one per header line, in order."""
        if self.repeated is not None and name in self.repeated:
            return list(self.repeated[name])
        value = self.headers.get(name)
        return [] if value is None else [value]


def parse_head(head: bytes) -> Head:
    """The status line and fields of ``head`` (without its blank line); bare LF line ends
    and obsolete line folding are tolerated, as http.client does."""
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(None, 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        shown = lines[0][:60].decode("latin-1")
        raise protocol_error(f"not an HTTP/1.x status line: {shown!r}")
    code = parts[1]
    if len(code) != 3 or not code.isdigit() or code[0:1] == b"0":
        raise protocol_error(f"invalid status code {code[:10].decode('latin-1')!r}")
    version = 11 if parts[0] == b"HTTP/1.1" else 10
    reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    repeated: dict[str, list[str]] | None = None
    name = ""
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        if line[0] in b" \t":  # obsolete line folding: a continuation of the previous value
            if not name:
                raise protocol_error("header continuation without a header")
            more = line.strip().decode("latin-1")
            headers[name] = f"{headers[name]} {more}"
            if repeated is not None and name in repeated:
                repeated[name][-1] = f"{repeated[name][-1]} {more}"
            continue
        field, colon, value = line.partition(b":")
        if not colon or not field or not _TOKEN.issuperset(field):
            raise protocol_error(f"invalid header line {line[:40].decode('latin-1')!r}")
        name = field.decode("ascii").lower()
        text = value.strip().decode("latin-1")
        known = headers.get(name)
        if known is None:
            headers[name] = text
        elif name == "content-length":
            if known != text:
                raise protocol_error(f"conflicting Content-Length headers {known!r}, {text!r}")
        else:
            headers[name] = f"{known}, {text}"
            repeated = _repeat(repeated, name, known, text)
    return Head(int(code), version, reason, headers, repeated)


def _repeat(
    repeated: dict[str, list[str]] | None, name: str, known: str, text: str
) -> dict[str, list[str]]:
    """Note another line of the field ``name``; ``known`` is its value so far, which at the
    second line is the first line's value."""
    if repeated is None:
        repeated = {}
    values = repeated.get(name)
    if values is None:
        repeated[name] = [known, text]
    else:
        values.append(text)
    return repeated


class ResponseParser:
    """One response, fed as its bytes arrive (see the module docstring for the calls).

    Bytes fed after the end of the message stay buffered: they make the connection
    unfit for reuse (:attr:`reusable`), as an answer nobody asked for must never be read
    as the next request's.
    """

    __slots__ = (
        "_budget",
        "_buf",
        "_eof",
        "_keep",
        "_left",
        "_length",
        "_searched",
        "_state",
        "_trailers",
        "head",
        "received",
    )

    def __init__(self, header_budget: int) -> None:
        self._buf = bytearray()
        self._eof = False
        self._budget = header_budget
        self._searched = 0  # where the next search for a line end starts
        self._state = _HEAD
        self._keep = False
        self._length: int | None = None  # the announced Content-Length
        self._left = 0  # of the Content-Length, or of the current chunk
        self._trailers = 0  # trailer bytes so far
        self.head: Head | None = None
        #: Bytes fed so far: none means the peer said nothing at all (a stale connection).
        self.received = 0

    def feed(self, data: bytes) -> None:
        """Bytes that arrived, in order."""
        self._buf += data
        self.received += len(data)

    def feed_eof(self) -> None:
        """The peer closed the connection: no more bytes will come."""
        self._eof = True

    @property
    def reusable(self) -> bool:
        """The message ended, the server keeps the connection, and nothing came after it."""
        return self._state == _DONE and self._keep and not self._buf and not self._eof

    @property
    def length_remaining(self) -> int | None:
        """Body bytes still to come by the Content-Length; None for chunked or until-close."""
        return self._left if self._length is not None else None

    def want(self, size: int) -> int:
        """Bytes to ask the kernel for next, when :meth:`read` wanted ``size`` body bytes:
        never past a Content-Length or a chunk, never past the header budget."""
        state = self._state
        if state in (_LENGTH, _CHUNK):
            return max(1, min(size, self._left))
        if state == _HEAD:
            return max(1, min(HEAD_READ, self._budget + 1 - len(self._buf)))
        return size if state == _UNTIL_CLOSE else HEAD_READ

    def next_head(self) -> Head | None:
        """The final answer's head once it is complete (interim 1xx answers skipped)."""
        while self._state == _HEAD:
            buf = self._buf
            # The first empty line ends the head; only new bytes (and 3 before them) are
            # searched, so a head arriving byte by byte costs linear time.
            blank = BLANK_LINE.search(buf, max(0, self._searched - 3))
            if blank is None:
                if len(buf) > self._budget:
                    raise protocol_error("response headers exceed the size limit")
                if self._eof:
                    what = "without a response" if not buf else "in the middle of the headers"
                    raise protocol_error(f"server closed the connection {what}")
                self._searched = len(buf)
                return None
            end, cut = blank.span()
            if cut > self._budget:
                raise protocol_error("response headers exceed the size limit")
            head = parse_head(bytes(buf[:end]))
            del buf[:cut]
            self._searched = 0
            self._budget -= cut
            if not (100 <= head.status < 200 and head.status != 101):
                self._frame(head)  # else an interim answer (100, 103): the real one follows
        return self.head

    def _frame(self, head: Head) -> None:
        """Choose the body's framing from the final head (RFC 9112 6.3)."""
        self.head = head
        headers = head.headers
        self._keep = head.version == 11 and "close" not in headers.get("connection", "").lower()
        encoding = headers.get("transfer-encoding")
        if encoding is not None and "content-length" in headers:
            self._keep = False  # ambiguous framing: never reuse the connection
        if head.status in _NO_BODY_STATUSES:
            self._length, self._state = 0, _DONE
        elif encoding is not None:
            if encoding.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._state = _SIZE_LINE
            else:  # any other final coding runs to the connection's end
                self._keep, self._state = False, _UNTIL_CLOSE
        elif "content-length" in headers:
            declared = headers["content-length"]
            if not declared.isdigit() or not declared.isascii():
                raise protocol_error(f"invalid Content-Length {declared[:20]!r}")
            self._length = self._left = int(declared)
            self._state = _LENGTH if self._left else _DONE
        else:
            self._keep, self._state = False, _UNTIL_CLOSE  # the body ends when the server closes

    def read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes of the body; ``b""`` at its end; None when more bytes (or
        the end of the stream) must be fed first. A body cut short of its Content-Length
        raises ``incomplete_body``; broken chunked framing raises ``protocol_error``."""
        state = self._state
        if state == _LENGTH:
            if self._buf:
                return self._take(size, _DONE)
            if self._eof:
                length = self._length or 0
                got = length - self._left
                raise WireError(ErrorCode.INCOMPLETE_BODY, f"got {got} of {length} bytes")
            return None
        if state == _DONE:
            return b""
        if state == _UNTIL_CLOSE:
            return self._read_until_close(size)
        if state == _HEAD:
            raise RuntimeError("read() before next_head() gave the head")
        return self._read_chunked(size)

    def _read_until_close(self, size: int) -> bytes | None:
        if self._buf:
            data = bytes(self._buf[:size])
            del self._buf[:size]
            return data
        if self._eof:
            self._state = _DONE
            return b""
        return None

    def _take(self, size: int, after: int) -> bytes:
        buf = self._buf
        n = min(size, self._left)
        if n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self._left -= len(data)
        if not self._left:
            self._state = after
        return data

    def _read_chunked(self, size: int) -> bytes | None:
        while True:
            state = self._state
            if state == _CHUNK:
                if self._buf:
                    return self._take(size, _CHUNK_END)
                if self._eof:
                    raise _ended_in_chunks()
                return None
            if state == _DONE:
                return b""
            if state == _TRAILERS:
                line = self._line(TRAILER_LIMIT - self._trailers - 1, _TRAILERS_TOO_LONG)
                if line is None:
                    return None
                self._trailers += len(line)
                if not line.strip():
                    self._state = _DONE
                continue
            # A chunk's data ends with CRLF; a size line starts each chunk.
            limit = 2 if state == _CHUNK_END else MAX_CHUNK_LINE
            line = self._line(limit, _LINE_TOO_LONG)
            if line is None:
                return None
            if state == _CHUNK_END:
                if line.strip():
                    raise protocol_error("chunk not followed by CRLF")
                self._state = _SIZE_LINE
                continue
            self._size_line(line)

    def _size_line(self, line: bytes) -> None:
        text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(text):
            raise protocol_error(f"invalid chunk size {text[:20]!r}")
        self._left = int(text, 16)
        self._state = _CHUNK if self._left else _TRAILERS

    def _line(self, limit: int, too_long: str) -> bytes | None:
        """The next line (with its LF) once complete; a line longer than ``limit`` bytes
        before its LF is refused (``too_long``) whether or not its end has arrived, so the
        answer does not depend on how the bytes were split."""
        buf = self._buf
        end = buf.find(b"\n", self._searched)
        if end == -1:
            if len(buf) > limit:
                raise protocol_error(too_long)
            if self._eof:
                raise _ended_in_chunks()
            self._searched = len(buf)
            return None
        if end > limit:
            raise protocol_error(too_long)
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        self._searched = 0
        return line


def request_bytes(target: str, host: str, fields: Mapping[str, tuple[str, str]]) -> bytes:
    """A GET for ``target`` (the request line's URI: a path, or a whole URL for a proxy):
    request line, ``Host: host`` unless ``fields`` (by lowercased name: name as sent, value)
    has one, then the fields in order. Raises ``invalid_url`` for characters HTTP/1.1 cannot
    carry (the config refuses CR, LF and NUL in fields, so nothing can split the request)."""
    lines = [f"GET {target} HTTP/1.1"]
    if "host" not in fields:
        lines.append(f"Host: {host}")
    lines.extend(f"{name}: {value}" for name, value in fields.values())
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise FetchError(
            ErrorCode.INVALID_URL, "request has characters that HTTP/1.1 cannot carry"
        ) from None
