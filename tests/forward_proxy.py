"""A small real HTTP forward proxy for tests, on 127.0.0.1 (threaded, one thread a client).

It forwards absolute-form requests (``GET http://host:port/path``) over a new upstream
connection each (http.client, so chunked answers are undone) and relays the answer with a
Content-Length, keeping the client's connection alive; it answers ``CONNECT host:port`` with
200 and then relays bytes both ways until either side closes. ``hosts`` maps names to the
addresses the proxy connects to (its own DNS); other names are used as they are.

Options: ``credentials=("user", "pw")`` answers 407 to anything without that Basic
``Proxy-Authorization``; ``refuse=403`` answers every request with that status.
``log`` records every request head (method, target, headers lower-cased); ``connections``
counts accepted client connections.
"""

from __future__ import annotations

import base64
import http.client
import select
import socket
import socketserver
import threading
from dataclasses import dataclass
from types import TracebackType

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]


class ForwardProxy:
    def __init__(
        self,
        *,
        hosts: dict[str, str] | None = None,
        credentials: tuple[str, str] | None = None,
        refuse: int | None = None,
    ) -> None:
        self.hosts = hosts or {}
        self.refuse = refuse
        self.expected = None
        if credentials is not None:
            token = base64.b64encode(":".join(credentials).encode()).decode()
            self.expected = f"Basic {token}"
        self.log: list[Seen] = []
        self.connections = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with proxy._lock:
                    proxy.connections += 1
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,))

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def seen(self, method: str) -> list[Seen]:
        with self._lock:
            return [entry for entry in self.log if entry.method == method]

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- one client connection -------------------------------------------------------------

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        while not self.stopping.is_set():
            head = _read_head(reader)
            if head is None:
                return
            method, target, headers = head
            with self._lock:
                self.log.append(Seen(method, target, headers))
            refusal = self._refusal(headers)
            if refusal is not None:
                sock.sendall(refusal)
                continue
            if method == "CONNECT":
                self._tunnel(sock, reader, target)
                return
            if not self._forward(sock, target, headers):
                return

    def _refusal(self, headers: dict[str, str]) -> bytes | None:
        if self.refuse is not None:
            return _answer(self.refuse, b"refused by the test proxy")
        if self.expected is not None and headers.get("proxy-authorization") != self.expected:
            return _answer(407, b"credentials needed", ("Proxy-Authenticate", 'Basic realm="t"'))
        return None

    def _address(self, host: str) -> str:
        return self.hosts.get(host.lower(), host)

    def _tunnel(self, sock: socket.socket, reader: object, target: str) -> None:
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((self._address(host.strip("[]")), int(port)), 5)
        except OSError:
            sock.sendall(_answer(502, b"cannot reach the target"))
            return
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            pair = (sock, upstream)
            while not self.stopping.is_set():
                ready, _, _ = select.select(pair, [], [], 0.1)
                for source in ready:
                    try:
                        data = source.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    (upstream if source is sock else sock).sendall(data)

    def _forward(self, sock: socket.socket, target: str, headers: dict[str, str]) -> bool:
        if not target.startswith("http://"):
            sock.sendall(_answer(400, b"not absolute-form"))
            return False
        authority, _, path = target[len("http://") :].partition("/")
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "80")
        upstream = http.client.HTTPConnection(self._address(host), int(port), timeout=5)
        sent = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
        try:
            upstream.request("GET", "/" + path, headers=sent)
            answer = upstream.getresponse()
            body = answer.read()
        except OSError:
            sock.sendall(_answer(502, b"upstream failed"))
            return True
        finally:
            upstream.close()
        fields = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
        sock.sendall(_answer(answer.status, body, *fields))
        return True


def _read_head(reader: object) -> tuple[str, str, dict[str, str]] | None:
    lines: list[bytes] = []
    while True:
        try:
            line = reader.readline(65536)  # type: ignore[attr-defined]
        except OSError:
            return None
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line.rstrip(b"\r\n"))
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _answer(status: int, body: bytes, *fields: tuple[str, str]) -> bytes:
    head = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'X')}"]
    head += [f"{name}: {value}" for name, value in fields]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
