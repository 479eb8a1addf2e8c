#!/usr/bin/env python3
"""Does keep-alive survive a run over many hosts? Connections opened, against URLs fetched.

    python benchmarks/many_hosts.py [--hosts 200 --urls-per-host 48 --ulimit 1024]
                                    [--python PY]   # another fetchpool: PYTHONPATH=... PY

Starts ``--hosts`` small HTTP/1.1 keep-alive servers on 127.0.0.1 (one port each: fetchpool
pools connections by host and port, so each port is a host), writes a URL list that visits
every host ``--urls-per-host`` times in turns (4 KB each), runs ``fetchpool get`` with
``--threads 64 --per-host 16`` under ``ulimit -n``, and prints how many TCP connections the
servers accepted. One connection per URL means keep-alive was lost.
"""

from __future__ import annotations

import argparse
import http.server
import shlex
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BODY = b"x" * 4096


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0


COUNTER = _Counter()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with COUNTER.lock:
            COUNTER.accepted += 1

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--urls-per-host", type=int, default=48)
    parser.add_argument("--ulimit", type=int, default=1024)
    parser.add_argument("--python", default=sys.executable, help="the Python that runs fetchpool")
    args = parser.parse_args()
    servers = [_Server(("127.0.0.1", 0), _Handler) for _ in range(args.hosts)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = [server.server_address[1] for server in servers]
    urls = [
        f"http://127.0.0.1:{port}/f{i}.bin" for i in range(args.urls_per_host) for port in ports
    ]
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "urls.txt"
        source.write_text("\n".join(urls) + "\n")
        command = (
            f"ulimit -n {args.ulimit}; exec {args.python} -m fetchpool get {source} "
            f"-o {Path(work) / 'out'} --threads 64 --per-host 16 --allow-private-networks -q"
        )
        started = time.perf_counter()
        result = subprocess.run(
            ["bash", "-c", command], check=False, capture_output=True, text=True
        )
        wall = time.perf_counter() - started
    for server in servers:
        server.shutdown()
    print(
        f"{shlex.quote(args.python)}: exit {result.returncode}, {len(urls)} URLs on "
        f"{args.hosts} hosts, {COUNTER.accepted} connections, {wall:.1f} s"
    )
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
