"""Set up what the benchmarks need: Debian tools and a separate venv for the Python peers.

The peers (parfive, img2dataset, requests, py-spy) never go into fetchpool's own install: they
live in ``benchmarks/.work/peers-venv``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"
RESULTS_DIR = BENCH_DIR / "results"

# binary -> Debian package providing it
APT_TOOLS = {
    "nginx": "nginx-extras",
    "wget2": "wget2",
    "aria2c": "aria2",
    "curl": "curl",
    "/usr/bin/time": "time",
}
LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")
NDK_MODULE = Path("/usr/lib/nginx/modules/ndk_http_module.so")

PEER_REQUIREMENTS = [
    "parfive",
    "img2dataset",
    "requests",
    "py-spy",
    "Pillow",
    "numpy",
    # the multiplexed-engine prototype on libcurl (benchmarks/prototypes/curl_multi.py)
    "pycurl",
]
PEERS_VENV = WORK_DIR / "peers-venv"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def missing_apt_packages() -> list[str]:
    missing = {pkg for binary, pkg in APT_TOOLS.items() if shutil.which(binary) is None}
    if not LUA_MODULE.exists():
        missing.add("nginx-extras")
    return sorted(missing)


def ensure_apt_tools() -> None:
    """apt-get install the missing tools when we are root; otherwise say what is missing."""
    missing = missing_apt_packages()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log(f"missing {missing}; not root (or no apt-get): those tools are skipped")
        return
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=False, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *missing],
        check=False,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    # Installing nginx may start the distribution's own service on port 80; we never use it.


def peers_python() -> Path:
    return PEERS_VENV / "bin" / "python"


def ensure_peers_venv() -> Path | None:
    """Create benchmarks/.work/peers-venv with the Python peers; return its python or None."""
    marker = PEERS_VENV / ".requirements"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if marker.exists() and marker.read_text() == wanted and peers_python().exists():
        return peers_python()
    log(f"creating {PEERS_VENV} with {', '.join(PEER_REQUIREMENTS)}")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    proc = subprocess.run(
        [str(peers_python()), "-m", "pip", "install", "-q", *PEER_REQUIREMENTS],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        log(f"pip install of the peers failed:\n{proc.stderr[-2000:]}")
        return None
    marker.write_text(wanted)
    return peers_python()


def fetchpool_exe() -> Path | None:
    """fetchpool's console script from the repo's venv, else the one on PATH."""
    candidate = REPO_DIR / ".venv" / "bin" / "fetchpool"
    if candidate.exists():
        return candidate
    found = shutil.which("fetchpool")
    return Path(found) if found else None


def core_python() -> Path:
    """The python that has fetchpool (and Pillow) installed: the repo venv, else ours."""
    candidate = REPO_DIR / ".venv" / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def ensure_bytecode() -> None:
    """Compile fetchpool's modules to bytecode, as installing a wheel does.

    An editable install compiles nothing, and with ``PYTHONDONTWRITEBYTECODE`` set (as in
    some shells and CI images) every run would compile ~30 modules again (~30 ms), a cost no
    installed tool pays; the peers' packages were compiled by pip when it installed them.
    """
    py = core_python()
    where = subprocess.run(
        [str(py), "-c", "import fetchpool, os; print(os.path.dirname(fetchpool.__file__))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if where.returncode != 0:
        return
    package = where.stdout.strip()
    subprocess.run([str(py), "-m", "compileall", "-q", package], check=False)
    log(f"compiled fetchpool's bytecode in {package} (as a wheel install would)")


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE for us and our children (W4 keeps 256+ sockets and files open)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if os.geteuid() == 0 else hard
    for limit in (target, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def default_out_root() -> Path:
    """Where tools write: a tmpfs when there is one (see docs/benchmarks.md, "Outputs")."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / "fetchpool-bench"
    return WORK_DIR / "out"


def filesystem_of(path: Path) -> str:
    """fstype of the mount holding path (longest mount-point prefix in /proc/mounts)."""
    best, fstype = "", "unknown"
    resolved = str(path.resolve())
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (resolved == mnt or resolved.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(
                best
            ):
                best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def create_rate(root: Path, count: int = 2000, size: int = 4096) -> int:
    """Files per second one thread can create (open, write 4 KB, close) under root."""
    import time

    probe = root / ".create-probe"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir(parents=True)
    data = b"\0" * size
    start = time.perf_counter()
    for i in range(count):
        (probe / f"{i}.jpg").write_bytes(data)
    elapsed = time.perf_counter() - start
    shutil.rmtree(probe, ignore_errors=True)
    return int(count / elapsed)


def _first_line(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return 0.0


def _peer_versions(py: Path | None) -> dict[str, str]:
    if py is None:
        return {}
    code = (
        "import importlib.metadata as m\n"
        "for n in ('parfive','img2dataset','requests','aiohttp','py-spy'):\n"
        "    try: print(n, m.version(n))\n"
        "    except Exception: print(n, 'unavailable')\n"
    )
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)


def _git_commit() -> str:
    # read-only: which commit of fetchpool was measured
    proc = subprocess.run(
        ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = proc.stdout.strip() or "unknown"
    return commit + ("+dirty-src" if dirty.stdout.strip() else "")


def machine_facts(peers_py: Path | None) -> dict[str, object]:
    fp = fetchpool_exe()
    versions = {
        "nginx": _first_line(["nginx", "-v"]),
        "curl": _first_line(["curl", "--version"]),
        "wget2": _first_line(["wget2", "--version"]),
        "aria2c": _first_line(["aria2c", "--version"]),
        "fetchpool": _first_line([str(fp), "--version"]) if fp else "unavailable",
        **_peer_versions(peers_py),
    }
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "fetchpool_commit": _git_commit(),
        "versions": versions,
    }
