"""W5, a web-like workload: many hosts, mostly HTTPS, long-tailed latency, errors, stalls.

What it models (see docs/benchmarks.md, "W5"):

* ``hosts`` host names ``hNNN.web.test``, each on its own loopback address 127.10.X.Y, served by
  the one nginx process (a ``server`` block per host, listening on that address only). 85 % of
  the hosts are HTTPS with their own certificate (ECDSA P-256, a subjectAltName for the host)
  signed by a CA the harness makes with the ``openssl`` CLI; 15 % are plain HTTP.
* Name resolution without touching the machine: each tool runs in a private mount namespace in
  which a generated hosts file is bind-mounted over ``/etc/hosts`` (``unshare --mount``; see
  :func:`wrap`). Every tool resolves through the C library (or c-ares, which reads the same
  file), so every tool sees the same names with no option of its own and no DNS server; the
  machine's ``/etc/hosts`` is never written. Lookups cost what a hosts-file lookup costs (no
  DNS latency).
* Host popularity is skewed (Zipf, s = 0.8, after one URL per host): the top host has ~8 % of
  the URLs, the next few several percent each, the long tail one or two each.
* Latency per URL, carried in the URL and slept by lua (``ngx.sleep``: a timer): lognormal,
  median 80 ms, p99 2 s (sigma 1.38), capped at 4 s (below every tool's 5 s idle timeout,
  so that every 200 can be had: a lost photo is the tool's doing).
* Outcomes: 2 % 404, 1 % 500 (after their latency), 4 % same-host redirects, 4 % cross-host
  redirects (to any host from an HTTP host, so some are upgrades to HTTPS; to an HTTPS
  host from an HTTPS host: downgrades are rare on the web, and fetchpool refuses them),
  0.5 % *hang* (headers with the full Content-Length, 16 KB of body, then nothing for 30 s,
  then the connection is dropped), 0.25 % *trickle* (headers, then 256 bytes every 0.5 s for
  20 s, then dropped). Everything else is a 200 with a distinct corpus photo (~125 KB).

URL paths (every basename ``pNNNNN.jpg`` is unique over the whole list, so tools that name
files by basename never collide; redirects keep the basename)::

    /ok/{ms}/p{i}.jpg                     sleep ms, then photo i
    /st/{code}/{ms}/p{i}.jpg              sleep ms, then status code (404, 500)
    /rs/{ms}/p{i}.jpg                     302 to /ok/{ms}/p{i}.jpg on the same host
    /rx/{scheme}/{host}/{ms}/p{i}.jpg     302 to {scheme}://{host}/ok/{ms}/p{i}.jpg
    /hang/p{i}.jpg, /trickle/p{i}.jpg     the stalls above
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness.env import WORK_DIR

WEB_DIR = WORK_DIR / "web"
DOMAIN = "web.test"
HTTP_SHARE = 0.15
ZIPF_S = 0.8
LAT_MEDIAN_MS = 80.0
LAT_SIGMA = math.log(2000 / 80) / 2.3263  # p99 = 2 s
LAT_CAP_MS = 4000  # below the idle timeout: every 200 can be fetched by every tool
SHARES = {"404": 0.02, "500": 0.01, "rs": 0.04, "rx": 0.04, "hang": 0.005, "trickle": 0.0025}
HANG_S, TRICKLE_S, TRICKLE_EVERY_S, TRICKLE_BYTES = 30, 20, 0.5, 256

#: every tool gets the same limits (where it has the option; see tools.py)
CONNECT_TIMEOUT_S = 10
IDLE_TIMEOUT_S = 5  # no byte for this long: give up (hang)
TOTAL_TIMEOUT_S = 10  # one attempt in all (trickle)
PER_HOST = 16
SEED = 14


@dataclass(frozen=True)
class Host:
    name: str
    addr: str
    https: bool


@dataclass(frozen=True)
class WebUrl:
    url: str
    kind: str  # ok, 404, 500, rs, rx, hang, trickle
    host: int
    photo: int
    latency_ms: int

    @property
    def good(self) -> bool:
        """Should end as a saved photo (a 200, possibly after redirects)."""
        return self.kind in ("ok", "rs", "rx")

    def slot_s(self) -> float:
        """How long this URL occupies one connection, at best (the floor's unit)."""
        if self.kind == "hang":
            return IDLE_TIMEOUT_S
        if self.kind == "trickle":
            return TOTAL_TIMEOUT_S
        return self.latency_ms / 1000


@dataclass
class WebSite:
    """The generated site: hosts, URLs, ports, CA and hosts file."""

    hosts: list[Host]
    urls: list[WebUrl]
    https_port: int
    http_port: int
    dir: Path = WEB_DIR
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_bundle(self) -> Path:
        """The system's trust store plus the local CA: what every tool is told to trust."""
        return self.dir / "ca-bundle.pem"

    @property
    def hosts_file(self) -> Path:
        return self.dir / "hosts"

    def base(self, h: Host) -> str:
        return (
            f"https://{h.name}:{self.https_port}"
            if h.https
            else f"http://{h.name}:{self.http_port}"
        )

    def good_photos(self) -> set[int]:
        return {u.photo for u in self.urls if u.good}

    def floor_s(self, concurrency: int, per_host: int = PER_HOST) -> float:
        """A lower bound on the wall time: total connection-time / C, the busiest host's
        connection-time / per-host limit, the longest single URL."""
        total = sum(u.slot_s() for u in self.urls)
        per: dict[int, float] = {}
        for u in self.urls:
            per[u.host] = per.get(u.host, 0.0) + u.slot_s()
        longest = max(u.slot_s() for u in self.urls)
        return max(total / concurrency, max(per.values()) / per_host, longest)

    def describe(self) -> dict[str, object]:
        kinds = Counter(u.kind for u in self.urls)
        lat = sorted(u.latency_ms for u in self.urls)
        per = Counter(u.host for u in self.urls)
        top = [round(100 * c / len(self.urls), 1) for _, c in per.most_common(5)]
        return {
            "hosts": len(self.hosts),
            "https_hosts": sum(h.https for h in self.hosts),
            "urls": len(self.urls),
            "kinds": dict(kinds),
            "good": sum(u.good for u in self.urls),
            "latency_ms": {
                "median": lat[len(lat) // 2],
                "p90": lat[int(len(lat) * 0.9)],
                "p99": lat[int(len(lat) * 0.99)],
                "max": lat[-1],
                "mean": round(sum(lat) / len(lat)),
            },
            "top_hosts_pct": top,
        }


def _addr(k: int) -> str:
    return f"127.10.{k // 200}.{k % 200 + 1}"


def _port_free(port: int, addr: str = "127.10.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((addr, port))
        except OSError:
            return False
    return True


def _ports() -> tuple[int, int]:
    for https_port in range(18443, 18543, 2):
        if _port_free(https_port) and _port_free(https_port + 1):
            return https_port, https_port + 1
    raise RuntimeError("no free port pair on 127.10.0.1")


def plan(n: int, n_hosts: int, seed: int = SEED) -> tuple[list[Host], list[dict[str, object]]]:
    """Hosts and, per URL, its host, kind, latency and photo (before ports are known)."""
    rng = random.Random(seed)
    hosts = []
    http_hosts = set(rng.sample(range(n_hosts), round(n_hosts * HTTP_SHARE)))
    for k in range(n_hosts):
        hosts.append(Host(f"h{k:03d}.{DOMAIN}", _addr(k), k not in http_hosts))
    # one URL per host, the rest by Zipf popularity (host 0 the most popular)
    weights = [1 / (r + 1) ** ZIPF_S for r in range(n_hosts)]
    owners = list(range(min(n, n_hosts))) + rng.choices(
        range(n_hosts), weights=weights, k=max(0, n - n_hosts)
    )
    rng.shuffle(owners)
    kinds = ["ok"] * n
    free = list(range(n))
    rng.shuffle(free)
    for kind, share in SHARES.items():
        for _ in range(max(1, round(n * share))):
            kinds[free.pop()] = kind
    mu = math.log(LAT_MEDIAN_MS)
    rows = []
    for i in range(n):
        lat = int(min(LAT_CAP_MS, max(1.0, rng.lognormvariate(mu, LAT_SIGMA))))
        rows.append({"host": owners[i], "kind": kinds[i], "photo": i, "latency_ms": lat})
    # cross-host redirect targets: any other host from an HTTP host, an HTTPS one from HTTPS
    for row in rows:
        if row["kind"] == "rx":
            src = int(row["host"])  # type: ignore[call-overload]
            choices = [
                k for k in range(n_hosts) if k != src and (hosts[k].https or not hosts[src].https)
            ]
            row["target"] = rng.choice(choices)
    return hosts, rows


def build(n: int, n_hosts: int, root: Path) -> WebSite:
    """Generate the site: CA and certificates (cached), URLs, hosts file, nginx server blocks."""
    hosts, rows = plan(n, n_hosts)
    https_port, http_port = _ports()
    site = WebSite(hosts, [], https_port, http_port)
    site.dir.mkdir(parents=True, exist_ok=True)
    _certificates(site)
    urls = []
    for row in rows:
        h = hosts[int(row["host"])]  # type: ignore[call-overload]
        i, ms, kind = int(row["photo"]), int(row["latency_ms"]), str(row["kind"])  # type: ignore[call-overload]
        name = f"p{i:05d}.jpg"
        if kind == "ok":
            path = f"/ok/{ms}/{name}"
        elif kind in ("404", "500"):
            path = f"/st/{kind}/{ms}/{name}"
        elif kind == "rs":
            path = f"/rs/{ms}/{name}"
        elif kind == "rx":
            t = hosts[int(row["target"])]  # type: ignore[call-overload]
            path = f"/rx/{'https' if t.https else 'http'}/{t.name}/{ms}/{name}"
        else:
            path = f"/{kind}/{name}"
        urls.append(WebUrl(site.base(h) + path, kind, int(row["host"]), i, ms))  # type: ignore[call-overload]
    site.urls = urls
    site.hosts_file.write_text(
        "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in hosts)
    )
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    site.ca_bundle.write_bytes(
        (system.read_bytes() if system.exists() else b"") + site.ca_file.read_bytes()
    )
    site.notes = site.describe()
    (site.dir / "nginx-sites.conf").write_text(nginx_servers(site, root))
    return site


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificates(site: WebSite) -> None:
    """A CA, one leaf key, and a certificate per HTTPS host; kept between runs."""
    certs = site.dir / "certs"
    certs.mkdir(exist_ok=True)
    ca_key = site.dir / "ca.key"
    if not site.ca_file.exists() or not ca_key.exists():
        _openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(ca_key), "-out", str(site.ca_file), "-days", "3650",
            "-subj", "/CN=fetchpool bench CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        for old in certs.glob("*.pem"):
            old.unlink()
    leaf_key = site.dir / "leaf.key"
    if not leaf_key.exists():
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", str(leaf_key))  # fmt: skip
    for h in site.hosts:
        pem = certs / f"{h.name}.pem"
        if h.https and not pem.exists():
            _openssl(
                "req", "-x509", "-new", "-key", str(leaf_key), "-CA", str(site.ca_file),
                "-CAkey", str(ca_key), "-subj", f"/CN={h.name}", "-days", "3650",
                "-addext", f"subjectAltName=DNS:{h.name}",
                "-addext", "basicConstraints=critical,CA:FALSE",
                "-addext", "keyUsage=critical,digitalSignature",
                "-addext", "extendedKeyUsage=serverAuth",
                "-out", str(pem),
            )  # fmt: skip


def nginx_servers(site: WebSite, root: Path) -> str:
    """The http-block text: shared settings, a locations file, a server block per host."""
    photos = root.resolve() / "photo"
    locations = site.dir / "nginx-locations.conf"
    sleep = (
        "access_by_lua_block { local ms = tonumber(ngx.var.lat_ms); "
        "if ms > 0 then ngx.sleep(ms / 1000) end }"
    )
    hp, sp = site.http_port, site.https_port
    locations.write_text(
        f"""\
location ~ "^/ok/(\\d+)/p(\\d+)\\.jpg$" {{
    set $lat_ms $1;
    {sleep}
    alias {photos}/$2.jpg;
}}
location ~ "^/st/(\\d{{3}})/(\\d+)/p\\d+\\.jpg$" {{
    set $code $1;
    set $lat_ms $2;
    {sleep}
    content_by_lua_block {{ return ngx.exit(tonumber(ngx.var.code)) }}
}}
location ~ "^/rs/(\\d+)/(p\\d+\\.jpg)$" {{
    return 302 $scheme://$host:$server_port/ok/$1/$2;
}}
location ~ "^/rx/https/([a-z0-9.]+)/(\\d+)/(p\\d+\\.jpg)$" {{
    return 302 https://$1:{sp}/ok/$2/$3;
}}
location ~ "^/rx/http/([a-z0-9.]+)/(\\d+)/(p\\d+\\.jpg)$" {{
    return 302 http://$1:{hp}/ok/$2/$3;
}}
location ~ "^/hang/p(\\d+)\\.jpg$" {{
    set $photo $1;
    content_by_lua_block {{
        local f = io.open("{photos}/" .. ngx.var.photo .. ".jpg", "rb")
        local data = f:read("*a")
        f:close()
        ngx.header["Content-Type"] = "image/jpeg"
        ngx.header["Content-Length"] = #data
        ngx.print(string.sub(data, 1, 16384))
        ngx.flush(true)
        ngx.sleep({HANG_S})
        return ngx.exit(ngx.ERROR)
    }}
}}
location ~ "^/trickle/p(\\d+)\\.jpg$" {{
    set $photo $1;
    content_by_lua_block {{
        local f = io.open("{photos}/" .. ngx.var.photo .. ".jpg", "rb")
        local data = f:read("*a")
        f:close()
        ngx.header["Content-Type"] = "image/jpeg"
        ngx.header["Content-Length"] = #data
        ngx.send_headers()
        ngx.flush(true)
        local pos = 1
        for _ = 1, {int(TRICKLE_S / TRICKLE_EVERY_S)} do
            ngx.sleep({TRICKLE_EVERY_S})
            local ok = ngx.print(string.sub(data, pos, pos + {TRICKLE_BYTES - 1}))
            if not ok then return ngx.exit(ngx.ERROR) end
            ngx.flush(true)
            pos = pos + {TRICKLE_BYTES}
        end
        return ngx.exit(ngx.ERROR)
    }}
}}
"""
    )
    blocks = [
        "ssl_protocols TLSv1.2 TLSv1.3;",
        "ssl_session_cache shared:WEBSSL:20m;",
        "ssl_session_timeout 1h;",
        "server_names_hash_bucket_size 128;",
        "server_names_hash_max_size 4096;",
    ]
    for h in site.hosts:
        lines = [f"    listen {h.addr}:{hp};", f"    server_name {h.name};"]
        if h.https:
            lines += [
                f"    listen {h.addr}:{sp} ssl;",
                f"    ssl_certificate {site.dir / 'certs' / (h.name + '.pem')};",
                f"    ssl_certificate_key {site.dir / 'leaf.key'};",
            ]
        lines.append(f"    include {locations};")
        blocks.append("server {\n" + "\n".join(lines) + "\n}")
    return "\n".join(blocks) + "\n"


def wrap(cmd: list[str], site: WebSite) -> list[str]:
    """Run cmd with the site's hosts file as /etc/hosts, in a private mount namespace.

    ``unshare`` and ``sh`` both exec: the tool keeps the pid, so wall time, CPU and RSS are the
    tool's (plus ~2 ms for the two execs and the mount).
    """
    return [
        "unshare",
        "--mount",
        "--",
        "sh",
        "-c",
        'mount --bind "$0" /etc/hosts && exec "$@"',
        str(site.hosts_file),
        *cmd,
    ]


def can_wrap() -> str | None:
    """None when private mount namespaces work here (root, unshare), else why not."""
    if shutil.which("unshare") is None:
        return "no unshare"
    if os.geteuid() != 0:
        return "not root (unshare --mount needs CAP_SYS_ADMIN)"
    probe = subprocess.run(
        ["unshare", "--mount", "--", "true"], capture_output=True, text=True, check=False
    )
    return None if probe.returncode == 0 else f"unshare failed: {probe.stderr.strip()}"


@dataclass
class WebVerdict:
    intact: int  # distinct expected photos saved whole
    lost: int  # expected photos not saved whole
    partial: int  # files left that are no expected photo (truncated, error pages, control files)
    extra: int  # second copies of an expected photo
    detail: str


def verify_web(root: Path, good_hashes: dict[str, int]) -> WebVerdict:
    """Hash every file the tool left (hidden state folders skipped) against the good photos."""
    seen: set[int] = set()
    partial = extra = 0
    bad_names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if f.startswith("."):
                continue
            path = Path(dirpath, f)
            if path.suffix in (".json", ".parquet", ".txt"):
                continue  # img2dataset's sidecars, shard stats and tables
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            photo = good_hashes.get(digest)
            if photo is None:
                partial += 1
                if len(bad_names) < 3:
                    bad_names.append(f"{f} ({path.stat().st_size} B)")
            elif photo in seen:
                extra += 1
            else:
                seen.add(photo)
    lost = len(set(good_hashes.values())) - len(seen)
    detail = f"{len(seen)} intact, {lost} lost, {partial} partial/junk"
    if bad_names:
        detail += " e.g. " + ", ".join(bad_names)
    return WebVerdict(len(seen), lost, partial, extra, detail)


def reported_failures(tool: str, log_dir: Path, out: Path) -> int | None:
    """How many URLs the tool itself said failed (from its stderr / stats); None if unknown."""
    err = (log_dir / "stderr.txt").read_text(errors="replace") if log_dir.exists() else ""
    if tool == "curl":
        # one "curl: (N) ..." per failed transfer, amid its parallel progress meter
        return len(re.findall(r"curl: \(\d+\)", err))
    if tool == "wget2":  # its last line: "Downloaded: N files, S bytes, R redirects, E errors"
        found = re.findall(r"^Downloaded: .*?(\d+) errors?$", err + "\n" + _stdout(log_dir), re.M)
        return int(found[-1]) if found else None
    if tool == "aria2c":  # an ERROR line per failed download (its results table stops at 1,000)
        return len(re.findall(r"\] CUID#\d+ - Download aborted\.", err + "\n" + _stdout(log_dir)))
    if tool == "fetchpool":  # its journal
        db = out / ".fetchpool" / "state.db"
        if not db.exists():
            return None
        with contextlib.closing(sqlite3.connect(db)) as con:
            return int(
                con.execute("SELECT count(*) FROM records WHERE status != 'ok'").fetchone()[0]
            )
    if tool == "img2dataset":
        total = 0
        for stats in out.glob("*_stats.json"):
            try:
                total += int(json.loads(stats.read_text()).get("failed_to_download", 0))
            except (OSError, ValueError):
                return None
        return total
    return None


def _stdout(log_dir: Path) -> str:
    path = log_dir / "stdout.txt"
    return path.read_text(errors="replace") if path.exists() else ""
