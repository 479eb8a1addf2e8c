"""Raw-socket fault servers for tests (in the style of urllib3's ``test_socketlevel.py``).

A :class:`FaultServer` listens on 127.0.0.1 only and runs ``handler(sock, server)`` in a new
thread for each accepted connection, so a test can answer with anything: a truncated body, a
reset, garbage, a stall. Handlers should use :attr:`FaultServer.stopping` to end stalls, so the
server always shuts down promptly.

    def handler(sock, server):
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 1000\\r\\n\\r\\n" + b"x" * 500)

    with FaultServer(handler) as server:
        fetch(server.url("/x"))
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

Handler = Callable[[socket.socket, "FaultServer"], None]

_MAX_REQUEST_HEAD = 64 * 1024


def read_request(sock: socket.socket, limit: int = _MAX_REQUEST_HEAD) -> bytes:
    """Read one request head (up to the blank line); returns b"" if the client went away."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        try:
            chunk = sock.recv(4096)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def header_of(request: bytes, name: str) -> str | None:
    """A header's value in a raw request head (case-insensitive), or None."""
    for line in request.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name.lower().encode():
            return value.strip().decode("latin-1")
    return None


def reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): the client sees a connection reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def response(
    status: int = 200,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    length: int | None = None,
) -> bytes:
    """A complete HTTP/1.1 response; ``length`` overrides the Content-Length sent."""
    lines = [f"HTTP/1.1 {status} X"]
    head = {"Content-Length": str(len(body) if length is None else length)}
    head.update(headers or {})
    lines += [f"{key}: {value}" for key, value in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class FaultServer:
    """A tiny threaded TCP server on 127.0.0.1 running a handler per connection."""

    def __init__(
        self,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.handler = handler
        self._tls = tls
        self._host = host
        self.stopping = threading.Event()
        self.requests: list[bytes] = []
        self.peers: list[tuple[str, int]] = []  # client addresses, in accept order
        self.local_addresses: list[str] = []  # our address as each client reached it
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._clients: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.port = 0

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        with self._lock:
            return len(self.peers)

    def url(self, path: str = "/", scheme: str | None = None, host: str | None = None) -> str:
        scheme = scheme or ("https" if self._tls else "http")
        return f"{scheme}://{host or self._host}:{self.port}{path}"

    def record(self, request: bytes) -> None:
        """Handlers call this to keep the request they read (tests inspect ``requests``)."""
        with self._lock:
            self.requests.append(request)

    def __enter__(self) -> FaultServer:
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self._host, 0))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._start(self._accept_loop)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stopping.set()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            with contextlib.suppress(OSError):
                client.close()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._clients.append(client)
                self.peers.append(peer)
                self.local_addresses.append(client.getsockname()[0])
            self._start(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            with self._wrap(client) as sock:
                self.handler(sock, self)
        except (OSError, ssl.SSLError):
            pass  # the client hanging up mid-fault is expected
        except BaseException as exc:  # kept for the test to assert on
            with self._lock:
                self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                client.close()

    @contextlib.contextmanager
    def _wrap(self, client: socket.socket) -> Iterator[socket.socket]:
        if self._tls is None:
            yield client
            return
        tls_sock = self._tls.wrap_socket(client, server_side=True)
        with self._lock:  # wrapping detached ``client``: stop() must shut this one down
            self._clients.append(tls_sock)
        try:
            yield tls_sock
        finally:
            tls_sock.close()


def serve_forever_keepalive(responder: Callable[[bytes], bytes]) -> Handler:
    """A handler answering every request on the connection with ``responder(request)``."""

    def handler(sock: socket.socket, server: FaultServer) -> None:
        while not server.stopping.is_set():
            request = read_request(sock)
            if not request:
                return
            server.record(request)
            sock.sendall(responder(request))

    return handler
