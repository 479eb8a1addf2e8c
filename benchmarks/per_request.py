"""CPU per request of HTTP clients, one thread, keep-alive, against nginx on loopback.

    python benchmarks/per_request.py [--n 1000]

Fetches the first N photos of the benchmark corpus (``python benchmarks/run.py`` makes it)
with each client in turn and prints the process CPU time (user + system) per request: the
cost a client adds per request, which is what bounds a throughput-bound run under one GIL.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.env import WORK_DIR
from harness.origin import start_nginx

CORPUS_DIR = WORK_DIR / "corpus"


def measure(name: str, urls: list[str], fetch_all: Callable[[list[str]], None]) -> None:
    fetch_all(urls[:50])  # warm: connections open, code paths loaded
    cpu, wall = time.process_time(), time.perf_counter()
    fetch_all(urls)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    per = 1e6 / len(urls)
    print(f"{name:62s} {cpu * per:5.0f} µs CPU  ({wall * per:4.0f} µs wall)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    photos = sorted((CORPUS_DIR / "photo").glob("*.jpg"))[: args.n]
    if not photos:
        print("no corpus: run python benchmarks/run.py --quick first", file=sys.stderr)
        return 2
    origin = start_nginx(CORPUS_DIR)
    try:
        urls = [origin.url(0, f"photo/{p.name}") for p in photos]
        authority = origin.base_url.split("//", 1)[1]
        host, port = authority.split(":")

        def stdlib(batch: list[str]) -> None:
            conn = http.client.HTTPConnection(host, int(port))
            for url in batch:
                conn.request("GET", url.split(authority, 1)[1])
                conn.getresponse().read()
            conn.close()

        import urllib3

        manager = urllib3.PoolManager()

        def with_urllib3(batch: list[str]) -> None:
            for url in batch:
                response = manager.request("GET", url, preload_content=False)
                response.read()
                response.release_conn()

        from fetchpool.config import FetchConfig
        from fetchpool.fetch import HttpFetcher
        from fetchpool.models import Job

        tmp = Path(tempfile.mkdtemp(prefix="per-request-", dir="/dev/shm"))
        fetcher = HttpFetcher(FetchConfig(allow_private_networks=True), tmp)

        def with_fetchpool(batch: list[str]) -> None:
            for n, url in enumerate(batch):
                record = fetcher.fetch(Job(position=n, url=url))
                assert record.temp_path is not None, record.error_message
                os.unlink(record.temp_path)

        bodies = [p.read_bytes() for p in photos]

        def sha256_only(batch: list[str]) -> None:
            for body in bodies[: len(batch)]:
                hashlib.sha256(body).hexdigest()

        mean = sum(map(len, bodies)) // len(bodies)
        measure("http.client.HTTPConnection, body read into memory", urls, stdlib)
        measure("urllib3.PoolManager.request, body read into memory", urls, with_urllib3)
        measure(
            "fetchpool HttpFetcher.fetch: guard, limits, sha256, temp file", urls, with_fetchpool
        )
        measure(f"  of which sha256 of the body (mean {mean:,} bytes)", urls, sha256_only)
        fetcher.close()
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        origin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
