"""What both engine prototypes share, so that they differ only in how they drive sockets.

* the command line (a URL list, an output folder, ``--concurrency``, ``--per-host``,
  ``--processes N``: N processes, each taking every N-th URL and 1/N of both limits);
* per-host admission (:class:`HostQueues`): what fetchpool's scheduler decides, reduced to
  "at most ``per_host`` in flight per host, hosts served round-robin";
* the address allow-list (:func:`address_allowed`): loopback only with ``--allow-loopback``,
  otherwise globally routable addresses only (fetchpool's guard, without its named ranges);
* the per-item work of fetchpool's files engine (:class:`BodyFile`): a temp file in
  ``OUT/.tmp/N/`` created ``O_EXCL|O_NOFOLLOW``, sha256 computed as the body arrives, fsync,
  then the final name given without replacing anything (``link`` + ``unlink``, as
  ``fetchpool.fsutil.publish``);
* the stats each process prints as one JSON line on stderr (:class:`Stats`), with the time
  spent in file system calls and in sha256, so a report can say what share of the loop's
  CPU they take.

Not here (the prototypes measure the engine's shape, not the product): the journal, retries,
redirect following (a 3xx is handed back, counted, as fetchpool's scheduler would take it),
naming policy beyond the URL's basename.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

#: bodies are written in pieces of at least this size (one write for a 100 KB photo)
FLUSH_BYTES = 256 * 1024
#: largest body accepted (fetchpool's default --max-size)
MAX_BYTES = 100 * 1024 * 1024
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class Item:
    """One URL to fetch: where it goes and under which name it is published."""

    index: int
    url: str
    scheme: str
    host: str
    port: int
    target: str  # path + query, as sent in the request line
    name: str  # final file name (the URL's basename: unique in W2 and W4)


@dataclass
class Stats:
    """What one process did; printed as a JSON line on stderr at exit."""

    proto: str
    shard: int
    ok: int = 0
    failed: int = 0
    handed_back: int = 0  # 3xx: returned to the caller (the scheduler follows redirects)
    connections: int = 0
    refused: int = 0  # addresses the allow-list refused
    # wall time (perf_counter) inside the calls: thread_time would be exact but is a real
    # syscall on this VM (tried: the timers took 20% of the loop); a busy machine inflates these
    file_s: float = 0.0  # create, write, fsync, close, link, unlink
    hash_s: float = 0.0  # sha256 updates
    cpu_s: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    def fail(self, item: Item, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(f"{item.url}: {why}")

    def emit(self, started: float) -> None:
        self.cpu_s = round(time.process_time(), 3)
        self.wall_s = round(time.perf_counter() - started, 3)
        self.file_s, self.hash_s = round(self.file_s, 3), round(self.hash_s, 3)
        print(json.dumps(asdict(self)), file=sys.stderr, flush=True)


def parse_args(description: str, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("urls", type=Path, help="a file with one URL per line")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight, in all")
    p.add_argument("--per-host", type=int, default=8, help="requests in flight per host")
    p.add_argument("--processes", type=int, default=1, help="processes sharing the limits")
    p.add_argument("--allow-loopback", action="store_true", help="allow 127.0.0.0/8 and ::1")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--idle-timeout", type=float, default=30.0)
    p.add_argument("--total-timeout", type=float, default=300.0)
    p.add_argument("--low-speed", type=int, default=1024, help="bytes/s below which ...")
    p.add_argument("--low-speed-time", type=int, default=30, help="... for this long fails")
    p.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # each process takes its share of both limits, as fetchpool's --fetch-processes does
    args.concurrency = -(-args.concurrency // args.processes)
    args.per_host = -(-args.per_host // args.processes)
    return args


def run_sharded(argv: list[str], main: Callable[[argparse.Namespace], int], doc: str) -> int:
    """Run ``main`` for shard 0 here and for shards 1..N-1 in child processes."""
    args = parse_args(doc, argv)
    children = []
    if args.processes > 1 and args.shard == 0:
        script = sys.argv[0]
        children = [
            subprocess.Popen([sys.executable, script, *argv, "--shard", str(k)])
            for k in range(1, args.processes)
        ]
    code = main(args)
    for child in children:
        code = max(code, child.wait())
    return code


def load_items(args: argparse.Namespace) -> Iterator[Item]:
    """This shard's URLs (every N-th line), read and parsed as they are needed."""
    with args.urls.open() as lines:
        for index, line in enumerate(lines):
            if index % args.processes != args.shard or not (url := line.strip()):
                continue
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SystemExit(f"line {index + 1}: not an http(s) URL: {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            name = parts.path.rsplit("/", 1)[-1] or f"{index:08d}"
            yield Item(index, url, parts.scheme, parts.hostname, port, target, name)


@functools.lru_cache(maxsize=4096)
def address_allowed(address: str, allow_loopback: bool) -> bool:
    """True when a connection to ``address`` may be opened (checked on every new connection)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if allow_loopback and ip.is_loopback:
        return True
    return ip.is_global and not ip.is_multicast


class HostQueues:
    """Pending items per host, served round-robin, at most ``per_host`` in flight per host.

    The input is read ahead by at most ``WINDOW`` items, so memory is bounded by the
    concurrency and the window, not by the length of the list (as in fetchpool).
    """

    WINDOW = 4096

    def __init__(self, items: Iterator[Item], per_host: int) -> None:
        self.per_host = per_host
        self.items: Iterator[Item] | None = items
        self.pending: dict[str, deque[Item]] = {}
        self.ring: deque[str] = deque()
        self.in_flight: dict[str, int] = {}
        self.queued = 0
        self._refill()

    @property
    def has_more(self) -> bool:
        return bool(self.queued) or self.items is not None

    def _refill(self) -> None:
        while self.items is not None and self.queued < self.WINDOW:
            item = next(self.items, None)
            if item is None:
                self.items = None
                return
            queue = self.pending.get(item.host)
            if queue is None:
                queue = self.pending[item.host] = deque()
                self.ring.append(item.host)
                self.in_flight[item.host] = 0
            queue.append(item)
            self.queued += 1

    def pop(self, host: str | None = None) -> Item | None:
        """The next item (of ``host`` when given: to reuse its idle connection), or None."""
        if self.queued < self.WINDOW // 2:
            self._refill()
        if host is not None:
            queue = self.pending.get(host)
            if not queue or self.in_flight[host] >= self.per_host:
                return None
            return self._take(host, queue)
        for _ in range(len(self.ring)):
            candidate = self.ring[0]
            self.ring.rotate(-1)
            queue = self.pending[candidate]
            if queue and self.in_flight[candidate] < self.per_host:
                return self._take(candidate, queue)
        return None

    def _take(self, host: str, queue: deque[Item]) -> Item:
        self.in_flight[host] += 1
        self.queued -= 1
        return queue.popleft()

    def done(self, item: Item) -> None:
        self.in_flight[item.host] -= 1


class BodyFile:
    """A body on its way to its final name: temp file, sha256 as it arrives, fsync, link."""

    __slots__ = ("buffered", "chunks", "fd", "path", "sha", "size", "stats")
    _counter = 0
    _pid = os.getpid()  # cached: glibc makes getpid() a real syscall (seen at 15% in py-spy)

    def __init__(self, tmp_dir: Path, stats: Stats) -> None:
        BodyFile._counter += 1
        self.stats = stats
        self.path = f"{tmp_dir}/{BodyFile._pid}-{BodyFile._counter}.part"
        t0 = time.perf_counter()
        self.fd = os.open(self.path, _CREATE, 0o644)
        stats.file_s += time.perf_counter() - t0
        self.sha = hashlib.sha256()
        self.chunks: list[bytes] = []
        self.buffered = self.size = 0

    def add(self, data: bytes) -> bool:
        """Take a piece of the body; False once it exceeds MAX_BYTES."""
        t0 = time.perf_counter()
        self.sha.update(data)
        t1 = time.perf_counter()
        self.stats.hash_s += t1 - t0
        self.chunks.append(data)
        self.buffered += len(data)
        self.size += len(data)
        if self.buffered >= FLUSH_BYTES:
            self._flush()
            self.stats.file_s += time.perf_counter() - t1
        return self.size <= MAX_BYTES

    def _flush(self) -> None:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.chunks.clear()
        self.buffered = 0

    def publish(self, final: str) -> str:
        """fsync, close, give the final name (never replacing one); return the sha256."""
        t0 = time.perf_counter()
        self._flush()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        try:
            os.link(self.path, final, follow_symlinks=False)
        finally:
            os.unlink(self.path)
        self.stats.file_s += time.perf_counter() - t0
        return self.sha.hexdigest()

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        os.unlink(self.path)


def prepare_out(out: Path, shard: int) -> Path:
    """Make OUT and this process's OUT/.tmp/N (hidden: the harness's verify skips it)."""
    tmp = out / ".tmp" / str(shard)
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def finish_out(tmp: Path) -> None:
    """Remove this process's temp folder (and OUT/.tmp when it is the last one out)."""
    for folder in (tmp, tmp.parent):
        try:
            folder.rmdir()
        except OSError:
            return  # another shard still writes there, or something was left behind
