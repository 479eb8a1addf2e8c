"""Bounded at scale (RELIABILITY.md case 42): many URLs, many hosts, one very slow host.

Serves ``--urls`` URLs from ``--hosts`` embedded origins, each bound to its own loopback address
(127.0.0.2, 127.0.0.3, ...; the first one is the slow host), runs ``fetchpool get`` in a
subprocess with ``ulimit -n`` lowered, and reports:

* peak RSS of the fetchpool process (``/proc`` polling, and ``RUSAGE_CHILDREN`` ru_maxrss),
* peak open file descriptors and threads of the fetchpool process,
* wall time and items/s,
* per-host maximum concurrency, estimated from the origins' request logs (each request counts
  as busy for 80 % of the host's fixed latency, so the estimate can only be low, never high),
* that every URL reached exactly one terminal state (the journal has one row per URL).

Loopback only. Not a CI test: run it by hand (takes a few minutes at the default size)::

    .venv/bin/python benchmarks/scale.py --urls 100000 --hosts 40 --threads 256 --nofile 256

Exit status 0 when every check holds, 1 otherwise; ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fetchpool.origin import Origin
from fetchpool.state.journal import iter_journal


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--hosts", type=int, default=40, help="hosts in all, the slow one included")
    parser.add_argument("--slow-urls", type=int, default=200, help="URLs on the slow host")
    parser.add_argument("--slow-latency", type=float, default=3.0, help="seconds per response")
    parser.add_argument("--latency", type=float, default=0.02, help="fast hosts, seconds")
    parser.add_argument("--size", type=int, default=1024, help="bytes per response body")
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--per-host", type=int, default=8)
    parser.add_argument("--nofile", type=int, default=256, help="ulimit -n of the fetchpool run")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def _urls(origins: list[Origin], args: argparse.Namespace) -> list[str]:
    """Slow-host URLs spread evenly through the input; the rest round-robin over fast hosts."""
    slow, fast = origins[0], origins[1:]
    every = max(1, args.urls // max(1, args.slow_urls))
    urls: list[str] = []
    slow_left = args.slow_urls
    for i in range(args.urls):
        if slow_left and i % every == 0:
            urls.append(slow.url(f"/bytes/{args.size}?i={i}"))
            slow_left -= 1
        else:
            urls.append(fast[i % len(fast)].url(f"/bytes/{args.size}?i={i}"))
    return urls


class _Sampler(threading.Thread):
    """Polls /proc/PID for RSS, open fds and threads until the process exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_rss_kib = 0
        self.peak_fds = 0
        self.peak_threads = 0
        self.samples: list[tuple[float, int]] = []  # (seconds since start, RSS KiB)
        self._halt = threading.Event()

    def run(self) -> None:
        began = time.monotonic()
        while not self._halt.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
            except OSError:
                return
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            rss = int(fields.get("VmRSS", "0 kB").split()[0])
            threads = int(fields.get("Threads", "0").strip())
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_fds = max(self.peak_fds, fds)
            self.peak_threads = max(self.peak_threads, threads)
            self.samples.append((time.monotonic() - began, rss))
            self._halt.wait(0.2)

    def stop(self) -> None:
        self._halt.set()


def _max_overlap(times: list[float], hold: float) -> int:
    events = sorted([(t, 1) for t in times] + [(t + hold, -1) for t in times])
    busy = peak = 0
    for _, step in events:
        busy += step
        peak = max(peak, busy)
    return peak


def main() -> int:
    args = _parse()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fetchpool-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    if out.exists():
        shutil.rmtree(out)
    origins = [
        Origin(
            host=f"127.0.0.{2 + i}",
            latency=args.slow_latency if i == 0 else args.latency,
            max_log=args.urls + 1000,
        )
        for i in range(args.hosts)
    ]
    for origin in origins:
        origin.start()
    try:
        urls = _urls(origins, args)
        src = work / "urls.txt"
        src.write_text("".join(f"{u}\n" for u in urls))
        command = [
            sys.executable, "-m", "fetchpool", "get", str(src), "-o", str(out),
            "--allow-private-networks", "-q", "--threads", str(args.threads),
            "--per-host", str(args.per_host),
        ]  # fmt: skip

        print(f"{len(urls)} URLs over {args.hosts} hosts ({args.slow_urls} on the slow one)")
        print("running:", f"ulimit -n {args.nofile};", " ".join(command[1:]))
        began = time.monotonic()
        # The shell lowers the limit, then exec()s fetchpool: proc.pid is fetchpool itself.
        limited = ["sh", "-c", f'ulimit -n {args.nofile} && exec "$@"', "sh", *command]
        proc = subprocess.Popen(limited, stderr=subprocess.PIPE, text=True)
        sampler = _Sampler(proc.pid)
        sampler.start()
        _, stderr = proc.communicate()
        wall = time.monotonic() - began
        sampler.stop()
        sampler.join()
        maxrss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

        rows = list(iter_journal(out))
        statuses = Counter(str(r.status) for r in rows)
        codes = Counter(str(r.error_code) for r in rows if r.error_code)
        positions = {r.position for r in rows}
        per_host = {}
        for i, origin in enumerate(origins):
            hold = (args.slow_latency if i == 0 else args.latency) * 0.8
            per_host[origin.host] = _max_overlap([r.time for r in origin.requests()], hold)
        quarter = len(sampler.samples) // 4
        figures: dict[str, Any] = {
            "urls": len(urls),
            "hosts": args.hosts,
            "slow_urls": args.slow_urls,
            "slow_latency_s": args.slow_latency,
            "threads": args.threads,
            "per_host": args.per_host,
            "nofile": args.nofile,
            "exit_code": proc.returncode,
            "wall_s": round(wall, 1),
            "items_per_s": round(len(urls) / wall, 1),
            "peak_rss_mib": round(sampler.peak_rss_kib / 1024, 1),
            "ru_maxrss_children_mib": round(maxrss_kib / 1024, 1),
            "rss_mib_after_first_quarter": round(
                max((rss for _, rss in sampler.samples[:quarter]), default=0) / 1024, 1
            ),
            "peak_open_fds": sampler.peak_fds,
            "peak_threads": sampler.peak_threads,
            "journal_rows": len(rows),
            "distinct_positions": len(positions),
            "statuses": dict(statuses),
            "error_codes": dict(codes),
            "max_concurrency_per_host": max(per_host.values()),
            "max_concurrency_slow_host": per_host[origins[0].host],
            "requests_total": sum(len(o.requests()) for o in origins),
        }
    finally:
        for origin in origins:
            origin.stop()
    checks = {
        "exit code 0": figures["exit_code"] == 0,
        "every URL terminal (one row each)": figures["distinct_positions"] == len(urls)
        and figures["journal_rows"] == len(urls),
        "per-host concurrency <= per_host": figures["max_concurrency_per_host"] <= args.per_host,
        "open fds < ulimit -n": figures["peak_open_fds"] < args.nofile,
    }
    print(json.dumps(figures, indent=1))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if figures["exit_code"] != 0:
        print(stderr[-3000:])
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "checks": checks}, indent=1) + "\n")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
