"""Shared helpers for the adversarial-case suites (``tests/test_reliability*.py``).

Everything here listens on loopback only. Hostile content is served by :func:`content_server`
(a :class:`FaultServer` answering each path with fixed bytes); the embedded origin covers the
rest. Nothing resolves real names: tests that need names inject a resolver.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fetchpool.config import FetchConfig, ImageConfig
from fetchpool.fetch import AddressGuard, HttpFetcher
from fetchpool.models import Record
from fetchpool.process import ImageResult, process_image
from socketserver_faults import FaultServer, read_request, response

LOOPBACK: dict[str, Any] = {"allow_private_networks": True}
#: Small limits so every fault ends in well under a few seconds.
FAST: dict[str, Any] = {
    "connect_timeout": 1.0,
    "read_timeout": 1.0,
    "total_timeout": 5.0,
    "backoff_base": 0.01,
    "backoff_max": 0.05,
}
REPO = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def final_files(out: Path) -> list[Path]:
    """Every entry of OUT except our own state folder (recursively, symlinks included)."""
    found = []
    for root, dirs, files in os.walk(out):
        if Path(root) == out and ".fetchpool" in dirs:
            dirs.remove(".fetchpool")
        found += [
            Path(root) / name for name in files + [d for d in dirs if Path(root, d).is_symlink()]
        ]
    return sorted(found)


def leftovers(out: Path) -> list[str]:
    """Temp files left anywhere under OUT (``.fp-*`` names or anything in ``tmp/``)."""
    tmp = out / ".fetchpool" / "tmp"
    found = [str(p) for p in tmp.iterdir()] if tmp.is_dir() else []
    found += [str(p) for p in out.rglob(".fp-*")]
    return sorted(set(found))


def records(report: Any) -> list[Record]:
    return sorted(report.records(), key=lambda r: r.position)


def require_loopback_address(address: str) -> None:
    """Skip the test unless ``address`` (say 127.0.0.21) can be bound here: tests with many
    hosts give each its own loopback address."""
    import pytest

    probe = socket.socket()
    try:
        probe.bind((address, 0))
    except OSError:
        pytest.skip(f"cannot bind {address} here")
    finally:
        probe.close()


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def content_server(routes: dict[str, bytes | Callable[[bytes], bytes]]) -> FaultServer:
    """A keep-alive server answering ``routes[path]`` (raw response bytes) for each request.

    A route may be a function of the raw request. Unknown paths get a 404.
    """

    def handler(sock: socket.socket, server: FaultServer) -> None:
        while not server.stopping.is_set():
            request = read_request(sock)
            if not request:
                return
            server.record(request)
            target = request.split(b" ", 2)[1].decode("latin-1") if b" " in request else "/"
            route = routes.get(target.split("?", 1)[0])
            if route is None:
                sock.sendall(response(404, b"<html>not found</html>"))
            else:
                sock.sendall(route(request) if callable(route) else route)

    return FaultServer(handler)


def injected_fetcher(
    resolver: Callable[[str, int], list[str]], **guard: Any
) -> Callable[[Path], HttpFetcher]:
    """A ``download(fetcher=...)`` factory whose guard uses ``resolver`` (no real DNS)."""

    def make(tmp: Path) -> HttpFetcher:
        config = FetchConfig(**{k: v for k, v in FAST.items() if k in FetchConfig.__slots__})
        return HttpFetcher(config, tmp, guard=AddressGuard(resolver=resolver, **guard))

    return make


# -- TLS certificates (openssl CLI; the venv has no `cryptography`) ----------------------------


def make_cert(folder: Path, name: str, *, cn: str, san: str, days: int = 1) -> tuple[str, str]:
    """A self-signed certificate + key; ``days=-1`` makes one that has already expired."""
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is on the CI image
        import pytest

        pytest.skip("openssl CLI not available")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    base = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)]
    base += ["-out", str(cert), "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}"]
    if days >= 1:
        subprocess.run([*base, "-days", str(days)], check=True, capture_output=True, timeout=60)
    else:
        # An expired certificate: `openssl ca -selfsign` accepts an explicit past window.
        csr = folder / f"{name}.csr"
        subprocess.run(
            ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={cn}"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("01\n")
        config = folder / f"{name}.cnf"
        config.write_text(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nserial = serial\n"
            "new_certs_dir = .\ndefault_md = sha256\npolicy = p\nx509_extensions = e\n"
            f"[p]\ncommonName = supplied\n[e]\nsubjectAltName = {san}\n"
        )
        subprocess.run(
            ["openssl", "ca", "-batch", "-config", str(config), "-selfsign", "-keyfile", str(key),
             "-in", str(csr), "-out", str(cert), "-startdate", "20200101000000Z",
             "-enddate", "20200102000000Z"],
            check=True, capture_output=True, timeout=60, cwd=folder,
        )  # fmt: skip
    return str(cert), str(key)


def tls_context(cert: tuple[str, str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    return context


# -- the CLI in a subprocess ------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fetchpool", *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FORCE_COLOR", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    return env


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str) -> Iterator[bool]:
    """Mount a tmpfs at ``path`` if this sandbox allows it; yields whether it did."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        yield False
        return
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


# -- a processor that misbehaves by body size (workers import it by module name) ---------------

CRASH_SIZE = 1013  # bytes of a body whose worker segfaults
HANG_SIZE = 1019  # bytes of a body whose worker never returns


def misbehaving_processor(src: str, dst: str, config: ImageConfig) -> ImageResult:
    size = os.path.getsize(src)
    if size == CRASH_SIZE:
        import ctypes
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        ctypes.string_at(0)  # a real SIGSEGV in the worker
    if size == HANG_SIZE:
        while True:  # an infinite loop, not a sleep: only a kill ends it
            pass
    return process_image(src, dst, config)


# -- every engine -------------------------------------------------------------------------------


def on_engine(module: Any, engine: str, monkeypatch: Any) -> None:
    """Make ``module``'s ``download`` and ``cli`` run on ``engine``: ``download(...,
    engine=engine)`` and ``fetchpool get ... --engine engine``. The reliability modules call
    it from an autouse fixture over ENGINES, so every case runs on every engine."""
    import functools

    import fetchpool

    monkeypatch.setattr(module, "download", functools.partial(fetchpool.download, engine=engine))

    def cli_on(*args: str) -> list[str]:
        command = cli(*args)
        return [*command, "--engine", engine] if args[:1] == ("get",) else command

    monkeypatch.setattr(module, "cli", cli_on)


#: Why a case that patches this process (DNS, the file layer, the connect spy) skips the
#: processes engine: its fetches run in worker processes that never see the patch.
IN_THIS_PROCESS = (
    "the case patches {what} in the test's process; --engine processes fetches in worker "
    "processes (spawned), which never see the patch"
)


def skip_processes(engine: str, what: str) -> None:
    if engine == "processes":
        import pytest

        pytest.skip(IN_THIS_PROCESS.format(what=what))


def injected_resolver(
    engine: str,
    monkeypatch: Any,
    resolver: Callable[[str, int], list[str]],
    **guard: Any,
) -> dict[str, Any]:
    """``download()`` arguments under which the run's address guard resolves with
    ``resolver`` (no real DNS). Threads: an injected fetcher, as before. Multiplexed: its
    driver cannot be injected (a custom fetcher would run on threads), so the resolver and
    the guard's cache TTL are patched into this process and ``allow_cidrs`` passed as the
    option it is. Processes: skipped (:data:`IN_THIS_PROCESS`)."""
    skip_processes(engine, "the address guard's resolver")
    if engine == "threads":
        return {"fetcher": injected_fetcher(resolver, **guard)}
    from fetchpool.fetch import guard as guard_module

    monkeypatch.setattr(guard_module, "system_resolver", resolver)
    if "cache_ttl" in guard:
        defaults = AddressGuard.__init__.__kwdefaults__
        assert defaults is not None
        monkeypatch.setitem(defaults, "cache_ttl", guard["cache_ttl"])
    kwargs: dict[str, Any] = {k: FAST[k] for k in ("connect_timeout", "read_timeout")}
    kwargs["total_timeout"] = FAST["total_timeout"]
    if "allow_cidrs" in guard:
        kwargs["allow_cidrs"] = guard["allow_cidrs"]
    return kwargs
