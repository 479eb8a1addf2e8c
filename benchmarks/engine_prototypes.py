#!/usr/bin/env python3
"""Issue 14: the multiplexed engine's two candidates, prototyped and measured on W2 and W4.

    python benchmarks/engine_prototypes.py                 # W2 and W4, full size, 3 rounds
    python benchmarks/engine_prototypes.py --quick         # small variants, 1 round
    python benchmarks/engine_prototypes.py --profile W4    # + py-spy of both prototypes
    python benchmarks/engine_prototypes.py --workloads= --profile W4   # only the profiles

Runs, round-robin through the harness (its nginx origin, corpus, measure.run, verify):
curl as the harness runs it, today's fetchpool (the harness's command: ``--fetch-processes
2`` on W2 and W4), and the two prototypes in benchmarks/prototypes/ — ``curl_multi.py``
(pycurl's CurlMulti) and ``selector_loop.py`` (selectors + non-blocking sockets) — with 1
and 2 processes each. Reports medians, each tool's ratio to curl *in the same round*
(median over rounds), CPU per request, peak RSS, and, from the prototypes' own stats, the
share of their CPU spent in file system calls and sha256. Writes
benchmarks/results/engine-prototypes.json (``--quick``: engine-prototypes-quick.json).

A tool with any run whose output failed verification is not reported: its row says so and
the command exits 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import env, profile
from harness.env import RESULTS_DIR, WORK_DIR, log
from harness.origin import start_origin
from harness.tools import TOOLS, RunContext
from harness.workloads import WORKLOADS, run_workload
from run import CORPUS_DIR, ensure_corpus

#: what --profile records (1 process each: py-spy follows one interpreter best)
PROFILED = ("selector-1p", "curl-multi-1p")

TOOL_ORDER = [
    "curl",
    "fetchpool",
    "curl-multi-1p",
    "curl-multi-2p",
    "selector-1p",
    "selector-2p",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N, 1 round unless --repeat")
    p.add_argument("--workloads", default="W2,W4")
    p.add_argument("--tools", default=",".join(TOOL_ORDER))
    p.add_argument("--repeat", type=int, default=None, help="rounds (default 3)")
    p.add_argument("--profile", default="", help="py-spy both prototypes on these workloads")
    p.add_argument("--no-setup", action="store_true", help="skip apt-get and the peers venv")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.tools = [t for t in args.tools.split(",") if t]
    args.profile = [w for w in args.profile.split(",") if w]
    unknown = (set(args.workloads) - set(WORKLOADS)) | (set(args.tools) - set(TOOLS))
    if unknown:
        p.error(f"unknown workloads or tools: {sorted(unknown)}")
    return args


def shard_stats(log_dir: Path) -> dict[str, float] | None:
    """The prototypes' own stats (one JSON line per process on stderr), summed."""
    try:
        lines = (log_dir / "stderr.txt").read_text().splitlines()
    except OSError:
        return None
    rows = [json.loads(line) for line in lines if line.startswith('{"proto"')]
    if not rows:
        return None
    keys = ("cpu_s", "file_s", "hash_s", "connections", "ok", "failed")
    return {k: round(sum(float(r[k]) for r in rows), 3) for k in keys}


def summarize(result: dict[str, object]) -> dict[str, dict[str, object]]:
    """Per tool: medians, ratio to curl in the same round, CPU per request, file share."""
    n = int(result["n"])  # type: ignore[call-overload]
    tools: dict[str, dict[str, object]] = result["tools"]  # type: ignore[assignment]
    curl_by_round = {
        int(r["round"]): float(r["wall_s"])
        for r in tools.get("curl", {}).get("run_records", [])  # type: ignore[attr-defined]
        if r["ok"]
    }
    table: dict[str, dict[str, object]] = {}
    for name, tool in tools.items():
        runs: list[dict[str, object]] = tool.get("run_records", [])  # type: ignore[assignment]
        failed = [r for r in runs if not r["ok"]]
        if not runs or failed:
            table[name] = {
                "verified": False,
                "why": tool.get("skipped") or (failed[0]["detail"] if failed else "no runs"),
            }
            continue
        walls = [float(r["wall_s"]) for r in runs]  # type: ignore[arg-type]
        cpus = [float(r["user_s"]) + float(r["sys_s"]) for r in runs]  # type: ignore[arg-type]
        ratios = [
            float(r["wall_s"]) / curl_by_round[int(r["round"])]  # type: ignore[arg-type, call-overload]
            for r in runs
            if int(r["round"]) in curl_by_round  # type: ignore[call-overload]
        ]
        row: dict[str, object] = {
            "verified": True,
            "runs": len(runs),
            "median_s": round(statistics.median(walls), 3),
            "min_s": round(min(walls), 3),
            "max_s": round(max(walls), 3),
            "cpu_s": round(statistics.median(cpus), 2),
            "cpu_us_per_request": round(statistics.median(cpus) / n * 1e6, 1),
            "tree_rss_mb": max(float(r["tree_rss_mb"]) for r in runs),  # type: ignore[arg-type]
            "maxrss_mb": max(float(r["maxrss_mb"]) for r in runs),  # type: ignore[arg-type]
            "x_curl_same_round": round(statistics.median(ratios), 2) if ratios else None,
            "connections": tool.get("connections"),
            "other_cpu_s_max": max(float(r.get("other_cpu_s", 0)) for r in runs),  # type: ignore[arg-type]
        }
        # The prototypes time their file and hash work with perf_counter (thread_time is a
        # real syscall on this VM: 20% of the loop). Wall time inside a call over-counts when
        # the machine preempts it, so the shares come from the round with the least other CPU.
        quiet = min(runs, key=lambda r: float(r.get("other_cpu_s", 0)))  # type: ignore[arg-type]
        stats: dict[str, float] | None = quiet.get("proto_stats")  # type: ignore[assignment]
        if stats:
            row["file_share"] = round(stats["file_s"] / stats["cpu_s"], 3)
            row["hash_share"] = round(stats["hash_s"] / stats["cpu_s"], 3)
            row["shares_from_round"] = quiet["round"]
        table[name] = row
    return table


def render(key: str, result: dict[str, object], table: dict[str, dict[str, object]]) -> str:
    head = (
        f"{key}: N = {result['n']}, latency {result['latency_ms']} ms, concurrency "
        f"{result['concurrency']}, {result['repeat']} round(s)\n"
        "| tool | median s | min-max s | x curl (same round) | CPU s | CPU µs/request "
        "| peak RSS MB (tree / largest) | file+hash share of CPU (quietest round) | TCP conns "
        "| other CPU s |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = []
    for name in [*TOOL_ORDER, *(t for t in table if t not in TOOL_ORDER)]:
        row = table.get(name)
        if row is None:
            continue
        if not row["verified"]:
            rows.append(f"| {name} | not reported: {str(row['why'])[:120]} |")
            continue
        share = (
            f"{100 * float(row['file_share']):.0f}% + {100 * float(row['hash_share']):.0f}%"  # type: ignore[arg-type]
            if "file_share" in row
            else ""
        )
        rows.append(
            f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
            f"{row['x_curl_same_round']} | {row['cpu_s']} | {row['cpu_us_per_request']} | "
            f"{row['tree_rss_mb']:.0f} / {row['maxrss_mb']:.0f} | {share} | "
            f"{row['connections']} | {row['other_cpu_s_max']} |"
        )
    return "\n".join([head, *rows])


def attach_stats(key: str, result: dict[str, object]) -> None:
    """Read each prototype run's own stats from its stderr log (kept under .work/runs)."""
    tools: dict[str, dict[str, object]] = result["tools"]  # type: ignore[assignment]
    for name, tool in tools.items():
        for run in tool.get("run_records", []):  # type: ignore[attr-defined]
            stats = shard_stats(WORK_DIR / "runs" / key / "logs" / f"{name}-{run['round']}")
            if stats is not None:
                run["proto_stats"] = stats


#: innermost native frame -> what it is, for a profile's one-line breakdown
CATEGORIES = {  # first match wins: libcurl's own frames (Curl_xfer_send) before "send ("
    "libcurl": ("libcurl",),
    "sha256": ("sha256", "SHA256"),
    "network syscalls": ("send (", "recv (", "sendto (", "recvfrom ("),
    "waiting (epoll/select)": ("epoll_wait (", "select (", "poll ("),
    "file syscalls": ("write (", "open64 (", "fsync (", "close (", "linkat (", "unlink ("),
}


def breakdown(raw: Path) -> str:
    """Share of samples per category of the innermost frame; the rest is the interpreter."""
    counts = dict.fromkeys([*CATEGORIES, "Python and the rest"], 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        where = next(
            (c for c, marks in CATEGORIES.items() if any(m in leaf for m in marks)),
            "Python and the rest",
        )
        counts[where] += int(count)
    total = max(1, sum(counts.values()))
    return "breakdown: " + ", ".join(f"{c} {100 * n / total:.0f}%" for c, n in counts.items())


def profile_prototype(
    key: str, tool: str, origin_url: str, peers_py: Path, out_root: Path, quick: bool
) -> str | None:
    """py-spy (native frames) of one run of a prototype on workload ``key``, writing to the
    same place as the measured runs (a tmpfs: on this VM's disk, fsync alone takes 60%)."""
    w = WORKLOADS[key]
    n = w.n_quick if quick else w.n
    urls = WORK_DIR / "runs" / f"{key}-profile-urls.txt"
    urls.write_text("".join(f"{origin_url}/lat{w.latency_ms}/{w.rel(i)}\n" for i in range(n)))
    ctx = RunContext(urls, n, out_root / "profile-out", w.concurrency, peers_py, urls)
    raw = profile.record(TOOLS[tool].build(ctx), f"{tool}-{key}", peers_py, ctx.out_dir)
    if raw is None:
        return None
    return breakdown(raw) + "\n" + profile.summarize(raw, top=25).split("\ntop total")[0]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.no_setup:
        env.ensure_apt_tools()
        peers_py = env.ensure_peers_venv()
    else:
        peers_py = env.peers_python() if env.peers_python().exists() else None
    if peers_py is None:
        log("the peers' venv (with pycurl) is unavailable: cannot run the prototypes")
        return 2
    env.raise_nofile_limit()
    env.ensure_bytecode()
    meta = ensure_corpus(2000, env.core_python())
    sha: dict[str, str] = meta["sha256"]  # type: ignore[assignment]
    hashes = {
        "photo": {h for k, h in sha.items() if k.startswith("photo/")},
        "small": {h for k, h in sha.items() if k.startswith("small/")},
    }
    out_root = env.default_out_root().resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report: dict[str, object] = {
        "generated": started,
        "command": "python benchmarks/engine_prototypes.py " + shlex.join(argv),
        "machine": env.machine_facts(peers_py),
        "outputs": {"root": str(out_root), "fstype": env.filesystem_of(out_root)},
        "workloads": {},
    }
    texts, all_verified = [], True
    with start_origin(CORPUS_DIR, env.core_python()) as origin:
        if "nginx" not in origin.label:
            log(f"origin is {origin.label}: numbers are not comparable to docs/benchmarks.md")
        report["origin"] = origin.label
        for key in args.workloads:
            w = WORKLOADS[key]
            log(f"{key}: {w.title}; tools: {', '.join(args.tools)}")
            result = run_workload(
                w,
                origin,
                hashes[w.kind],
                list(args.tools),
                args.repeat,
                args.quick,
                peers_py,
                out_root,
            )
            attach_stats(key, result)
            table = summarize(result)
            all_verified &= all(bool(row["verified"]) for row in table.values())
            result["summary"] = table
            report["workloads"][key] = result  # type: ignore[index]
            texts.append(render(key, result, table))
        for key in args.profile:
            for tool in PROFILED:
                summary = profile_prototype(
                    key, tool, origin.base_url, peers_py, out_root, args.quick
                )
                if summary:
                    path = RESULTS_DIR / f"engine-prototypes-profile-{tool}-{key}.txt"
                    path.write_text(summary + "\n")
                    texts.append(
                        f"py-spy --native, {tool}, {key} (also in {path.name}):\n{summary}"
                    )
    if not args.workloads:
        print("\n\n".join(texts))
        return 0
    name = "engine-prototypes-quick.json" if args.quick else "engine-prototypes.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / name).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print("\n\n".join(texts))
    if not all_verified:
        log("some runs failed verification: those tools are not reported (exit 1)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
