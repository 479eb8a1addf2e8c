#!/usr/bin/env python3
"""Prototype of a multiplexed fetch engine on libcurl's multi interface (pycurl).

    python benchmarks/prototypes/curl_multi.py URLS OUT --concurrency 256 --per-host 256 \\
        --processes 2 --allow-loopback

One thread per process drives ``--concurrency`` easy handles through one ``CurlMulti``; the
multi's connection cache keeps connections alive across URLs, whichever handle runs next.
libcurl does the HTTP (and would do TLS and HTTP/2); Python does what fetchpool must keep:

* the address check: ``OPENSOCKETFUNCTION`` sees every address libcurl is about to connect
  to, after resolution, and refuses it (``SOCKET_BAD``) unless the allow-list passes it;
  reused connections were checked when they were opened;
* redirects: ``FOLLOWLOCATION`` off, a 3xx is handed back (its Location read) and counted;
* per-host limits: admission in Python (:class:`common.HostQueues`), plus libcurl's own
  ``MAX_HOST_CONNECTIONS`` as a backstop;
* timeouts: ``CONNECTTIMEOUT``, ``TIMEOUT`` (total), ``LOW_SPEED_LIMIT``/``LOW_SPEED_TIME``;
* the body: the write callback hashes and buffers it into a temp file in ``OUT/.tmp``;
  on success it is fsynced and linked to its final name (:class:`common.BodyFile`).

The loop is pycurl's classic one: ``perform`` until libcurl has nothing to do at once,
collect finished transfers with ``info_read``, ``select`` on libcurl's descriptors.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycurl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
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


class Transfer:
    """One easy handle and what it is fetching now; reused for URL after URL."""

    def __init__(self, multi: Engine) -> None:
        self.engine = multi
        self.item: Item | None = None
        self.body: BodyFile | None = None
        self.status = 0
        self.head: list[bytes] = []  # the response's header lines, for the policy to read
        self.too_big = False
        c = self.curl = pycurl.Curl()
        args = multi.args
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.HTTPHEADER, ["Accept-Encoding: identity"])
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(args.connect_timeout * 1000))
        c.setopt(pycurl.TIMEOUT_MS, int(args.total_timeout * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, args.low_speed)
        c.setopt(pycurl.LOW_SPEED_TIME, args.low_speed_time)
        c.setopt(pycurl.MAXFILESIZE_LARGE, 100 * 1024 * 1024)  # a larger Content-Length fails
        c.setopt(pycurl.OPENSOCKETFUNCTION, multi.open_socket)
        c.setopt(pycurl.HEADERFUNCTION, self.header)
        c.setopt(pycurl.WRITEFUNCTION, self.write)

    def start(self, item: Item) -> None:
        self.item, self.body, self.status, self.too_big = item, None, 0, False
        self.curl.setopt(pycurl.URL, item.url)

    def header(self, line: bytes) -> None:
        """libcurl's header callback, once per line (getinfo is refused inside perform)."""
        if line.startswith(b"HTTP/"):
            self.status = int(line[9:12])
            self.head = []
        else:
            self.head.append(line)

    def write(self, data: bytes) -> int | None:
        """libcurl's write callback: body bytes, up to 16 KB a call. 0 aborts the transfer."""
        body = self.body
        if body is None:
            if self.status != 200:
                return None  # an error page or a redirect's body: never saved
            body = self.body = BodyFile(self.engine.tmp, self.engine.stats)
        if not body.add(data):
            self.too_big = True
            return 0
        return None


class Engine:
    """The multi handle, its transfers, and the admission of items into free transfers."""

    def __init__(self, args: argparse.Namespace, items: Iterator[Item], stats: Stats) -> None:
        self.args, self.stats = args, stats
        self.out = str(args.out)
        self.tmp = prepare_out(args.out, args.shard)
        self.queues = HostQueues(items, args.per_host)
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, args.concurrency)
        self.multi.setopt(pycurl.M_MAX_HOST_CONNECTIONS, args.per_host)
        self.multi.setopt(pycurl.M_MAXCONNECTS, args.concurrency)
        self.free = [Transfer(self) for _ in range(args.concurrency)]
        self.by_handle: dict[Any, Transfer] = {t.curl: t for t in self.free}
        self.active = 0

    def open_socket(self, purpose: int, address: Any) -> socket.socket | int:
        """OPENSOCKETFUNCTION: every new connection, after DNS, before connect()."""
        if not allowed(address.addr[0], self.args.allow_loopback):
            self.stats.refused += 1
            return int(pycurl.SOCKET_BAD)  # libcurl fails the transfer: COULDNT_CONNECT
        self.stats.connections += 1
        return socket.socket(address.family, address.socktype, address.protocol)

    def fill(self) -> bool:
        """Give free transfers their next items; True when any was added."""
        added = False
        while self.free:
            item = self.queues.pop()
            if item is None:
                break
            transfer = self.free.pop()
            transfer.start(item)
            self.multi.add_handle(transfer.curl)
            self.active += 1
            added = True
        return added

    def finish(self, curl: Any, error: str | None) -> None:
        t = self.by_handle[curl]
        self.multi.remove_handle(curl)
        self.active -= 1
        item, body = t.item, t.body
        assert item is not None
        self.queues.done(item)
        status = t.status or curl.getinfo(pycurl.RESPONSE_CODE)
        if error is None and status == 200 and body is None:
            body = BodyFile(self.tmp, self.stats)  # an empty body
        if error is None and status == 200 and body is not None:
            body.publish(f"{self.out}/{item.name}")
            self.stats.ok += 1
        elif error is None and 300 <= status < 400:
            self.stats.handed_back += 1  # the scheduler would check and follow this:
            curl.getinfo(pycurl.REDIRECT_URL)  # its Location, resolved against the URL
        else:
            if body is not None:
                body.discard()
            why = "too large" if t.too_big else (error or f"HTTP {status}")
            self.stats.fail(item, why)
        t.item = t.body = None
        self.free.append(t)

    def run(self) -> None:
        multi = self.multi
        self.fill()
        while self.active:
            ret = pycurl.E_CALL_MULTI_PERFORM
            while ret == pycurl.E_CALL_MULTI_PERFORM:
                ret, _ = multi.perform()
            while True:
                queued, ok_list, err_list = multi.info_read()
                for curl in ok_list:
                    self.finish(curl, None)
                for curl, _code, message in err_list:
                    self.finish(curl, message)
                if not queued:
                    break
            # new transfers start at the next perform(): wait only when none was added
            if not self.fill() and self.active:
                timeout_ms = multi.timeout()
                multi.select(1.0 if timeout_ms < 0 else min(timeout_ms, 1000) / 1000)
        for t in self.by_handle.values():
            t.curl.close()
        multi.close()


def main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    stats = Stats("curl_multi", args.shard)
    items = load_items(args)
    engine = Engine(args, items, stats)
    engine.run()
    finish_out(engine.tmp)
    stats.emit(started)
    return 1 if stats.failed else 0


if __name__ == "__main__":
    sys.exit(run_sharded(sys.argv[1:], main, __doc__ or ""))
