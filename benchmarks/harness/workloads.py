"""The workloads and the round-robin runner.

Each round runs every tool once, in an order rotated by one each round, so that a slow drift of
the machine (page cache, writeback, thermal) is spread over all tools instead of landing on the
one that happened to run last. Every run gets a fresh output folder, is verified, then deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import measure, web
from harness.env import WORK_DIR, log
from harness.origin import Origin
from harness.tools import TOOLS, RunContext, tool_env
from harness.verify import verify


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    n: int
    n_quick: int
    latency_ms: int
    concurrency: int
    tools: tuple[str, ...]
    # photo: ~100 KB corpus photos; small: W4's ~4 KB files; web: W5's site (harness/web.py);
    # big: W6's camera-sized photos (harness/make_photos.py)
    kind: str = "photo"
    resize: int | None = None
    processes: int = 1
    timeout_s: float = 600.0
    # fetchpool's --fetch-processes, as docs/performance.md advises for throughput-bound runs
    # (the concurrency, the number of connections, stays the same as every peer's).
    fetch_processes: int = 1
    # W5: host names (full / quick) and the per-host limit every tool is given
    hosts: int = 0
    hosts_quick: int = 0
    per_host: int | None = None

    def floor_s(self, n: int) -> float:
        """N·L/C: the wall time with infinitely fast client and server."""
        return n * self.latency_ms / 1000 / self.concurrency

    def rel(self, i: int) -> str:
        if self.kind == "big":
            return f"big/{i:05d}.jpg"
        return f"photo/{i:05d}.jpg" if self.kind == "photo" else f"small/s{i:06d}.jpg"


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in [
        Workload(
            "W1",
            "latency-bound: 1,000 x ~100 KB, 50 ms per request, concurrency 64",
            1000,
            200,
            50,
            64,
            (
                "fetchpool",
                "wget2",
                "curl",
                "aria2c",
                "requests-threads",
                "parfive",
                "img2dataset",
                "notebook-threadpool",
            ),
        ),
        Workload(
            "W2",
            "throughput-bound: 2,000 x ~100 KB, no latency, concurrency 16",
            2000,
            400,
            0,
            16,
            (
                "fetchpool",
                "fetchpool-mux",
                "curl",
                "wget2",
                "aria2c",
                "requests-threads",
                "parfive",
                "img2dataset",
                "notebook-threadpool",
                "notebook-sequential",
            ),
            fetch_processes=2,
        ),
        Workload(
            "W3",
            "CPU-bound: 2,000 images center-cropped to 256 px, JPEG out, 2 processes",
            2000,
            200,
            0,
            16,
            ("fetchpool", "img2dataset"),
            resize=256,
            processes=2,
        ),
        Workload(
            "W4",
            "scale: 100,000 small files (~4 KB), 20 ms, concurrency 256",
            100_000,
            5000,
            20,
            256,
            ("fetchpool", "fetchpool-mux", "wget2", "curl"),
            kind="small",
            timeout_s=900.0,
            fetch_processes=2,
        ),
        Workload(
            "W5",
            "web-like: 2,000 URLs on 300 hosts (85% HTTPS), lognormal latency, errors, "
            "redirects, stalls; concurrency 64, 16 per host",
            2000,
            400,
            0,
            64,
            ("fetchpool", "wget2", "curl", "aria2c", "img2dataset"),
            kind="web",
            timeout_s=300.0,
            hosts=300,
            hosts_quick=100,
            per_host=web.PER_HOST,
        ),
        Workload(
            "W6",
            "CPU, camera photos: 400 JPEGs of 0.3-12 MP center-cropped to 256 px, 2 processes",
            400,
            60,
            0,
            16,
            ("fetchpool", "img2dataset"),
            kind="big",
            resize=256,
            processes=2,
        ),
    ]
}

#: a run during which other processes used more than this share of all cores is flagged noisy
NOISY_SHARE = 0.10

# Issue 14's targets: ratios measured in one run of `python benchmarks/run.py`.
#: workload -> (the peer it is judged against, the limit): a ratio fetchpool / peer for
#: W1, W2, W4 and W5 (W5: the fastest peer), a speed-up peer / fetchpool for W3 and W6
TARGET_LIMITS: dict[str, tuple[str, float]] = {
    "W1": ("wget2", 1.05),
    "W2": ("curl", 2.5),
    "W3": ("img2dataset", 5.0),
    "W4": ("curl", 1.5),
    "W5": ("the fastest peer", 1.10),
    "W6": ("img2dataset", 3.0),
}
#: W4's memory target: peak RSS of the whole process tree
RSS_LIMIT_MB = 150.0

TARGETS = {
    "W1": "fetchpool ≤ 1.05 x wget2",
    "W2": "fetchpool ≤ 2.5 x curl",
    "W3": "fetchpool ≥ 5 x faster than img2dataset (same processes)",
    "W4": "fetchpool ≤ 1.5 x curl and peak RSS ≤ 150 MB",
    "W5": "fetchpool ≤ 1.10 x the fastest peer, nothing lost, no partial file left",
    "W6": "fetchpool ≥ 3 x faster than img2dataset (same processes)",
    "startup": "fetchpool --help ≤ 0.3 s",
}


def _summary(runs: list[dict[str, object]]) -> dict[str, object]:
    ok = [r for r in runs if r["ok"]]
    walls = [float(r["wall_s"]) for r in ok]  # type: ignore[arg-type]
    summary: dict[str, object] = {"runs_ok": len(ok), "runs": len(runs)}
    if walls:
        summary |= {
            "median_s": round(statistics.median(walls), 3),
            "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3),
            "cpu_s": round(
                statistics.median(float(r["user_s"]) + float(r["sys_s"]) for r in ok), 2
            ),  # type: ignore[arg-type]
            "maxrss_mb": max(float(r["maxrss_mb"]) for r in ok),  # type: ignore[arg-type]
            "tree_rss_mb": max(float(r["tree_rss_mb"]) for r in ok),  # type: ignore[arg-type]
        }
        if "lost" in ok[0]:  # W5: what every run left behind (worst run shown)
            summary |= {
                "intact": min(int(r["intact"]) for r in ok),  # type: ignore[call-overload]
                "lost": max(int(r["lost"]) for r in ok),  # type: ignore[call-overload]
                "partial": max(int(r["partial"]) for r in ok),  # type: ignore[call-overload]
                "reported": [r.get("reported") for r in ok],
                "exit_codes": sorted({int(r["returncode"]) for r in ok}),  # type: ignore[call-overload]
            }
        summary["other_cpu_s"] = max(float(r.get("other_cpu_s", 0)) for r in ok)  # type: ignore[arg-type]
        conns = [int(r["connections"]) for r in ok if "connections" in r]  # type: ignore[call-overload]
        if conns:
            summary["connections"] = int(statistics.median(conns))
    failed = [r for r in runs if not r["ok"]]
    if failed:
        summary["error"] = str(failed[-1]["detail"])
    return summary


def _write_inputs(
    w: Workload, n: int, origin: Origin, wdir: Path, site: web.WebSite | None = None
) -> tuple[Path, Path]:
    if site is not None:
        urls = [u.url for u in site.urls]
    else:
        urls = [origin.url(w.latency_ms, w.rel(i)) for i in range(n)]
    urls_file, curl_cfg = wdir / "urls.txt", wdir / "curl.cfg"
    urls_file.write_text("\n".join(urls) + "\n")
    curl_cfg.write_text("".join(f'url = "{u}"\n' for u in urls))
    return urls_file, curl_cfg


def _context(
    w: Workload,
    urls_file: Path,
    n: int,
    out: Path,
    peers_python: Path | None,
    curl_cfg: Path,
    site: web.WebSite | None = None,
) -> RunContext:
    """What a tool's command line is built from, for workload ``w``."""
    return RunContext(
        urls_file,
        n,
        out,
        w.concurrency,
        peers_python,
        curl_cfg,
        w.processes,
        w.resize,
        fetch_processes=w.fetch_processes,
        per_host=w.per_host,
        ca_bundle=site.ca_bundle if site else None,
        web=site is not None,
    )


def run_workload(
    w: Workload,
    origin: Origin,
    hashes: set[str],
    tools: list[str],
    repeat: int,
    quick: bool,
    peers_python: Path | None,
    out_root: Path,
    keep_outputs: bool = False,
    site: web.WebSite | None = None,
    good_hashes: dict[str, int] | None = None,
) -> dict[str, object]:
    """Run every tool ``repeat`` times round-robin. W5 passes its ``site`` and the sha256 of
    every photo that should be saved (``good_hashes``: sha256 -> photo number)."""
    n = len(site.urls) if site else (w.n_quick if quick else w.n)
    wdir = WORK_DIR / "runs" / w.key
    shutil.rmtree(wdir, ignore_errors=True)
    wdir.mkdir(parents=True)
    urls_file, curl_cfg = _write_inputs(w, n, origin, wdir, site)
    results: dict[str, dict[str, object]] = {}
    runnable: list[str] = []
    for name in tools:
        tool = TOOLS[name]
        ctx = _context(w, urls_file, n, wdir / "probe", peers_python, curl_cfg, site)
        reason = tool.missing(ctx)
        if w.resize and not tool.supports_resize:
            reason = "cannot resize"
        results[name] = {"describe": tool.describe, "cmd": " ".join(tool.build(ctx)), "runs": []}
        if reason:
            results[name]["skipped"] = reason
            log(f"{w.key} {name}: skipped ({reason})")
        else:
            runnable.append(name)
    gave_up: set[str] = set()
    for round_no in range(repeat):
        shift = round_no % max(1, len(runnable))
        for name in runnable[shift:] + runnable[:shift]:
            if name in gave_up:
                continue
            before = origin.connections()
            busy0, origin0 = measure.machine_busy_s(), measure.tree_cpu_s(origin.proc.pid)
            own0 = measure.own_cpu_s()
            record = _one_run(
                w,
                n,
                name,
                round_no,
                wdir,
                urls_file,
                curl_cfg,
                hashes,
                peers_python,
                out_root / w.key,
                keep_outputs,
                site,
                good_hashes,
            )
            after = origin.connections()
            # CPU burnt by neither the tool, the origin nor us: other work on the machine
            other = (
                (measure.machine_busy_s() - busy0)
                - (measure.tree_cpu_s(origin.proc.pid) - origin0)
                - (measure.own_cpu_s() - own0)
                - float(record["user_s"])
                - float(record["sys_s"])
            )  # type: ignore[arg-type]
            record["other_cpu_s"] = round(max(0.0, other), 2)
            if other > NOISY_SHARE * float(record["wall_s"]) * (os.cpu_count() or 1):  # type: ignore[arg-type]
                log(f"  noisy machine: {other:.1f} CPU s used by other processes during that run")
            if before is not None and after is not None:
                record["connections"] = after - before - 1  # minus the status request
            results[name]["runs"].append(record)  # type: ignore[union-attr]
            if record.get("timed_out"):
                gave_up.add(name)
    for name in runnable:
        records = results[name]["runs"]
        results[name] |= _summary(records)  # type: ignore[arg-type]
        results[name]["run_records"] = records  # "runs" is now their count; keep each run
    return {
        "key": w.key,
        "title": w.title,
        "n": n,
        "latency_ms": w.latency_ms,
        "concurrency": w.concurrency,
        "processes": w.processes,
        "resize": w.resize,
        "floor_s": round(site.floor_s(w.concurrency) if site else w.floor_s(n), 3),
        "per_host": w.per_host,
        "site": site.notes if site else None,
        "repeat": repeat,
        "origin": origin.label,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tools": results,
    }


def _one_run(
    w: Workload,
    n: int,
    name: str,
    round_no: int,
    wdir: Path,
    urls_file: Path,
    curl_cfg: Path,
    hashes: set[str],
    peers_python: Path | None,
    out_parent: Path,
    keep_outputs: bool,
    site: web.WebSite | None = None,
    good_hashes: dict[str, int] | None = None,
) -> dict[str, object]:
    tool = TOOLS[name]
    out = out_parent / f"{name}-{round_no}"
    shutil.rmtree(out, ignore_errors=True)
    ctx = _context(w, urls_file, n, out, peers_python, curl_cfg, site)
    if name not in ("img2dataset",):
        out.mkdir(parents=True)  # img2dataset wants to create its folder itself
    os.sync()  # the previous run's writeback must not be billed to this one
    cmd = tool.build(ctx)
    log_dir = wdir / "logs" / f"{name}-{round_no}"
    m = measure.run(
        web.wrap(cmd, site) if site else cmd,
        log_dir,
        env=tool_env(tool, ctx),
        timeout_s=w.timeout_s,
    )
    if site is not None:
        return _web_record(w, name, round_no, m, out, log_dir, good_hashes or {}, keep_outputs)
    if m.returncode == 0 or m.timed_out:
        verdict = verify(out, n, hashes, w.resize, seed=round_no)
        ok, detail = verdict.ok and not m.timed_out, verdict.detail
        if m.timed_out:
            detail = f"timed out after {w.timeout_s:.0f}s"
    else:
        verdict = verify(out, n, hashes, w.resize, seed=round_no)
        ok, detail = False, f"exit {m.returncode}: {m.stderr_tail[-600:]}"
    record = m.to_dict() | {"ok": ok, "count": verdict.count, "detail": detail, "round": round_no}
    record.pop("cmd")
    status = "ok" if ok else "FAILED"
    log(
        f"{w.key} round {round_no + 1} {name:20s} {m.wall_s:8.3f}s  rss {m.tree_rss_mb:7.1f} MB"
        f"  {status}: {detail[:160]}"
    )
    if not keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def _web_record(
    w: Workload,
    name: str,
    round_no: int,
    m: measure.Measurement,
    out: Path,
    log_dir: Path,
    good_hashes: dict[str, int],
    keep_outputs: bool,
) -> dict[str, object]:
    """W5: every tool exits non-zero (404s, 500s, stalls are expected); a run counts when it
    finished, and what it left is recorded: photos intact, lost, partial files, and how many
    failures the tool itself reported."""
    verdict = web.verify_web(out, good_hashes)
    reported = web.reported_failures(name, log_dir, out)
    detail = verdict.detail if not m.timed_out else f"timed out after {w.timeout_s:.0f}s"
    record = m.to_dict() | {
        "ok": not m.timed_out,
        "count": verdict.intact,
        "intact": verdict.intact,
        "lost": verdict.lost,
        "partial": verdict.partial,
        "extra": verdict.extra,
        "reported": reported,
        "detail": detail,
        "round": round_no,
    }
    record.pop("cmd")
    log(
        f"{w.key} round {round_no + 1} {name:20s} {m.wall_s:8.3f}s  rss {m.tree_rss_mb:7.1f} MB"
        f"  exit {m.returncode}, reported {reported}: {detail[:160]}"
    )
    if not keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return record


def run_startup(repeat: int, cmd_for: Callable[[], list[str] | None]) -> dict[str, object]:
    """fetchpool --help, whole process: what every CLI invocation pays before any work."""
    cmd = cmd_for()
    result: dict[str, object] = {
        "key": "startup",
        "title": "fetchpool --help (start-up)",
        "cmd": " ".join(cmd) if cmd else None,
        "runs": [],
    }
    if cmd is None:
        result["skipped"] = "fetchpool console script not found"
        return result
    runs: list[dict[str, object]] = []
    for i in range(max(5, repeat)):
        m = measure.run(cmd, WORK_DIR / "runs" / "startup" / str(i), timeout_s=60)
        runs.append(
            {
                "wall_s": m.wall_s,
                "user_s": m.user_s,
                "sys_s": m.sys_s,
                "maxrss_mb": m.maxrss_mb,
                "tree_rss_mb": m.tree_rss_mb,
                "ok": m.returncode == 0,
                "detail": "ok" if m.returncode == 0 else m.stderr_tail[-400:],
            }
        )
    result["runs"] = runs
    result |= _summary(runs)
    log(f"startup: fetchpool --help median {result.get('median_s')}s")
    return result


def load_json(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}
