"""The HTTP/1.1 response parser with no socket: every framing and every error, fed whole, byte
by byte and in odd splits, must give the same head, body, reuse verdict or error.

The blocking wire (fetch/http11.py) and a non-blocking engine drive this same parser, so a
split that only a selector loop would produce is tested here, not left to chance.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import pytest

from fetchpool.errors import FetchError
from fetchpool.fetch.h1 import (
    HEAD_READ,
    TRAILER_LIMIT,
    Head,
    ResponseParser,
    WireError,
    request_bytes,
)
from fetchpool.models import ErrorCode

Splitter = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def bytewise(data: bytes) -> Iterator[bytes]:
    for n in range(len(data)):
        yield data[n : n + 1]


def odd(data: bytes) -> Iterator[bytes]:
    """Pieces of 3, 7, 1, 11 ... bytes: cuts inside CRLFs, size lines and the blank line."""
    sizes = [3, 7, 1, 11, 2, 5]
    at = n = 0
    while at < len(data):
        yield data[at : at + sizes[n % len(sizes)]]
        at += sizes[n % len(sizes)]
        n += 1


def scattered(data: bytes) -> Iterator[bytes]:
    rng = random.Random(len(data))
    at = 0
    while at < len(data):
        step = rng.randint(1, 40)
        yield data[at : at + step]
        at += step


SPLITS = pytest.mark.parametrize("split", [whole, bytewise, odd, scattered])


def run(
    payload: bytes, split: Splitter, *, budget: int = HEAD_READ, size: int = 5
) -> tuple[Head, bytes, bool]:
    """Feed ``payload`` in ``split``'s pieces (then the end of the stream) as a driver
    would, only when the parser asks: (head, body, reusable)."""
    parser = ResponseParser(budget)
    pieces = split(payload)
    ended = False

    def pump() -> None:
        nonlocal ended
        assert not ended, "the parser asked for more after the end of the stream"
        piece = next(pieces, None)
        if piece is None:
            ended = True
            parser.feed_eof()
        else:
            parser.feed(piece)

    while (head := parser.next_head()) is None:
        pump()
    body = bytearray()
    while (data := parser.read(size)) != b"":
        if data is None:
            pump()
        else:
            assert 0 < len(data) <= size
            body += data
    return head, bytes(body), parser.reusable


def failure(payload: bytes, split: Splitter, **kwargs: int) -> WireError:
    with pytest.raises(WireError) as info:
        run(payload, split, **kwargs)
    return info.value


def ok(body: bytes, *fields: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- framings ---------------------------------------------------------------------------------


@SPLITS
@pytest.mark.parametrize(
    ("payload", "body", "reusable"),
    [
        (ok(b"hello"), b"hello", True),
        (ok(b""), b"", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
         + ok(b"final"), b"final", True),
        (b"HTTP/1.1 200 OK\nContent-Length: 5\nX-Bare-LF: yes\n\nfinal", b"final", True),
        (b"HTTP/1.1 200 OK\nContent-Length: 5\n\r\nfinal", b"final", True),
        (b"HTTP/1.1 200 OK\nContent-Length: 9\n\nfi\r\n\r\nnal", b"fi\r\n\r\nnal", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"2;ext=1\r\nfi\r\n3\r\nnal\r\n0\r\nX-Trailer: t\r\n\r\n", b"final", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nfi\n3\nnal\n0\n\n",
         b"final", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"a\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\n\r\n", b"0123456789abcdefghij", True),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end", False),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b"until the end", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzipped", b"zipped", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye", b"bye", False),
        (ok(b"bye", "Connection: close"), b"bye", False),
        (ok(b"bye", "Connection: keep-alive, Close"), b"bye", False),
        (b"HTTP/1.1 404 X\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         b"", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", b"", True),
    ],
    ids=["length", "empty", "interim-1xx", "bare-lf", "mixed-line-ends", "blank-in-body",
         "chunked-ext-trailers", "chunked-lf", "chunked-hex", "http10-until-close",
         "until-close", "other-coding", "http10-length", "connection-close", "close-token",
         "cl-and-chunked", "204", "304"],
)  # fmt: skip
def test_framings(split: Splitter, payload: bytes, body: bytes, reusable: bool) -> None:
    head, got, reuse = run(payload, split)
    assert (got, reuse) == (body, reusable)
    assert head.status in (200, 204, 304, 404)


def test_bytes_after_the_body_poison_the_connection() -> None:
    """A second, unasked answer fed with the first must never be read as the next one's
    (bytes that arrive later are the driver's to notice: http11 polls before reuse)."""
    assert run(ok(b"good") + ok(b"EVIL"), whole) == (run(ok(b"good"), whole)[0], b"good", False)


@SPLITS
def test_the_head_fields(split: Splitter) -> None:
    payload = (
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: /b\r\nX-Folded: a\r\n  b\r\n"
        b"X-Robots-Tag: otherbot: noai\r\nx-robots-tag: noml\r\nContent-Length: 0\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    head, _, _ = run(payload, split)
    assert (head.status, head.version, head.reason) == (301, 11, "Moved Permanently")
    assert head.headers["location"] == "/b"
    assert head.headers["x-folded"] == "a b"
    assert head.headers["x-robots-tag"] == "otherbot: noai, noml"
    assert head.get_all("x-robots-tag") == ["otherbot: noai", "noml"]
    assert head.get_all("location") == ["/b"] and head.get_all("absent") == []
    assert head.repeated == {"x-robots-tag": ["otherbot: noai", "noml"]}


def test_no_reason_and_http10() -> None:
    head, _, _ = run(b"HTTP/1.0 200\r\nContent-Length: 0\r\n\r\n", whole)
    assert (head.status, head.version, head.reason) == (200, 10, "")


def test_length_remaining_and_want_never_pass_the_body() -> None:
    parser = ResponseParser(HEAD_READ)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert parser.next_head() is not None
    assert parser.length_remaining == 10
    assert parser.read(100) == b"abc"
    assert parser.length_remaining == 7
    assert parser.read(100) is None
    assert parser.want(1 << 20) == 7  # never asks the kernel for the next answer's bytes
    assert parser.want(4) == 4
    parser.feed(b"defghij")
    assert parser.read(100) == b"defghij"
    assert parser.read(100) == b"" and parser.reusable


def test_want_keeps_the_head_within_its_budget() -> None:
    parser = ResponseParser(100)
    assert parser.want(1 << 20) == 101  # one byte past the budget proves it is exceeded
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    assert parser.next_head() is None
    assert parser.want(1 << 20) == 101 - 17


def test_received_counts_every_byte_fed() -> None:
    parser = ResponseParser(HEAD_READ)
    assert parser.received == 0  # a reused connection that said nothing is stale
    parser.feed(b"HTTP/1.1 2")
    assert parser.received == 10


def test_interim_answers_spend_the_header_budget() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"  # 41 bytes
    payload = interim * 3 + ok(b"x")
    assert run(payload, whole, budget=200)[1] == b"x"
    error = failure(payload, whole, budget=150)
    assert error.message == "protocol error: response headers exceed the size limit"


# -- errors: the same code and message whatever the split -------------------------------------


@SPLITS
@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"HTTP/2 200 OK\r\nContent-Length: 1\r\n\r\nx", ErrorCode.PROTOCOL_ERROR,
         "protocol error: not an HTTP/1.x status line: 'HTTP/2 200 OK\\r'"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: not an HTTP/1.x status line: 'SSH-2.0-OpenSSH'"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: invalid status code '2000'"),
        (b"HTTP/1.1 099 OK\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: invalid status code '099'"),
        (b"HTTP/1.1 200 OK\r\nBad Header: 1\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: invalid header line 'Bad Header: 1'"),
        (b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: invalid header line 'NoColon'"),
        (b"HTTP/1.1 200 OK\r\n folded\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: header continuation without a header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
         ErrorCode.PROTOCOL_ERROR,
         "protocol error: conflicting Content-Length headers '1', '2'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nx", ErrorCode.PROTOCOL_ERROR,
         "protocol error: invalid Content-Length '-1'"),
        (b"", ErrorCode.PROTOCOL_ERROR,
         "protocol error: server closed the connection without a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", ErrorCode.PROTOCOL_ERROR,
         "protocol error: server closed the connection in the middle of the headers"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", ErrorCode.PROTOCOL_ERROR,
         "protocol error: server closed the connection without a response"),
        (ok(b"abc", status="200 OK")[:-1], ErrorCode.INCOMPLETE_BODY, "got 2 of 3 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", ErrorCode.INCOMPLETE_BODY,
         "got 0 of 1000 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: invalid chunk size b'-1'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: invalid chunk size b'0x5'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n12345678901234567\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: invalid chunk size b'12345678901234567'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n0\r\n\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: chunk not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz\r\n0\r\n\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: chunk framing line too long"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000 + b"\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: chunk framing line too long"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
         ErrorCode.PROTOCOL_ERROR, "protocol error: chunked body ended before its last chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: chunked body ended before its last chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n",
         ErrorCode.PROTOCOL_ERROR, "protocol error: chunked body ended before its last chunk"),
    ],
    ids=["http2", "not-http", "4-digit-status", "leading-zero-status", "space-in-name",
         "no-colon", "fold-first", "conflicting-length", "negative-length", "empty-reply",
         "cut-headers", "only-interim", "short-body", "no-body", "negative-chunk",
         "hex-prefix-chunk", "17-digit-chunk", "chunk-overrun", "chunk-overrun-long",
         "chunk-line-too-long", "cut-in-chunk", "cut-after-chunk", "cut-in-trailers"],
)  # fmt: skip
def test_errors(split: Splitter, payload: bytes, code: ErrorCode, message: str) -> None:
    error = failure(payload, split)
    assert (error.code, error.message) == (code, message)


@SPLITS
def test_a_head_past_its_budget(split: Splitter) -> None:
    payload = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 5000 + b"\r\nContent-Length: 0\r\n\r\n"
    assert run(payload, split, budget=len(payload))[0].status == 200
    error = failure(payload, split, budget=len(payload) - 1)
    assert error.message == "protocol error: response headers exceed the size limit"


@SPLITS
def test_trailers_past_their_limit(split: Splitter) -> None:
    trailer = b"X-T: " + b"t" * 1000 + b"\r\n"
    within = trailer * (TRAILER_LIMIT // len(trailer))
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    if split is not bytewise:  # 64 KB byte by byte is slow and proves nothing more
        assert run(chunked + within + b"\r\n", split)[1] == b"x"
    error = failure(chunked + within + trailer + b"\r\n", split if split is not bytewise else odd)
    assert error.message == "protocol error: chunked trailers exceed the size limit"


def test_endless_trailer_line_is_refused_before_its_end() -> None:
    parser = ResponseParser(HEAD_READ)
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: ")
    assert parser.next_head() is not None
    parser.feed(b"a" * TRAILER_LIMIT)
    with pytest.raises(WireError, match="trailers exceed the size limit"):
        parser.read(10)


def test_a_body_is_handed_out_in_pieces_no_larger_than_asked() -> None:
    parser = ResponseParser(HEAD_READ)
    parser.feed(ok(b"0123456789"))
    assert parser.next_head() is not None
    assert [parser.read(4), parser.read(4), parser.read(4), parser.read(4)] == [
        b"0123",
        b"4567",
        b"89",
        b"",
    ]


# -- the request ------------------------------------------------------------------------------


def test_request_bytes() -> None:
    fields = {"user-agent": ("User-Agent", "fp/1"), "accept": ("Accept", "*/*")}
    assert request_bytes("/a?b=1", "example.test:8080", fields) == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: example.test:8080\r\nUser-Agent: fp/1\r\nAccept: */*\r\n\r\n"
    )
    given = {"host": ("Host", "other.test")}
    assert request_bytes("http://a.test/", "a.test", given) == (
        b"GET http://a.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n"
    )


def test_request_bytes_refuse_what_http11_cannot_carry() -> None:
    with pytest.raises(FetchError) as info:
        request_bytes("/\u20ac", "a.test", {})
    assert info.value.code is ErrorCode.INVALID_URL
