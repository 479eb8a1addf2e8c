"""Client CPU per request of ``HttpFetcher``: sequential keep-alive GETs of a ~4 KB body.

    python benchmarks/fetch_cpu.py [--n 2000] [--rounds 5] [--size 4096]

Issue 14's W4 (100,000 files of 4 KB) is bound by the client's own CPU per request, so a change to
the fetch path (the HTTP/1.1 parser, the attempt's policy) is measured here before and after.
The server runs in a child process (``http.server``, HTTP/1.1 keep-alive, the body from
memory), so ``time.process_time()`` counts the client alone: guard, request bytes, parsing,
policy, sha256, temp file. Prints the median of the rounds, in µs per request, and their
minimum (the steadier figure on a machine busy with other work).
"""

from __future__ import annotations

import argparse
import http.server
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b""

    def do_GET(self) -> None:
        # One write for head and body: two would meet Nagle and delayed ACKs (40 ms each).
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(self.body)}\r\n\r\n"
        )
        self.wfile.write(head.encode("ascii") + self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(size: int, ready: multiprocessing.Queue[int]) -> None:
    _Handler.body = b"\xff\xd8\xff\xe0" + bytes(range(256)) * (size // 256)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ready.put(server.server_address[1])
    server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()

    from fetchpool.config import FetchConfig
    from fetchpool.fetch import HttpFetcher
    from fetchpool.models import Job

    ready: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(args.size, ready), daemon=True)
    server.start()
    port = ready.get(timeout=10)
    tmp = Path(tempfile.mkdtemp(prefix="fetch-cpu-", dir="/dev/shm"))
    fetcher = HttpFetcher(FetchConfig(allow_private_networks=True), tmp)
    url = f"http://127.0.0.1:{port}/photo.jpg"
    try:

        def run(count: int) -> float:
            started = time.process_time()
            for n in range(count):
                record = fetcher.fetch(Job(position=n, url=url))
                assert record.temp_path is not None, record.error_message
                os.unlink(record.temp_path)
            return (time.process_time() - started) / count

        run(200)  # warm: the connection opens, code paths load
        rounds = [run(args.n) * 1e6 for _ in range(args.rounds)]
    finally:
        fetcher.close()
        server.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    shown = ", ".join(f"{r:.1f}" for r in rounds)
    print(
        f"HttpFetcher.fetch, {args.size} B keep-alive: median {statistics.median(rounds):.1f} "
        f"µs CPU per request, min {min(rounds):.1f} (rounds: {shown})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
