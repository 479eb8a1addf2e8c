"""Cluster scaling (issue 12): a latency-bound download on 1, 2 and 4 Dask workers.

Serves ``--urls`` small images from the embedded origin (``fetchpool serve --latency L``, a
separate process on 127.0.0.1) and downloads them, each task capped at ``--threads`` fetch
threads, in these configurations:

* ``single``: the single-process baseline, one ordinary run,
  ``fetchpool.download(urls, out, threads=T, per_host=64, allow_private_networks=True)``;
* ``wN``: a ``distributed.LocalCluster`` of N worker processes (one thread each) and
  ``fetchpool.download(urls, out, cluster=client, parts=4*N, threads=T, ...)``.

Only the ``download`` call is timed; starting the LocalCluster (and importing fetchpool in its
workers) is reported separately as ``startup_s``. The configurations run round-robin
(single, w1, w2, w4, single, ...) ``--repeat`` times so machine noise is spread evenly; each
run writes to a fresh folder under a temp dir (``/dev/shm`` when there is one), removed after.
It reports, per configuration, medians of:

* wall time of the download, items/s, and the latency floor ``urls * L / (T * N)`` seconds;
* speedup against the single-process baseline and against the 1-worker cluster;
* CPU: fetchpool's (this process and its descendants, the cluster's workers included) per
  item, the origin's share of one core (it is a bottleneck near 1.0), and how busy the whole
  machine was (other users included).

Loopback only. Not a CI test: run it by hand (a few minutes at the default size)::

    .venv/bin/python benchmarks/cluster.py --urls 960 --latency 0.2 --threads 8 --workers 1,2,4

Exit status 0 when every check holds (every run ``ok == urls``; the origin never near one
core), 1 otherwise; ``--strict`` also requires the issue's expected speedups (>= 1.8x with 2
workers, >= 3.4x with 4, against the baseline). ``--json FILE`` writes every run and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

import fetchpool
from fetchpool.origin.server import image_url_for

HERE = Path(__file__).resolve().parent
#: The issue's expectations: speedup against the single-process baseline, by workers.
EXPECTED = {2: 1.8, 4: 3.4}
#: The origin is one asyncio thread: above this share of one core it may be the bottleneck.
ORIGIN_CPU_LIMIT = 0.5


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=960)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per response")
    parser.add_argument("--threads", type=int, default=8, help="fetch threads per task")
    parser.add_argument("--per-host", type=int, default=64, help="for the whole run")
    parser.add_argument(
        "--workers", default="1,2,4", help="comma list of cluster sizes (default 1,2,4)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument(
        "--json",
        type=Path,
        default=HERE / "results" / "cluster.json",
        help="write the figures here (default benchmarks/results/cluster.json; '-': none)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="also fail when an expected speedup is missed"
    )
    args = parser.parse_args()
    args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    if not args.workers or min(args.workers) < 1 or args.urls < 1 or args.repeat < 1:
        parser.error("--workers, --urls and --repeat must be >= 1")
    return args


@contextlib.contextmanager
def _origin(latency: float) -> Iterator[tuple[str, psutil.Process]]:
    """``fetchpool serve`` in a child process on 127.0.0.1, any free port: (base URL, process)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [
        sys.executable, "-m", "fetchpool", "serve", "--host", "127.0.0.1", "--port", "0",
        "--latency", str(latency),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        base = proc.stdout.readline().strip()
        if not base.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the origin did not start (said {base!r})")
        yield base, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _warm(base: str) -> None:
    """Draw the origin's base pictures now (~30 ms each on first request), not in a run."""
    import urllib.request

    for n in range(16):  # images.POOL_SIZE
        url = f"{base}/small/{n}.jpg?latency=0"
        with urllib.request.urlopen(url, timeout=30) as response:  # loopback only
            response.read()


class _Cpu:
    """CPU seconds (user + system) of this process and its descendants, of the origin, and
    busy seconds of the whole machine, between ``start()`` and ``stop()``."""

    def __init__(self, origin: psutil.Process) -> None:
        self.origin = origin
        self._own: dict[int, float] = {}
        self._origin = 0.0
        self._machine = 0.0

    def _tree(self) -> dict[int, float]:
        seconds: dict[int, float] = {}
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            if proc.pid == self.origin.pid:
                continue
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                seconds[proc.pid] = t.user + t.system + t.children_user + t.children_system
        return seconds

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _origin_seconds(self) -> float:
        t = self.origin.cpu_times()
        return t.user + t.system

    def start(self) -> None:
        self._own = self._tree()
        self._origin = self._origin_seconds()
        self._machine = self._busy()

    def stop(self) -> dict[str, float]:
        own = self._tree()
        return {
            "fetchpool": sum(v - self._own.get(pid, 0.0) for pid, v in own.items()),
            "origin": self._origin_seconds() - self._origin,
            "machine": self._busy() - self._machine,
        }


def _run_single(urls_file: Path, out: Path, args: argparse.Namespace) -> tuple[Any, float]:
    began = time.perf_counter()
    report = fetchpool.download(
        urls_file,
        out,
        threads=args.threads,
        per_host=args.per_host,
        allow_private_networks=True,
    )
    return report, time.perf_counter() - began


def _preload() -> None:
    """Import what a part needs, in a worker (its first task would, inside the timing)."""
    import fetchpool.cluster.part  # noqa: F401


@contextlib.contextmanager
def _cluster(workers: int) -> Iterator[tuple[Any, float]]:
    """A LocalCluster of ``workers`` processes (as tests/test_cluster.py starts one), ready:
    (client, seconds it took to start, workers up and fetchpool imported in each)."""
    import dask
    import distributed

    began = time.perf_counter()
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
    try:
        with distributed.Client(cluster) as client:
            client.wait_for_workers(workers, timeout=120)
            client.run(_preload)
            yield client, time.perf_counter() - began
    finally:
        cluster.close()


def _one_run(
    name: str, workers: int, urls_file: Path, out: Path, cpu: _Cpu, args: argparse.Namespace
) -> dict[str, Any]:
    startup = None
    if workers == 0:
        cpu.start()
        report, wall = _run_single(urls_file, out, args)
        used = cpu.stop()
    else:
        with _cluster(workers) as (client, startup):
            cpu.start()
            began = time.perf_counter()
            report = fetchpool.download(
                urls_file,
                out,
                cluster=client,
                parts=4 * workers,
                threads=args.threads,
                per_host=args.per_host,
                allow_private_networks=True,
            )
            wall = time.perf_counter() - began
            used = cpu.stop()
            # Each part's stop watcher waits on a Dask Event for up to 0.5 s more: closing the
            # cluster under it makes the scheduler log a cancelled wait as an ERROR.
            time.sleep(1.0)
    floor = args.urls * args.latency / (args.threads * max(1, workers))
    return {
        "config": name,
        "workers": workers,
        "parts": 4 * workers if workers else None,
        "startup_s": None if startup is None else round(startup, 3),
        "wall_s": round(wall, 3),
        "floor_s": round(floor, 3),
        "items_per_s": round(args.urls / wall, 2),
        "ok": report.ok,
        "failed": report.failed,
        "errors": dict(report.errors),
        "fetchpool_cpu_s": round(used["fetchpool"], 3),
        "fetchpool_cpu_ms_per_item": round(used["fetchpool"] * 1000 / args.urls, 3),
        "origin_cpu_share": round(used["origin"] / wall, 3),
        "machine_busy_cores": round(used["machine"] / wall, 2),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def _summary(runs: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        summary[name] = {
            "workers": mine[0]["workers"],
            "parts": mine[0]["parts"],
            "runs": len(mine),
            "floor_s": mine[0]["floor_s"],
            **{
                key: _median(mine, key)
                for key in (
                    "wall_s",
                    "items_per_s",
                    "startup_s",
                    "fetchpool_cpu_ms_per_item",
                    "origin_cpu_share",
                    "machine_busy_cores",
                )
            },
        }
    base = summary["single"]["items_per_s"]
    one = summary.get("w1", {}).get("items_per_s")
    for row in summary.values():
        row["vs_single"] = round(row["items_per_s"] / base, 2)
        row["vs_w1"] = round(row["items_per_s"] / one, 2) if one else None
        row["wall_over_floor"] = round(row["wall_s"] / row["floor_s"], 2)
    return summary


def _table(summary: dict[str, dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    head = (
        f"{'config':8} {'parts':>5} {'start s':>8} {'wall s':>7} {'floor s':>7} "
        f"{'items/s':>8} {'vs single':>9} {'vs w1':>6} {'CPU ms/item':>11} "
        f"{'origin':>6} {'busy cores':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, row in summary.items():
        vs_w1 = "-" if row["vs_w1"] is None else f"{row['vs_w1']:.2f}x"
        lines.append(
            f"{name:8} {fmt(row['parts'], 'd'):>5} {fmt(row['startup_s'], '.2f'):>8} "
            f"{row['wall_s']:7.2f} {row['floor_s']:7.2f} {row['items_per_s']:8.1f} "
            f"{row['vs_single']:8.2f}x {vs_w1:>6} "
            f"{row['fetchpool_cpu_ms_per_item']:11.2f} {row['origin_cpu_share']:6.2f} "
            f"{row['machine_busy_cores']:10.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    args = _parse()
    shm = Path("/dev/shm")
    scratch = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fetchpool-cluster-", dir=scratch))
    work.mkdir(parents=True, exist_ok=True)
    configs = [("single", 0)] + [(f"w{w}", w) for w in args.workers]
    names = [name for name, _ in configs]
    runs: list[dict[str, Any]] = []
    started = datetime.datetime.now(datetime.UTC)
    try:
        with _origin(args.latency) as (base, origin_proc):
            _warm(base)
            host, port = base.removeprefix("http://").rsplit(":", 1)
            urls_file = work / "urls.txt"
            urls_file.write_text(
                "".join(
                    f"{image_url_for(host, int(port), i, small=True)}\n" for i in range(args.urls)
                )
            )
            cpu = _Cpu(origin_proc)
            for workers in args.workers:
                share = -(-args.per_host // workers)  # the driver's ceil(per_host / workers)
                if share < args.threads:
                    print(
                        f"note: with {workers} workers each part may open only {share} "
                        f"connections to the origin (--per-host {args.per_host} is shared out), "
                        f"fewer than --threads {args.threads}: the floor below is not reachable"
                    )
            print(
                f"{args.urls} URLs from {base} (latency {args.latency} s), {args.threads} threads "
                f"per task, configurations {', '.join(names)}, {args.repeat} rounds; in {work}"
            )
            for round_ in range(args.repeat):
                for name, workers in configs:
                    out = work / f"{name}-{round_}"
                    try:
                        run = _one_run(name, workers, urls_file, out, cpu, args)
                    finally:
                        shutil.rmtree(out, ignore_errors=True)
                    run["round"] = round_
                    runs.append(run)
                    print(
                        f"round {round_ + 1} {name:6} "
                        + (f"start {run['startup_s']:5.2f} s  " if workers else " " * 15)
                        + f"wall {run['wall_s']:6.2f} s (floor {run['floor_s']:5.2f})  "
                        f"{run['items_per_s']:6.1f} items/s  ok {run['ok']}/{args.urls}  "
                        f"origin {run['origin_cpu_share']:.2f} core  "
                        f"machine {run['machine_busy_cores']:.2f} cores busy",
                        flush=True,
                    )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    summary = _summary(runs, names)
    checks = {
        f"every run ok == {args.urls} (no failures)": all(
            r["ok"] == args.urls and r["failed"] == 0 for r in runs
        ),
        f"origin below {ORIGIN_CPU_LIMIT} core in every run": all(
            r["origin_cpu_share"] < ORIGIN_CPU_LIMIT for r in runs
        ),
        "no run faster than its latency floor": all(r["wall_s"] >= r["floor_s"] for r in runs),
    }
    expected = {
        f"w{w}: >= {target}x the single-process baseline": summary[f"w{w}"]["vs_single"] >= target
        for w, target in EXPECTED.items()
        if f"w{w}" in summary
    }
    print()
    print(_table(summary))
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for name, ok in expected.items():
        print(f"{'MET ' if ok else 'MISS'}  expected {name}")
    if str(args.json) != "-":
        figures = {
            "date": started.isoformat(timespec="seconds"),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "fetchpool": _version("fetchpool._version"),
                "fetchpool_from": str(Path(fetchpool.__file__).parent),
                "distributed": _version("distributed"),
            },
            "settings": {
                "urls": args.urls,
                "latency_s": args.latency,
                "threads": args.threads,
                "per_host": args.per_host,
                "workers": args.workers,
                "repeat": args.repeat,
                "parts_per_worker": 4,
            },
            "summary": summary,
            "runs": runs,
            "checks": checks,
            "expected": expected,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"wrote {args.json}")
    passed = all(checks.values()) and (not args.strict or all(expected.values()))
    return 0 if passed else 1


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return None


if __name__ == "__main__":
    sys.exit(main())
