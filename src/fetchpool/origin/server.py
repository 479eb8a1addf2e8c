"""The embedded origin: a local asyncio HTTP/1.1 server with images and every fault we test.

There is no internet here, so this is the only origin the demo, the integration tests, the lab
and the benchmarks have. It runs in a background thread (default) or in a child process
(``Origin(process=True)``, so a client under test does not share the GIL with it)::

    with Origin(latency=0.05) as origin:
        url = origin.image_url(7)              # http://127.0.0.1:PORT/img/7.jpg
        expected = origin.image_bytes(7)       # exactly the bytes served
        ...
        origin.requests("/img/")               # what the server saw

Endpoints (``n``, ``k``, ``code`` are integers; every path accepts ``?latency=SECONDS``, which
replaces the configured latency and jitter for that request; ``?n=`` picks the image where the
path has no image index, default 0):

==============================  =================================================================
``/img/{n}.jpg|.png|.webp``     image ``n`` (``/img/{n}``: the JPEG, Content-Type image/jpeg)
``/small/{n}.jpg|.png|.webp``   a tiny version of image ``n`` (about 64x48 to 102x76)
``/sized/{W}x{H}.jpg|.png|.webp`` a W x H gradient image (at most 4 Mpx); ``?exif=1`` adds a
                                camera-like EXIF block, ``?orientation=K`` the EXIF orientation
``/bytes/{n}``                  ``n`` deterministic bytes, application/octet-stream
``/html`` (also ``/``)          a small text/html page linking a few images
``/headers``                    JSON object of the request headers (names lower-cased)
``/status/{code}``              that status, small HTML body; ``?retry_after=V`` adds Retry-After
``/flaky/{key}/{k}/{code}``     the first ``k`` requests for ``key`` answer ``code``, then 200 image
``/retry-after/{key}/{value}``  first request per ``key``: 429 with ``Retry-After: value``
                                (seconds or a percent-encoded HTTP-date), then 200 image
``/redirect/{n}``               a chain of ``n`` 302s (relative Location) ending at an image
``/redirect-abs/{n}``           the same with absolute-URL Locations
``/redirect-loop``              302 to itself, forever
``/redirect-to?url=U&code=302`` a redirect to any Location (file:, ftp:, internal, ...)
``/truncated``                  Content-Length 1000, 500 bytes (a JPEG's start), then close
``/drip?bytes=N&interval=S``    Content-Length N, one byte every S seconds (defaults 10, 1.0)
``/reset``                      headers and part of the body, then a TCP RST (SO_LINGER 0)
``/huge-length``                ``Content-Length: 10000000000000``, 64 KiB, then close
``/endless?seconds=S``          200 without length, body until the client leaves (S, max 60 s)
``/empty``                      closes the connection without a reply
``/garbage``                    non-HTTP bytes, then close
``/hang``                       reads the request, never answers (until ``stop()``)
``/disposition``                image with ``Content-Disposition: attachment;
                                filename="../../evil.sh"``
``/two-lengths``                two conflicting Content-Length headers (100 and 200)
``/gzip``                       the image gzip-compressed, ``Content-Encoding: gzip``
``/not-image``                  200 ``image/jpeg`` whose body is HTML
``/opt-out/{n}?robots=V&tdm=V``  image ``n`` with one ``X-Robots-Tag: V`` per ``robots`` (say
                                ``noai`` or ``fetchpool: noai``) and ``tdm-reservation: V``
anything else                   404 with an HTML body
==============================  =================================================================

Per-key counters (``/flaky``, ``/retry-after``) and the request log are cleared by
:meth:`Origin.reset_counters`. Each response is pre-built bytes written in at most a few large
writes; latency and bandwidth limits only ever ``await asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import gzip
import http
import itertools
import json
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fetchpool.origin import images

__all__ = ["ENDPOINTS", "Origin", "RequestLog", "image_url_for"]

#: The endpoints, for ``fetchpool serve --help`` (keep in step with the module docstring).
ENDPOINTS: Final = (
    ("/img/{n}.jpg|.png|.webp", "image n (/img/{n}: the JPEG)"),
    ("/small/{n}.jpg|.png|.webp", "tiny version of image n"),
    ("/sized/{W}x{H}.jpg|.png|.webp", "W x H image; ?exif=1 adds EXIF, ?orientation=K"),
    ("/bytes/{n}", "n deterministic bytes"),
    ("/html", "small HTML page (also /)"),
    ("/headers", "JSON echo of the request headers"),
    ("/status/{code}", "that status; ?retry_after=V adds Retry-After"),
    ("/flaky/{key}/{k}/{code}", "first k requests per key answer code, then 200 image"),
    ("/retry-after/{key}/{value}", "first request per key: 429 Retry-After: value, then image"),
    ("/redirect/{n}", "chain of n 302s ending at an image"),
    ("/redirect-abs/{n}", "the same with absolute Locations"),
    ("/redirect-loop", "302 to itself"),
    ("/redirect-to?url=U&code=302", "redirect to any Location"),
    ("/truncated", "Content-Length 1000, 500 bytes, close"),
    ("/drip?bytes=N&interval=S", "one byte every S seconds"),
    ("/reset", "part of the body, then TCP RST"),
    ("/huge-length", "Content-Length: 10000000000000, then close"),
    ("/endless?seconds=S", "body without length until the client leaves (max 60 s)"),
    ("/empty", "close without a reply"),
    ("/garbage", "non-HTTP bytes"),
    ("/hang", "never answers"),
    ("/disposition", 'image with Content-Disposition filename="../../evil.sh"'),
    ("/two-lengths", "two conflicting Content-Length headers"),
    ("/gzip", "image with Content-Encoding: gzip"),
    ("/not-image", "image/jpeg whose body is HTML"),
    ("/opt-out/{n}?robots=V&tdm=V", "image n with X-Robots-Tag: V (repeatable), tdm-reservation"),
)

_HEAD_LIMIT: Final = 64 * 1024  # request head bytes before 431
_BODY_LIMIT: Final = 16 * 1024 * 1024  # request bodies are read and discarded up to this
_BACKLOG: Final = 2048
_ENDLESS_MAX: Final = 60.0
_STOP_TIMEOUT: Final = 5.0
_START_TIMEOUT: Final = 30.0
_CHUNK: Final = 64 * 1024
_SERVER_NAME: Final = "fetchpool-origin"
_MAX_INDEX: Final = 10**18 - 1  # path indexes have at most 18 digits too


@dataclass(frozen=True, slots=True)
class RequestLog:
    """One request as the origin saw it.

    ``path`` is the request target as sent (query string included); header names are
    lower-cased (repeated headers joined with ", "); ``time`` is ``time.time()`` when the
    request head was read; ``conn`` numbers the TCP connection (1, 2, ...), so requests sharing
    a ``conn`` prove keep-alive reuse.
    """

    method: str
    path: str
    headers: dict[str, str]
    time: float
    conn: int = 0


@dataclass(frozen=True, slots=True)
class _Settings:
    host: str
    port: int
    latency: float
    jitter: float
    bandwidth: int | None
    seed: int
    max_log: int
    tls_cert: str | None = None  # PEM certificate chain and key: serve HTTPS
    tls_key: str | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    keep_alive: bool
    body_length: int

    def arg(self, name: str, default: float) -> float:
        """A numeric query argument; malformed values fall back to the default."""
        try:
            value = float(self.query.get(name, default))
        except ValueError:
            return default
        return value if math.isfinite(value) else default

    def image_index(self) -> int:
        """The ``?n=`` image index (default 0), clamped to what every format can tag."""
        return min(max(0, int(self.arg("n", 0))), _MAX_INDEX)


class _BadRequestError(Exception):
    pass


def _parse_head(head: bytes) -> _Request:
    """Parse a request head (request line + headers, CRLF CRLF included)."""
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequestError(lines[0][:100])
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequestError(line[:100])
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, raw_query = target.partition("?")
    query = dict(urllib.parse.parse_qsl(raw_query)) if raw_query else {}
    connection = headers.get("connection", "").lower()
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    try:
        body_length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequestError("bad Content-Length") from exc
    if body_length < 0:
        raise _BadRequestError("negative Content-Length")
    if "transfer-encoding" in headers:
        keep_alive = False  # chunked request bodies are not parsed: answer, then close
    return _Request(method, target, path, query, headers, keep_alive, body_length)


def _head(status: int, headers: list[tuple[str, str]], keep_alive: bool) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Server: {_SERVER_NAME}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_page(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"<!doctype html><title>{status}</title><h1>{status} {reason}</h1>\n".encode()


def _safe_header_value(value: str) -> bool:
    """Values taken from the URL go into headers: refuse CR/LF (header injection)."""
    return "\r" not in value and "\n" not in value


@functools.lru_cache(maxsize=64)
def _gzipped_image(n: int, seed: int) -> bytes:
    # mtime=0 keeps the gzip header, hence the bytes, deterministic.
    return gzip.compress(images.image_bytes(n, seed), compresslevel=6, mtime=0)


_INDEX_PAGE: Final = (
    "<!doctype html><html><head><meta charset='utf-8'><title>fetchpool origin</title></head>"
    "<body><h1>fetchpool origin</h1><ul>"
    + "".join(
        f"<li><a href='/img/{n}.jpg'><img src='/small/{n}.jpg' alt='{n}'></a></li>"
        for n in range(8)
    )
    + "</ul></body></html>\n"
).encode()
_NOT_IMAGE: Final = b"<!doctype html><title>not an image</title><p>This is HTML, not a JPEG.</p>\n"
_GARBAGE: Final = b"\x00\xff\xfe\x16\x03SSH-2.0-NotHTTP\r\n\x89garbage\x00" + bytes(range(256))
_HOSTILE_DISPOSITION: Final = 'attachment; filename="../../evil.sh"'

_Writer = asyncio.StreamWriter
_Handler = Callable[[_Request, list[str], _Writer], Awaitable[bool]]


class _App:
    """Everything that runs on the event loop: connections, routing, counters, request log.

    Handlers return True when the connection may serve another request (keep-alive).
    """

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self._log: collections.deque[RequestLog] = collections.deque(maxlen=settings.max_log)
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()  # the log and counters are read from other threads
        self._conn_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()
        self._warm: set[tuple[int, str, bool]] = set()
        self._warming: dict[tuple[int, str, bool], asyncio.Future[bytes]] = {}
        self._routes: dict[str, _Handler] = {
            "": self._index,
            "img": self._img,
            "small": self._small,
            "sized": self._sized,
            "bytes": self._bytes,
            "html": self._index,
            "headers": self._headers,
            "status": self._status,
            "flaky": self._flaky,
            "retry-after": self._retry_after,
            "redirect": self._redirect,
            "redirect-abs": self._redirect,
            "redirect-loop": self._redirect_loop,
            "redirect-to": self._redirect_to,
            "truncated": self._truncated,
            "drip": self._drip,
            "reset": self._reset,
            "huge-length": self._huge_length,
            "endless": self._endless,
            "empty": self._empty,
            "garbage": self._garbage,
            "hang": self._hang,
            "disposition": self._disposition,
            "two-lengths": self._two_lengths,
            "gzip": self._gzip,
            "not-image": self._not_image,
            "opt-out": self._opt_out,
        }

    # --- shared state (any thread) -----------------------------------------------------------

    def requests(self, path_prefix: str | None = None) -> list[RequestLog]:
        with self._lock:
            logs = list(self._log)
        if path_prefix is None:
            return logs
        return [log for log in logs if log.path.startswith(path_prefix)]

    def reset(self) -> None:
        with self._lock:
            self._counters.clear()
            self._log.clear()

    def _bump(self, key: str) -> int:
        with self._lock:
            count = self._counters.get(key, 0) + 1
            self._counters[key] = count
            return count

    # --- connections -------------------------------------------------------------------------

    async def serve_connection(self, reader: asyncio.StreamReader, writer: _Writer) -> None:
        """One TCP connection: requests in sequence until close, error or stop()."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = next(self._conn_ids)
        try:
            while await self._one_request(reader, writer, conn):
                pass
            writer.close()
            await writer.wait_closed()  # flush what is buffered; stop() cancels a slow reader
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away: nobody is left to answer
        except asyncio.CancelledError:
            # stop() cancels us. Ending normally (not re-raising) is deliberate: Python 3.11's
            # start_server callback calls task.exception() on a cancelled task and logs a
            # spurious traceback for every connection open at stop().
            pass
        finally:
            # After a clean close this is a no-op; on cancellation it drops the socket at once.
            writer.transport.abort()
            if task is not None:
                self._tasks.discard(task)

    async def shutdown(self) -> None:
        """Cancel every connection (hanging, dripping and endless ones included)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)

    async def _one_request(self, reader: asyncio.StreamReader, writer: _Writer, conn: int) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between two requests: the normal end of keep-alive
        except asyncio.LimitOverrunError:
            return await self._reply(writer, None, 431, _error_page(431))
        try:
            req = _parse_head(head)
        except _BadRequestError:
            return await self._reply(writer, None, 400, _error_page(400))
        with self._lock:
            self._log.append(RequestLog(req.method, req.target, req.headers, time.time(), conn))
        if req.body_length:
            if req.body_length > _BODY_LIMIT:
                return await self._reply(writer, None, 413, _error_page(413))
            await reader.readexactly(req.body_length)
        delay = self._delay(req)
        if delay > 0:
            await asyncio.sleep(delay)
        parts = req.path.split("/")[1:] or [""]  # "[""]": a target without "/" ends in a 404
        handler = self._routes.get(parts[0], self._not_found)
        return await handler(req, parts, writer) and req.keep_alive

    def _delay(self, req: _Request) -> float:
        if "latency" in req.query:
            return max(0.0, req.arg("latency", 0.0))
        jitter = self.settings.jitter
        return self.settings.latency + (self._rng.uniform(0.0, jitter) if jitter else 0.0)

    # --- writing -----------------------------------------------------------------------------

    async def _reply(
        self,
        writer: _Writer,
        req: _Request | None,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/html; charset=utf-8",
        extra: tuple[tuple[str, str], ...] = (),
        keep: bool = True,
    ) -> bool:
        """Send a complete response; return whether the connection stays open."""
        keep = keep and req is not None and req.keep_alive
        bodiless = status < 200 or status in (204, 304)
        headers = [("Content-Type", content_type)]
        if not bodiless:
            headers.append(("Content-Length", str(len(body))))
        head = _head(status, [*headers, *extra], keep)
        if bodiless or (req is not None and req.method == "HEAD"):
            body = b""
        if self.settings.bandwidth is None and len(body) < _CHUNK:
            writer.write(head + body)  # one segment for small responses
            await writer.drain()
        else:
            writer.write(head)
            await self._write_body(writer, body)
        return keep

    async def _write_body(self, writer: _Writer, body: bytes | memoryview) -> None:
        """Write a body at full speed, or paced to ``bandwidth`` bytes/s (by sleeping)."""
        rate = self.settings.bandwidth
        if rate is None:
            writer.write(body)
            await writer.drain()
            return
        view = memoryview(body)
        step = max(1, rate // 20)  # ~20 writes a second: smooth, and cheap for the loop
        loop = asyncio.get_running_loop()
        start = loop.time()
        for offset in range(0, len(view), step):
            writer.write(view[offset : offset + step])
            await writer.drain()
            wait = start + (offset + step) / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _image_body(self, n: int, ext: str, small: bool) -> bytes:
        """Image bytes; drawing a new base picture happens off the loop, once."""
        key = (n % images.POOL_SIZE, ext, small)
        if key not in self._warm:
            future = self._warming.get(key)
            if future is None:
                job = functools.partial(images.image_bytes, n, self.settings.seed, ext, small=small)
                future = asyncio.get_running_loop().run_in_executor(None, job)
                self._warming[key] = future
            await asyncio.shield(future)  # one waiter cancelled must not cancel the others
            self._warm.add(key)
            self._warming.pop(key, None)
        return images.image_bytes(n, self.settings.seed, ext, small=small)

    async def _send_image(
        self, writer: _Writer, req: _Request, n: int, *extra: tuple[str, str]
    ) -> bool:
        body = await self._image_body(n, "jpg", False)
        return await self._reply(writer, req, 200, body, content_type="image/jpeg", extra=extra)

    # --- handlers ----------------------------------------------------------------------------

    async def _not_found(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return await self._reply(writer, req, 404, _error_page(404))

    async def _bad_request(self, req: _Request, writer: _Writer) -> bool:
        return await self._reply(writer, req, 400, _error_page(400))

    async def _index(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        if len(parts) > 1 or (parts[0] == "" and req.path != "/"):
            return await self._not_found(req, parts, writer)
        return await self._reply(writer, req, 200, _INDEX_PAGE)

    async def _img(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return await self._image(req, parts, writer, small=False)

    async def _small(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return await self._image(req, parts, writer, small=True)

    async def _image(
        self, req: _Request, parts: list[str], writer: _Writer, *, small: bool
    ) -> bool:
        stem, _, ext = parts[-1].partition(".") if len(parts) == 2 else ("", "", "")
        n = _index_or_none(stem)
        try:
            ext = images.normalize_ext(ext or "jpg")
        except ValueError:
            n = None
        if n is None:
            return await self._not_found(req, parts, writer)
        body = await self._image_body(n, ext, small)
        return await self._reply(writer, req, 200, body, content_type=images.CONTENT_TYPES[ext])

    async def _sized(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        stem, _, ext = parts[-1].partition(".") if len(parts) == 2 else ("", "", "")
        width, _, height = stem.partition("x")
        sides = (_index_or_none(width), _index_or_none(height))
        if sides[0] is None or sides[1] is None:
            return await self._not_found(req, parts, writer)
        job = functools.partial(
            images.sized_image_bytes,
            sides[0],
            sides[1],
            ext or "jpg",
            exif=req.arg("exif", 0) == 1,
            orientation=int(req.arg("orientation", 1)),
        )
        try:  # drawn off the loop: up to 4 Mpx takes tens of milliseconds
            body = await asyncio.get_running_loop().run_in_executor(None, job)
        except ValueError:
            return await self._not_found(req, parts, writer)
        ctype = images.CONTENT_TYPES[images.normalize_ext(ext or "jpg")]
        return await self._reply(writer, req, 200, body, content_type=ctype)

    async def _bytes(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        size = _index_or_none(parts[1]) if len(parts) == 2 else None
        if size is None:
            return await self._not_found(req, parts, writer)
        keep = req.keep_alive
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        writer.write(_head(200, headers, keep))
        if req.method != "HEAD":
            block = memoryview(images.payload_chunk(self.settings.seed))
            for offset in range(0, size, len(block)):
                await self._write_body(writer, block[: min(len(block), size - offset)])
        await writer.drain()
        return keep

    async def _headers(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        body = json.dumps(req.headers, indent=2, sort_keys=True).encode() + b"\n"
        return await self._reply(writer, req, 200, body, content_type="application/json")

    async def _status(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        code = _index_or_none(parts[1]) if len(parts) == 2 else None
        if code is None or not 200 <= code <= 599:
            return await self._bad_request(req, writer)
        return await self._error(req, writer, code)

    async def _error(self, req: _Request, writer: _Writer, code: int) -> bool:
        """An error status with an HTML body, plus ``Retry-After`` when ``?retry_after=``."""
        extra: tuple[tuple[str, str], ...] = ()
        retry_after = req.query.get("retry_after")
        if retry_after is not None and _safe_header_value(retry_after):
            extra = (("Retry-After", retry_after),)
        return await self._reply(writer, req, code, _error_page(code), extra=extra)

    async def _flaky(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        if len(parts) != 4:
            return await self._not_found(req, parts, writer)
        failures, code = _index_or_none(parts[2]), _index_or_none(parts[3])
        if failures is None or code is None or not 200 <= code <= 599:
            return await self._bad_request(req, writer)
        if self._bump("flaky/" + urllib.parse.unquote(parts[1])) <= failures:
            return await self._error(req, writer, code)
        return await self._send_image(writer, req, req.image_index())

    async def _retry_after(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        if len(parts) != 3:
            return await self._not_found(req, parts, writer)
        value = urllib.parse.unquote(parts[2])
        if not _safe_header_value(value):
            return await self._bad_request(req, writer)
        if self._bump("retry-after/" + urllib.parse.unquote(parts[1])) == 1:
            return await self._reply(
                writer, req, 429, _error_page(429), extra=(("Retry-After", value),)
            )
        return await self._send_image(writer, req, req.image_index())

    async def _redirect(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        hops = _index_or_none(parts[1]) if len(parts) == 2 else None
        if hops is None:
            return await self._not_found(req, parts, writer)
        if hops == 0:
            return await self._send_image(writer, req, req.image_index())
        target = f"/{parts[0]}/{hops - 1}" if hops > 1 else f"/img/{req.image_index()}.jpg"
        _, sep, query = req.target.partition("?")
        target += sep + query  # keep ?latency= and ?n= along the chain
        if parts[0] == "redirect-abs":
            authority = req.headers.get("host") or self._authority()
            target = f"{self.settings.scheme}://{authority}{target}"
        return await self._redirect_reply(req, writer, 302, target)

    async def _redirect_loop(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return await self._redirect_reply(req, writer, 302, "/redirect-loop")

    async def _redirect_to(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        location = req.query.get("url")
        code = _index_or_none(req.query.get("code", "302"))
        if location is None or not _safe_header_value(location) or code is None:
            return await self._bad_request(req, writer)
        if not 300 <= code <= 399:
            return await self._bad_request(req, writer)
        return await self._redirect_reply(req, writer, code, location)

    async def _redirect_reply(
        self, req: _Request, writer: _Writer, code: int, location: str
    ) -> bool:
        body = f"<!doctype html><a href='{location}'>moved</a>\n".encode()
        return await self._reply(writer, req, code, body, extra=(("Location", location),))

    async def _truncated(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        head = _head(200, [("Content-Type", "image/jpeg"), ("Content-Length", "1000")], False)
        writer.write(head + images.image_bytes(0, self.settings.seed)[:500])
        await writer.drain()
        return False

    async def _drip(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        size = max(0, int(req.arg("bytes", 10)))
        interval = max(0.0, req.arg("interval", 1.0))
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        writer.write(_head(200, headers, req.keep_alive))
        await writer.drain()
        block = images.payload_chunk(self.settings.seed)  # indexed, never built: N may be huge
        for i in range(size):
            await asyncio.sleep(interval)
            offset = i % len(block)
            writer.write(block[offset : offset + 1])
            await writer.drain()
        return req.keep_alive

    async def _reset(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        head = _head(200, [("Content-Type", "image/jpeg"), ("Content-Length", "100000")], False)
        writer.write(head + images.image_bytes(0, self.settings.seed)[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)  # let the partial body reach the client before the RST
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Linger on with a zero timeout: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False

    async def _huge_length(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", "10000000000000"),
        ]
        writer.write(_head(200, headers, False) + images.payload_chunk(self.settings.seed))
        await writer.drain()
        return False

    async def _endless(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        writer.write(_head(200, [("Content-Type", "application/octet-stream")], False))
        block = images.payload_chunk(self.settings.seed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(_ENDLESS_MAX, max(0.0, req.arg("seconds", _ENDLESS_MAX)))
        while loop.time() < deadline:
            await self._write_body(writer, block)
            await asyncio.sleep(0)  # drain() does not yield to a fast reader: be fair to others
        return False

    async def _empty(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return False

    async def _garbage(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        writer.write(_GARBAGE)
        await writer.drain()
        return False

    async def _hang(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        await asyncio.get_running_loop().create_future()  # completed by nobody: stop() cancels
        return False

    async def _disposition(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return await self._send_image(
            writer, req, req.image_index(), ("Content-Disposition", _HOSTILE_DISPOSITION)
        )

    async def _two_lengths(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", "100"),
            ("Content-Length", "200"),
        ]
        writer.write(_head(200, headers, False) + images.payload_bytes(200, self.settings.seed))
        await writer.drain()
        return False

    async def _gzip(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        body = _gzipped_image(req.image_index(), self.settings.seed)
        extra = (("Content-Encoding", "gzip"),)
        return await self._reply(writer, req, 200, body, content_type="image/jpeg", extra=extra)

    async def _not_image(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        return await self._reply(writer, req, 200, _NOT_IMAGE, content_type="image/jpeg")

    async def _opt_out(self, req: _Request, parts: list[str], writer: _Writer) -> bool:
        n = _index_or_none(parts[1]) if len(parts) == 2 else None
        if n is None:
            return await self._not_found(req, parts, writer)
        _, _, raw_query = req.target.partition("?")
        extra: list[tuple[str, str]] = []
        for name, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
            header = {"robots": "X-Robots-Tag", "tdm": "tdm-reservation"}.get(name)
            if header is None:
                continue
            if not _safe_header_value(value):
                return await self._bad_request(req, writer)
            extra.append((header, value))
        body = await self._image_body(n, "jpg", False)
        return await self._reply(
            writer, req, 200, body, content_type="image/jpeg", extra=tuple(extra)
        )

    def _authority(self) -> str:
        return _authority(self.settings.host, self.settings.port)


def _index_or_none(text: str | None) -> int | None:
    """A non-negative decimal integer (ASCII digits only), or None."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def _authority(host: str, port: int) -> str:
    """``host:port`` as it goes into a URL; wildcard binds are reached through loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def image_url_for(
    host: str, port: int, n: int, ext: str = "jpg", *, small: bool = False, scheme: str = "http"
) -> str:
    """The URL of image ``n`` on an origin serving at ``host:port``, started or not (what
    :meth:`Origin.image_url` returns once it is)."""
    path = f"{'small' if small else 'img'}/{n}.{images.normalize_ext(ext)}"
    return f"{scheme}://{_authority(host, port)}/{path}"


def _bind(host: str, port: int) -> socket.socket:
    """Bind one listening socket (the first address of ``host``), so port 0 means one port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# --- backends -----------------------------------------------------------------------------------


class _ThreadServer:
    """The event loop in a daemon thread of this process."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.port = 0
        self.app: _App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        sock = _bind(self.settings.host, self.settings.port)
        self.port = sock.getsockname()[1]
        # Counters and redirects need the real port, which port=0 only reveals now.
        self.app = _App(_replace_port(self.settings, self.port))
        ready = threading.Event()
        errors: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready, errors), name=f"origin-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_START_TIMEOUT):
            raise RuntimeError("the origin event loop did not start in time")
        if errors:
            raise errors[0]

    def stop(self) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or thread is None:
            return
        if stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already ended on its own
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_STOP_TIMEOUT * 2)

    def requests(self, path_prefix: str | None) -> list[RequestLog]:
        return self.app.requests(path_prefix) if self.app else []

    def reset(self) -> None:
        if self.app:
            self.app.reset()

    def warm(self, count: int) -> None:
        _warm(self.settings.seed, count)

    def _run(
        self, sock: socket.socket, ready: threading.Event, errors: list[BaseException]
    ) -> None:
        assert self._loop is not None
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main(sock, ready))
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it
            errors.append(exc)
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            sock.close()

    async def _main(self, sock: socket.socket, ready: threading.Event) -> None:
        assert self.app is not None
        self._stopping = asyncio.Event()
        tls = None
        if self.settings.tls_cert:
            import ssl

            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        server = await asyncio.start_server(
            self.app.serve_connection, sock=sock, limit=_HEAD_LIMIT, backlog=_BACKLOG, ssl=tls
        )
        ready.set()
        await self._stopping.wait()
        server.close()
        await self.app.shutdown()


def _replace_port(settings: _Settings, port: int) -> _Settings:
    return _Settings(
        settings.host,
        port,
        settings.latency,
        settings.jitter,
        settings.bandwidth,
        settings.seed,
        settings.max_log,
        settings.tls_cert,
        settings.tls_key,
    )


class _ProcessServer:
    """A :class:`_ThreadServer` in a child interpreter, driven by JSON lines over its stdio.

    A plain subprocess rather than :mod:`multiprocessing`: spawn and forkserver re-import the
    caller's ``__main__`` (breaking unguarded scripts), and fork is unsafe in a threaded process.
    """

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one command and its answer at a time on the pipe

    def start(self) -> None:
        package_root = str(Path(images.__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        argument = json.dumps(dataclasses.asdict(self.settings))
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, "-c", _CHILD_CODE, argument],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], _START_TIMEOUT)
        reply = json.loads(self._proc.stdout.readline() or b"null") if ready else None
        if not isinstance(reply, dict) or "port" not in reply:
            self.stop()
            error = reply.get("error") if isinstance(reply, dict) else None
            if error:
                raise OSError(error)
            raise RuntimeError("the origin child process did not start")
        self.port = int(reply["port"])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # EOF on its stdin is the child's signal to stop
        try:
            proc.wait(_STOP_TIMEOUT * 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)
        proc.stdout.close()

    def requests(self, path_prefix: str | None) -> list[RequestLog]:
        rows = self._call({"command": "requests", "prefix": path_prefix})
        return [RequestLog(*row) for row in rows]

    def reset(self) -> None:
        self._call({"command": "reset"})

    def warm(self, count: int) -> None:
        self._call({"command": "warm", "count": count})

    def _call(self, message: dict[str, Any]) -> Any:
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None or proc.stdout is None:
                raise RuntimeError("the origin is not running")
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the origin child process died")
            return json.loads(line)


def _warm(seed: int, count: int) -> None:
    """Draw the base pictures behind the first ``count`` images now, not on first request."""
    for n in range(min(count, images.POOL_SIZE)):
        images.image_bytes(n, seed)


_CHILD_CODE: Final = "from fetchpool.origin.server import _child_main; _child_main()"


def _child_main() -> None:
    """Child-process entry point: serve, answer the parent's commands, stop at EOF on stdin."""
    # The parent owns our lifetime: Ctrl-C in a terminal reaches the whole process group, and
    # the parent's stop() (or its death, which closes our stdin) is what must end us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # a stray print must not corrupt the protocol on stdout
    server = _ThreadServer(_Settings(**json.loads(sys.argv[1])))
    try:
        server.start()
    except OSError as exc:
        print(json.dumps({"error": str(exc)}), file=replies, flush=True)
        return
    print(json.dumps({"port": server.port}), file=replies, flush=True)
    try:
        for line in sys.stdin:
            message = json.loads(line)
            answer: Any = None
            if message["command"] == "requests":
                answer = [dataclasses.astuple(log) for log in server.requests(message["prefix"])]
            elif message["command"] == "reset":
                server.reset()
            elif message["command"] == "warm":
                _warm(server.settings.seed, int(message["count"]))
            print(json.dumps(answer), file=replies, flush=True)
    finally:
        server.stop()


# --- public API ---------------------------------------------------------------------------------


class Origin:
    """The embedded HTTP origin. See the module docstring for the endpoints.

    ``latency`` (seconds) is waited before every response, plus a uniform random extra in
    ``[0, jitter]``; ``?latency=S`` on any URL replaces both for that request. ``bandwidth``
    limits each response body to that many bytes/s. ``seed`` selects the image set (the same
    seed gives the same bytes in every process). ``process=True`` runs the server in a spawned
    child process; everything, the request log included, works the same, with a pipe round
    trip per :meth:`requests` call. ``max_log`` bounds the request log (oldest dropped).
    ``tls=(certfile, keyfile)`` serves HTTPS with that PEM certificate (chain) and key, e.g.
    one signed by a test CA, for a client's trust options.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        bandwidth: int | None = None,
        seed: int = 0,
        process: bool = False,
        max_log: int = 100_000,
        tls: tuple[str, str] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError("port must be 0..65535")
        if latency < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")
        if bandwidth is not None and bandwidth < 1:
            raise ValueError("bandwidth must be >= 1 byte/s")
        if max_log < 0:
            raise ValueError("max_log must be >= 0")
        cert, key = (str(tls[0]), str(tls[1])) if tls is not None else (None, None)
        settings = _Settings(host, port, latency, jitter, bandwidth, seed, max_log, cert, key)
        self.scheme = settings.scheme
        self.host = host
        self.latency = latency
        self.jitter = jitter
        self.bandwidth = bandwidth
        self.seed = seed
        self.process = process
        self._backend: _ThreadServer | _ProcessServer = (
            _ProcessServer(settings) if process else _ThreadServer(settings)
        )
        self._state = "new"  # new -> running -> stopped
        self._state_lock = threading.Lock()

    def start(self) -> Origin:
        """Bind and start serving; returns self. A no-op when already running."""
        with self._state_lock:
            if self._state == "running":
                return self
            if self._state == "stopped":
                raise RuntimeError("an Origin cannot be restarted; create a new one")
            self._backend.start()
            self._state = "running"
        return self

    def stop(self) -> None:
        """Stop serving and close every connection (hanging ones too). Idempotent."""
        with self._state_lock:
            if self._state == "running":
                self._backend.stop()
            self._state = "stopped"

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``)."""
        if self._state == "new":
            raise RuntimeError("the origin is not started")
        return self._backend.port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https`` with ``tls``; IPv6 hosts are bracketed)."""
        return f"{self.scheme}://{_authority(self.host, self.port)}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` on this origin (``"/html"`` or ``"html"``)."""
        return f"{self.base_url}/{path.lstrip('/')}"

    def image_url(self, n: int, ext: str = "jpg", *, small: bool = False) -> str:
        """URL of image ``n`` (``/img/{n}.{ext}``, or ``/small/...`` when ``small``)."""
        return image_url_for(self.host, self.port, n, ext, small=small, scheme=self.scheme)

    def image_bytes(self, n: int, ext: str = "jpg", *, small: bool = False) -> bytes:
        """Exactly the bytes :meth:`image_url` serves (compare sha256 against these)."""
        return images.image_bytes(n, self.seed, ext, small=small)

    def payload_bytes(self, size: int) -> bytes:
        """Exactly the bytes ``/bytes/{size}`` serves."""
        return images.payload_bytes(size, self.seed)

    def requests(self, path_prefix: str | None = None) -> list[RequestLog]:
        """The requests seen so far (oldest first), optionally only paths with this prefix."""
        if self._state != "running":
            return []
        return self._backend.requests(path_prefix)

    def warm(self, count: int) -> None:
        """Render the images ``0..count-1`` will need before any is requested.

        Drawing a base picture takes ~30 ms on first request; a measurement (the demo, the lab,
        a benchmark) warms the origin first so that cost is not charged to the client.
        """
        if self._state == "running":
            self._backend.warm(count)

    def reset_counters(self) -> None:
        """Clear the per-key counters (``/flaky``, ``/retry-after``) and the request log."""
        if self._state == "running":
            self._backend.reset()

    def __repr__(self) -> str:
        where = self.base_url if self._state == "running" else self._state
        mode = "process" if self.process else "thread"
        return f"Origin({where}, {mode}, latency={self.latency}, seed={self.seed})"
