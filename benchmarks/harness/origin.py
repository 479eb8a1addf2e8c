"""The origin every benchmark downloads from: nginx on 127.0.0.1, latency injected by lua.

URL scheme (the same for nginx and the fallback)::

    /lat{MS}/photo/{i:05d}.jpg     corpus photo i, served after sleeping MS milliseconds
    /lat{MS}/small/s{i:06d}.jpg    W4's small files: distinct names, bodies cycle through
                                   the 1,000 files in corpus/small/ (last three digits)

nginx: its own config generated into benchmarks/.work/nginx/, an unprivileged port, one worker
(the other core is left to the client), access_log off, ``ngx.sleep`` in ``access_by_lua_block``
so a sleeping request holds no worker. /lat0/ skips lua entirely.
Fallback when nginx (or its lua module) is missing: a Python origin in a separate process,
labelled as such in the results.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness.env import LUA_MODULE, NDK_MODULE, WORK_DIR, log

NGINX_CONF = """\
{user}worker_processes {workers};
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
load_module {ndk};
load_module {lua};

events {{
    worker_connections 16384;
    multi_accept on;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    types {{ image/jpeg jpg; }}
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    server {{
        listen 127.0.0.1:{port} backlog=8192 reuseport;
        server_name localhost;

        location ~ "^/lat0/small/s\\d*?(\\d{{3}})\\.jpg$" {{
            alias {root}/small/$1.jpg;
        }}
        location ~ ^/lat0/(photo/\\d+\\.jpg)$ {{
            alias {root}/$1;
        }}
        location ~ "^/lat(\\d+)/small/s\\d*?(\\d{{3}})\\.jpg$" {{
            set $lat_ms $1;
            access_by_lua_block {{ ngx.sleep(tonumber(ngx.var.lat_ms) / 1000) }}
            alias {root}/small/$2.jpg;
        }}
        location ~ ^/lat(\\d+)/(photo/\\d+\\.jpg)$ {{
            set $lat_ms $1;
            access_by_lua_block {{ ngx.sleep(tonumber(ngx.var.lat_ms) / 1000) }}
            alias {root}/$2;
        }}
        location = /health {{ return 200 "ok"; }}
        location = /nginx-status {{ stub_status; }}
        location ~ "^/lat0/(big/\\d+\\.jpg)$" {{
            alias {root}/$1;
        }}
    }}
{extra}}}
"""


def free_port(preferred: int = 18431) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"origin exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"origin did not answer {url} within {timeout}s")


class Origin:
    """A running origin: ``base_url``, ``label``, and ``stop()``."""

    def __init__(self, proc: subprocess.Popen[bytes], base_url: str, label: str) -> None:
        self.proc, self.base_url, self.label = proc, base_url, label

    def url(self, latency_ms: int, rel: str) -> str:
        return f"{self.base_url}/lat{latency_ms}/{rel}"

    def connections(self) -> int | None:
        """Connections nginx has accepted so far (stub_status); None for the fallback."""
        if "nginx" not in self.label:
            return None
        try:
            with urllib.request.urlopen(self.base_url + "/nginx-status", timeout=2) as resp:
                lines = resp.read().decode().splitlines()
            return int(lines[2].split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if "nginx" in self.label else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Origin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _nofile() -> int:
    import resource

    return min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def nginx_available() -> bool:
    return shutil.which("nginx") is not None and LUA_MODULE.exists() and NDK_MODULE.exists()


def start_nginx(root: Path, workers: int = 1, extra: str = "") -> Origin:
    """nginx on 127.0.0.1; ``extra`` is more http-block text (W5's server blocks)."""
    prefix = WORK_DIR / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_port()
    # As root, nginx would drop its workers to `nobody`; keep the invoking user so the corpus
    # under the work tree stays readable.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user=user,
            workers=workers,
            nofile=_nofile(),
            prefix=prefix,
            ndk=NDK_MODULE,
            lua=LUA_MODULE,
            port=port,
            root=root.resolve(),
            extra=extra,
        )
    )
    test = subprocess.run(
        ["nginx", "-t", "-q", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed: {test.stderr.strip()}")
    proc = subprocess.Popen(
        ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    _wait_ready(base + "/health", proc)
    version = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    label = (
        f"{version.stderr.strip().removeprefix('nginx version: ')} + lua ngx.sleep, "
        f"{workers} worker{'s' if workers > 1 else ''}, 127.0.0.1"
    )
    return Origin(proc, base, label)


def start_fallback(root: Path, python: Path) -> Origin:
    """A Python origin in its own process (fetchpool's embedded origin when it serves a
    directory, else the harness's stdlib server)."""
    port = free_port()
    script = Path(__file__).with_name("fallback_origin.py")
    proc = subprocess.Popen(
        [str(python), str(script), str(root), str(port)],
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    _wait_ready(base + "/health", proc)
    label = f"FALLBACK Python origin (no nginx), {python.name} {sys.version.split()[0]}"
    return Origin(proc, base, label)


def start_origin(
    root: Path, python: Path, workers: int = 1, force_fallback: bool = False, extra: str = ""
) -> Origin:
    if not force_fallback and nginx_available():
        try:
            return start_nginx(root, workers, extra)
        except RuntimeError as exc:
            log(f"nginx failed ({exc}); using the fallback origin")
    else:
        log("nginx with the lua module is unavailable; using the fallback origin")
    return start_fallback(root, python)
