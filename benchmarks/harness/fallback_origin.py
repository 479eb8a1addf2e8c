"""Fallback origin for machines without nginx: ``python fallback_origin.py ROOT PORT``.

Serves the same URL scheme as the nginx config in origin.py, from a thread per connection
(HTTP/1.1 keep-alive), sleeping the injected latency in that thread. Much slower per request
than nginx: results measured against it are labelled as such and are not comparable.
"""

from __future__ import annotations

import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROUTE = re.compile(r"^/lat(\d+)/(?:(photo/\d+\.jpg)|small/s\d*?(\d{3})\.jpg)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(b"ok", "text/plain")
            return
        match = ROUTE.match(self.path)
        if not match:
            self.send_error(404)
            return
        latency_ms, photo, small = match.groups()
        rel = photo if photo else f"small/{small}.jpg"
        try:
            body = (self.root / rel).read_bytes()
        except OSError:
            self.send_error(404)
            return
        if int(latency_ms):
            time.sleep(int(latency_ms) / 1000)
        self._send(body, "image/jpeg")

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # quiet: no access log, like nginx's config
        pass


def main() -> int:
    Handler.root = Path(sys.argv[1])
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    server.daemon_threads = True
    server.request_queue_size = 1024
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
