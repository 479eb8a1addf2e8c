#!/usr/bin/env python3
"""What TLS would add per request to the selector loop, measured without sockets.

    python benchmarks/prototypes/tls_cost.py

A selector loop does TLS through ``ssl.SSLObject`` and two ``MemoryBIO``s: bytes read from
the socket are written into the incoming BIO and the plaintext is read out of the object.
This script does a handshake in memory (an ECDSA P-256 certificate made with the ``openssl``
CLI, TLS 1.3), has the server side encrypt N responses ahead of time, then times only the
client's side: feeding each response's records in and reading the plaintext out — the work
the loop would add per response, on top of the plain-HTTP path. It also times a whole
handshake (both sides, in one process: an upper bound for the client's share).
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

READ = 256 * 1024


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"),
            *("-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def pair(cert: Path, key: Path) -> tuple[ssl.SSLObject, ssl.SSLObject, list[ssl.MemoryBIO]]:
    """A client and a server SSLObject, handshaken through memory BIOs."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    bios = [ssl.MemoryBIO() for _ in range(4)]  # c_in, c_out, s_in, s_out
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="bench.test")
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    return client, server, bios


def per_response(cert: Path, key: Path, size: int, n: int) -> float:
    """µs of client CPU to decrypt one response of ``size`` bytes (records fed as they come)."""
    client, server, bios = pair(cert, key)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    wire = []
    for _ in range(n):
        server.write(response)
        wire.append(bios[3].read())
    incoming = bios[0]
    start = time.process_time()
    for data in wire:
        for at in range(0, len(data), 65536):  # what recv would hand over from loopback
            incoming.write(data[at : at + 65536])
            try:
                while client.read(READ):
                    pass
            except ssl.SSLWantReadError:
                pass
    return (time.process_time() - start) / n * 1e6


def handshake(cert: Path, key: Path, n: int = 200) -> float:
    start = time.process_time()
    for _ in range(n):
        pair(cert, key)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        cert, key = make_cert(Path(folder))
        print(f"{ssl.OPENSSL_VERSION}")
        for size, n in ((4 * 1024, 20000), (125 * 1024, 2000)):
            print(
                f"decrypt a {size // 1024} KB response: {per_response(cert, key, size, n):6.1f} µs"
            )
        print(f"a handshake, both sides (TLS 1.3, P-256): {handshake(cert, key):6.0f} µs")


if __name__ == "__main__":
    main()
