#!/usr/bin/env python3
"""Prototype of a multiplexed fetch engine in pure Python: ``selectors`` + non-blocking sockets.

    python benchmarks/prototypes/selector_loop.py URLS OUT --concurrency 256 --per-host 256 \\
        --processes 2 --allow-loopback

One thread per process drives up to ``--concurrency`` keep-alive connections (plain HTTP/1.1;
TLS is not implemented: see docs/benchmarks.md for what it would cost). Per request:

* a connection to the item's host is reused if one is idle; else the host is resolved once
  (cached), **every** address is checked against the allow-list, and a non-blocking
  ``connect`` goes to the first address, the one that was checked;
* the request is sent (one ``send``); readable sockets are read with one ``recv`` each and
  the bytes fed to :class:`ResponseReader` (a minimal HTTP/1.1 response reader: status line,
  headers, a body framed by Content-Length or chunked, or ended by the close);
* the body is hashed and written to a temp file in ``OUT/.tmp/N/``, fsynced and linked to
  its final name (:class:`common.BodyFile`), *inline, on the loop*; the time it takes is
  reported so the share a writer thread would take off the loop is known;
* a 3xx is handed back (counted), as fetchpool's scheduler wants; every non-200 is not saved;
* timeouts are checked by a sweep of all connections every 0.25 s: connect, idle (no byte
  for ``--idle-timeout``), total per item, and the low-speed window.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import selectors
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MAX_BYTES,
    BodyFile,
    HostQueues,
    Item,
    Stats,
    finish_out,
    load_items,
    prepare_out,
    run_sharded,
)
from common import address_allowed as allowed

RECV_BYTES = 256 * 1024  # one recv takes what the kernel has, up to this
MAX_HEAD = 64 * 1024  # a longer response head is a protocol error
SWEEP_S = 0.25  # how often deadlines are checked

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE, _DONE = range(8)


class ProtocolError(Exception):
    """The response is not HTTP/1.1 we accept; the connection is not reused."""


class ResponseReader:
    """A minimal HTTP/1.1 response reader, fed bytes (sans-IO): ``feed`` returns True when
    the response is complete. Body bytes go to ``sink`` (set once the head is known)."""

    __slots__ = ("buf", "headers", "keep_alive", "remaining", "sink", "state", "status")

    def __init__(self) -> None:
        self.state = _HEAD
        self.buf = b""
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.remaining = 0
        self.keep_alive = True
        self.sink: BodySink | None = None

    def feed(self, data: bytes) -> bool:
        if self.state == _LENGTH and not self.buf:  # the hot path: raw body bytes
            if len(data) > self.remaining:
                raise ProtocolError("more bytes than Content-Length")
            self.remaining -= len(data)
            self._emit(data)
            if self.remaining == 0:
                self.state = _DONE
            return self.state == _DONE
        self.buf += data
        while self.state != _DONE and self._step():
            pass
        return self.state == _DONE

    def end_of_stream(self) -> bool:
        """The peer closed: True if that ends the response (a body without framing)."""
        if self.state == _UNTIL_CLOSE:
            self.state = _DONE
            return True
        return False

    def _emit(self, data: bytes) -> None:
        if self.sink is not None and data:
            self.sink.add(data)

    def _step(self) -> bool:
        """Advance one state with what is buffered; False when more bytes are needed."""
        if self.state == _HEAD:
            return self._head()
        if self.state == _LENGTH:
            take, self.buf = self.buf[: self.remaining], self.buf[self.remaining :]
            self.remaining -= len(take)
            self._emit(take)
            if self.buf:
                raise ProtocolError("more bytes than Content-Length")
            if self.remaining == 0:
                self.state = _DONE
            return False
        if self.state == _UNTIL_CLOSE:
            self._emit(self.buf)
            self.buf = b""
            return False
        return self._chunked()

    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise ProtocolError("response head too long")
            return False
        lines = self.buf[:end].split(b"\r\n")
        self.buf = self.buf[end + 4 :]
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        self.status = int(rest[:3])
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name, value = name.lower(), value.strip()
            if name in self.headers and name == b"content-length" and self.headers[name] != value:
                raise ProtocolError("conflicting Content-Length")
            self.headers[name] = value
        self.keep_alive = version == b"HTTP/1.1" and self.headers.get(b"connection") != b"close"
        if 100 <= self.status < 200:  # an interim response: the real one follows
            self.headers = {}
            return True
        if self.status != 200:
            self.sink = None  # an error page or a redirect's body is never saved
        chunked = b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()
        length = self.headers.get(b"content-length")
        if chunked and length is not None:
            raise ProtocolError("Content-Length with chunked")
        if self.status in (204, 304):
            self.state = _DONE
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                raise ProtocolError("bad Content-Length")
            self.remaining = int(length)
            if self.remaining > MAX_BYTES:
                raise ProtocolError("too large")  # fetchpool: too_large, before reading
            self.state = _LENGTH if self.remaining else _DONE
        else:
            self.state, self.keep_alive = _UNTIL_CLOSE, False
        return self.state != _DONE

    def _chunked(self) -> bool:
        if self.state in (_CHUNK_SIZE, _CHUNK_END, _TRAILER):
            end = self.buf.find(b"\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ProtocolError("chunk line too long")
                return False
            line, self.buf = self.buf[:end], self.buf[end + 2 :]
            if self.state == _CHUNK_END:
                if line:
                    raise ProtocolError("chunk not followed by CRLF")
                self.state = _CHUNK_SIZE
            elif self.state == _TRAILER:
                if not line:
                    self.state = _DONE
            else:
                try:
                    self.remaining = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
                self.state = _CHUNK_DATA if self.remaining else _TRAILER
            return True
        take, self.buf = self.buf[: self.remaining], self.buf[self.remaining :]
        self.remaining -= len(take)
        self._emit(take)
        if self.remaining:
            return False
        self.state = _CHUNK_END
        return True


class BodySink:
    """Where a 200's body goes: lazily a :class:`BodyFile` (nothing for other statuses)."""

    __slots__ = ("file", "stats", "tmp")

    def __init__(self, tmp: Path, stats: Stats) -> None:
        self.tmp, self.stats = tmp, stats
        self.file: BodyFile | None = None

    def add(self, data: bytes) -> None:
        if self.file is None:
            self.file = BodyFile(self.tmp, self.stats)
        if not self.file.add(data):
            raise ProtocolError("too large")


class Conn:
    """A connection to one host and the item it carries now (None while idle)."""

    __slots__ = (
        "connected",
        "deadline",
        "host",
        "idle_deadline",
        "item",
        "reader",
        "reused",
        "sock",
        "window_bytes",
        "window_start",
    )

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock, self.host = sock, host
        self.item: Item | None = None
        self.reader = ResponseReader()
        self.connected = False
        self.reused = False
        self.deadline = self.idle_deadline = self.window_start = 0.0
        self.window_bytes = 0


class Engine:
    """The loop: admission, connections, reads, completions, deadlines."""

    def __init__(self, args: argparse.Namespace, items: Iterator[Item], stats: Stats) -> None:
        self.args, self.stats = args, stats
        self.out = str(args.out)
        self.tmp = prepare_out(args.out, args.shard)
        self.queues = HostQueues(items, args.per_host)
        self.sel = selectors.DefaultSelector()
        self.idle: dict[str, list[Conn]] = {}
        self.busy: set[Conn] = set()
        self.resolved: dict[tuple[str, int], str | None] = {}
        # recv_into one buffer, then copy out what came: sock.recv(256 KB) would allocate
        # 256 KB per call (mmap, then mremap to the size received: 10% of W4's samples)
        self.buffer = bytearray(RECV_BYTES)
        self.view = memoryview(self.buffer)

    # -- admission and connections ---------------------------------------------------------

    def fill(self, now: float) -> None:
        while len(self.busy) < self.args.concurrency:
            item = self.queues.pop()
            if item is None:
                return
            self.start(item, now)

    def start(self, item: Item, now: float) -> None:
        idle = self.idle.get(item.host)
        conn = idle.pop() if idle else self.connect(item, now)
        if conn is None:
            return
        conn.item = item
        conn.reader = ResponseReader()
        conn.reader.sink = None
        conn.deadline = now + self.args.total_timeout
        conn.window_start, conn.window_bytes = now, 0
        self.busy.add(conn)
        if conn.connected:
            conn.reused = True
            conn.idle_deadline = now + self.args.idle_timeout
            self.send(conn)
        else:
            conn.idle_deadline = now + self.args.connect_timeout

    def address(self, item: Item) -> str | None:
        """The checked address for a host (resolved once per process), or None if refused."""
        key = (item.host, item.port)
        if key not in self.resolved:
            infos = socket.getaddrinfo(item.host, item.port, type=socket.SOCK_STREAM)
            addresses = [str(info[4][0]) for info in infos]
            ok = bool(addresses) and all(allowed(a, self.args.allow_loopback) for a in addresses)
            self.resolved[key] = addresses[0] if ok else None
        return self.resolved[key]

    def connect(self, item: Item, now: float) -> Conn | None:
        if item.scheme != "http":
            self.finish_item(item, "https is not implemented in this prototype")
            return None
        try:
            address = self.address(item)
        except OSError as exc:
            self.finish_item(item, f"cannot resolve: {exc}")
            return None
        if address is None:
            self.stats.refused += 1
            self.finish_item(item, "address refused by the allow-list")
            return None
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((address, item.port))
        conn = Conn(sock, item.host)
        self.stats.connections += 1
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.finish_item(item, f"connect: {errno.errorcode.get(code, code)}")
            return None
        self.sel.register(sock, selectors.EVENT_WRITE, conn)
        return conn

    def send(self, conn: Conn) -> None:
        item = conn.item
        assert item is not None
        request = (
            f"GET {item.target} HTTP/1.1\r\nHost: {item.host}:{item.port}\r\n"
            "User-Agent: fetchpool-proto\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode()
        try:
            sent = conn.sock.send(request)
        except OSError as exc:
            self.fail_conn(conn, f"send: {exc}")
            return
        if sent != len(request):  # a request this small always fits an empty send buffer
            self.fail_conn(conn, "short send")

    # -- events ----------------------------------------------------------------------------

    def on_writable(self, conn: Conn) -> None:
        """Connected (or not): switch to reading and send the request."""
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.fail_conn(conn, f"connect: {errno.errorcode.get(code, code)}")
            return
        conn.connected = True
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
        self.send(conn)

    def on_readable(self, conn: Conn, now: float) -> None:
        try:
            data = bytes(self.view[: conn.sock.recv_into(self.buffer)])
        except OSError as exc:
            self.fail_conn(conn, f"recv: {exc}")
            return
        if conn.item is None:  # an idle connection: the server closed it (or misbehaves)
            self.drop(conn)
            return
        reader = conn.reader
        if reader.sink is None and reader.state == _HEAD:
            reader.sink = BodySink(self.tmp, self.stats)
        conn.idle_deadline = now + self.args.idle_timeout
        conn.window_bytes += len(data)
        try:
            if not data:
                if reader.end_of_stream():
                    self.complete(conn, reuse=False)
                elif conn.reused and reader.state == _HEAD and not reader.buf:
                    self.retry_fresh(conn, now)  # a keep-alive connection closed under us
                else:
                    self.fail_conn(conn, "connection closed before the response ended")
                return
            done = reader.feed(data)
        except ProtocolError as exc:
            self.fail_conn(conn, str(exc))
            return
        if done:
            self.complete(conn, reuse=reader.keep_alive)

    def complete(self, conn: Conn, reuse: bool) -> None:
        item, reader = conn.item, conn.reader
        assert item is not None
        body = reader.sink.file if reader.sink else None
        if reader.status == 200:
            if body is None:
                body = BodyFile(self.tmp, self.stats)  # an empty body
            body.publish(f"{self.out}/{item.name}")
            self.stats.ok += 1
            self.queues.done(item)
        else:
            if body is not None:
                body.discard()
            if 300 <= reader.status < 400:
                self.stats.handed_back += 1  # with reader.headers[b"location"]
                self.queues.done(item)
            else:
                self.finish_item(item, f"HTTP {reader.status}", admitted=True)
        self.busy.discard(conn)
        conn.item = None
        if not reuse:
            self.drop(conn)
            return
        # keep-alive: the next item of this host goes out on this connection at once
        next_item = self.queues.pop(conn.host)
        if next_item is None:
            self.idle.setdefault(conn.host, []).append(conn)
            return
        conn.item = next_item
        conn.reader = ResponseReader()
        now = time.monotonic()
        conn.deadline = now + self.args.total_timeout
        conn.idle_deadline = now + self.args.idle_timeout
        conn.window_start, conn.window_bytes = now, 0
        self.busy.add(conn)
        self.send(conn)

    def retry_fresh(self, conn: Conn, now: float) -> None:
        """The server closed an idle keep-alive connection as we reused it: the request
        never reached it, so it goes again, once, on a new connection (item stays admitted)."""
        item = conn.item
        assert item is not None
        self.busy.discard(conn)
        conn.item = None
        self.drop(conn)
        fresh = self.connect(item, now)
        if fresh is not None:
            fresh.item = item
            fresh.deadline = now + self.args.total_timeout
            fresh.idle_deadline = now + self.args.connect_timeout
            fresh.window_start = now
            self.busy.add(fresh)

    def fail_conn(self, conn: Conn, why: str) -> None:
        item = conn.item
        if item is not None:
            sink = conn.reader.sink
            if sink is not None and sink.file is not None:
                sink.file.discard()
            self.finish_item(item, why, admitted=True)
        self.busy.discard(conn)
        conn.item = None
        self.drop(conn)

    def drop(self, conn: Conn) -> None:
        idle = self.idle.get(conn.host)
        if idle and conn in idle:
            idle.remove(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def finish_item(self, item: Item, why: str, admitted: bool = True) -> None:
        if admitted:
            self.queues.done(item)
        self.stats.fail(item, why)

    def sweep(self, now: float) -> None:
        """Deadlines: connect/idle, total per item, and the low-speed window."""
        for conn in list(self.busy):
            if now > conn.idle_deadline:
                self.fail_conn(conn, "connect timeout" if not conn.connected else "idle timeout")
            elif now > conn.deadline:
                self.fail_conn(conn, "total timeout")
            elif now - conn.window_start >= self.args.low_speed_time:
                speed = conn.window_bytes / (now - conn.window_start)
                if speed < self.args.low_speed:
                    self.fail_conn(conn, f"slower than {self.args.low_speed} bytes/s")
                else:
                    conn.window_start, conn.window_bytes = now, 0

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        sel, read = self.sel, selectors.EVENT_READ
        now = time.monotonic()
        next_sweep = now + SWEEP_S
        self.fill(now)
        while self.busy:
            ready = sel.select(SWEEP_S)
            now = time.monotonic()
            for key, events in ready:
                conn = key.data
                if events & read:
                    self.on_readable(conn, now)
                else:
                    self.on_writable(conn)
            if now >= next_sweep:
                self.sweep(now)
                next_sweep = now + SWEEP_S
            if self.queues.has_more:
                self.fill(now)
        for conns in self.idle.values():
            for conn in conns:
                conn.sock.close()
        sel.close()


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    stats = Stats("selector_loop", args.shard)
    items = load_items(args)
    engine = Engine(args, items, stats)
    engine.run()
    finish_out(engine.tmp)
    stats.emit(started)
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(run_sharded(sys.argv[1:], main, __doc__ or ""))
