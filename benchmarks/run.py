#!/usr/bin/env python3
"""Benchmark fetchpool against wget2, curl, aria2c, parfive, img2dataset, requests and the
notebook's loops, on an nginx origin on 127.0.0.1 with injected latency.

    python benchmarks/run.py                      # everything, 3 round-robin runs each
    python benchmarks/run.py --quick              # small variants, 1 run: for development
    python benchmarks/run.py --workloads W1,W2 --repeat 5
    python benchmarks/run.py --workloads W1 --tools fetchpool,wget2 --profile W1

Sets itself up (apt tools when root, the peers' venv under benchmarks/.work/, the corpus),
writes benchmarks/results/latest.json (quick runs: quick.json), SVG charts in
benchmarks/results/, and, for full runs, the results section of docs/benchmarks.md.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import env, profile, report, web
from harness.env import RESULTS_DIR, WORK_DIR, log
from harness.origin import start_origin
from harness.tools import TOOLS, RunContext, fetchpool_cmd, fetchpool_mux_cmd
from harness.workloads import WORKLOADS, load_json, run_startup, run_workload

CORPUS_DIR = WORK_DIR / "corpus"
ALL = [*WORKLOADS, "startup"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N, 1 run unless --repeat")
    p.add_argument("--workloads", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    p.add_argument(
        "--tools", default="", help=f"comma list (default: per workload) of {','.join(TOOLS)}"
    )
    p.add_argument("--repeat", type=int, default=None, help="runs per tool (default 3)")
    p.add_argument("--fallback-origin", action="store_true", help="do not use nginx")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--profile", default="", help="py-spy one fetchpool run of these workloads")
    p.add_argument("--no-setup", action="store_true", help="skip apt-get and the peers venv")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    p.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="where tools write (default: a tmpfs, /dev/shm, when there is one)",
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's output folder")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - set(ALL)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}")
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if set(args.tools) - set(TOOLS):
        p.error(f"unknown tools {sorted(set(args.tools) - set(TOOLS))}")
    args.profile = [w.strip() for w in args.profile.split(",") if w.strip()]
    return args


def ensure_corpus(count: int, python: Path) -> dict[str, object]:
    manifest = CORPUS_DIR / "manifest.json"
    meta = load_json(manifest)
    if int(meta.get("count", 0)) < count:  # type: ignore[arg-type]
        log(f"generating {count} corpus photos into {CORPUS_DIR}")
        subprocess.run(
            [
                str(python),
                str(Path(__file__).parent / "harness" / "make_corpus.py"),
                str(CORPUS_DIR),
                str(count),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        meta = load_json(manifest)
    return meta


def ensure_big_photos(count: int) -> None:
    """W6's camera-sized photos under the corpus folder (generated once, kept)."""
    meta = load_json(CORPUS_DIR / "big-manifest.json")
    if int(meta.get("count", 0)) >= count:  # type: ignore[call-overload]
        return
    log(f"generating {count} camera-sized photos (0.3-12 MP) into {CORPUS_DIR / 'big'}")
    subprocess.run(
        [
            str(env.core_python()),
            str(Path(__file__).parent / "harness" / "make_photos.py"),
            str(CORPUS_DIR),
            str(count),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _web_site(quick: bool, sha: dict[str, str]) -> tuple[web.WebSite | None, dict[str, int]]:
    """W5's site (certificates, hosts file, nginx server blocks) and its good photos' sha256."""
    why = web.can_wrap()
    if why:
        log(f"W5 needs a private /etc/hosts per tool run ({why}): W5 is skipped")
        return None, {}
    w = WORKLOADS["W5"]
    site = web.build(w.n_quick if quick else w.n, w.hosts_quick if quick else w.hosts, CORPUS_DIR)
    log(f"W5 site: {site.notes}")
    good = {sha[f"photo/{i:05d}.jpg"]: i for i in site.good_photos()}
    return site, good


def fetchpool_ready() -> str | None:
    """None when `fetchpool get --help` works, else why not."""
    exe = env.fetchpool_exe()
    if exe is None:
        return "no fetchpool console script"
    proc = subprocess.run([str(exe), "get", "--help"], capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.no_setup:
        env.ensure_apt_tools()
        peers_py = env.ensure_peers_venv()
    else:
        peers_py = env.peers_python() if env.peers_python().exists() else None
    env.raise_nofile_limit()
    env.ensure_bytecode()
    not_ready = fetchpool_ready()
    if not_ready:
        log(f"fetchpool is not ready ({not_ready}): its runs will be reported as failed")
    photos = (
        max(
            (WORKLOADS[w].n_quick if args.quick else WORKLOADS[w].n)
            for w in args.workloads
            if w in WORKLOADS and WORKLOADS[w].kind == "photo"
        )
        if any(w in WORKLOADS and WORKLOADS[w].kind == "photo" for w in args.workloads)
        else 1
    )
    if "W5" in args.workloads:  # every W5 URL names a distinct corpus photo
        photos = max(photos, WORKLOADS["W5"].n_quick if args.quick else WORKLOADS["W5"].n)
    meta = ensure_corpus(max(photos, 2000 if not args.quick else photos), env.core_python())
    sha = meta["sha256"]  # type: ignore[index]
    hashes = {
        "photo": {h for k, h in sha.items() if k.startswith("photo/")},  # type: ignore[union-attr]
        "small": {h for k, h in sha.items() if k.startswith("small/")},
    }  # type: ignore[union-attr]
    out_root = (args.out_root or env.default_out_root()).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    outputs = {
        "root": str(out_root),
        "fstype": env.filesystem_of(out_root),
        "create_per_s": env.create_rate(out_root),
        "disk_create_per_s": env.create_rate(WORK_DIR),
    }
    log(
        f"outputs in {out_root} ({outputs['fstype']}, {outputs['create_per_s']} files/s; "
        f"the work tree's disk: {outputs['disk_create_per_s']} files/s)"
    )
    results_path = RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    results = load_json(results_path)
    results.setdefault("workloads", {})
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    site, good_hashes, extra_conf = None, {}, ""
    if "W5" in args.workloads:
        site, good_hashes = _web_site(args.quick, sha)  # type: ignore[arg-type]
        extra_conf = (site.dir / "nginx-sites.conf").read_text() if site else ""
    if "W6" in args.workloads:
        ensure_big_photos(WORKLOADS["W6"].n_quick if args.quick else WORKLOADS["W6"].n)
    with start_origin(
        CORPUS_DIR, env.core_python(), args.nginx_workers, args.fallback_origin, extra_conf
    ) as origin:
        log(f"origin: {origin.label} at {origin.base_url}")
        for key in args.workloads:
            if key == "startup":
                results["workloads"]["startup"] = run_startup(  # type: ignore[index]
                    args.repeat, _help_cmd
                )
                continue
            w = WORKLOADS[key]
            if w.kind == "web" and (site is None or "nginx" not in origin.label):
                log(f"{key}: skipped (needs nginx and unshare: {web.can_wrap() or 'no nginx'})")
                continue
            tools = [t for t in w.tools if not args.tools or t in args.tools] or list(w.tools)
            log(f"{key}: {w.title}{' (quick)' if args.quick else ''}; tools: {', '.join(tools)}")
            results["workloads"][key] = run_workload(  # type: ignore[index]
                w,
                origin,
                hashes.get(w.kind, set()),
                tools,
                args.repeat,
                args.quick,
                peers_py,
                out_root,
                args.keep_outputs,
                site if w.kind == "web" else None,
                good_hashes if w.kind == "web" else None,
            )
        for key in args.profile:
            # With fetchpool-mux among the tools, the profile is of the multiplexed engine.
            mux = "fetchpool-mux" in (args.tools or "")
            _profile(key, origin, peers_py, args.quick, mux=mux)
    results |= {
        "generated": started,
        "mode": "quick" if args.quick else "full",
        "command": "python benchmarks/run.py " + shlex.join(argv),
        "machine": env.machine_facts(peers_py),
        "origin": origin.label,
        "outputs": outputs,
        "corpus_note": f"{meta.get('count')} JPEGs, mean {meta.get('photo_mean_bytes')} bytes, "
        f"{meta.get('photo_size_px')} px, from {meta.get('source')}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    raw_dir = RESULTS_DIR / "raw"
    raw_dir.mkdir(exist_ok=True)
    (raw_dir / f"{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(json.dumps(results))
    report.write_outputs(results, write_doc=not (args.quick or args.no_docs))
    print(report.render_results(results))
    return 0


def _help_cmd() -> list[str] | None:
    exe = env.fetchpool_exe()
    return [str(exe), "--help"] if exe else None


def _profile(key: str, origin: object, peers_py: Path | None, quick: bool, *, mux: bool) -> None:
    if key not in WORKLOADS or peers_py is None:
        return
    w = WORKLOADS[key]
    n = w.n_quick if quick else w.n
    wdir = WORK_DIR / "runs" / key
    ctx = RunContext(
        wdir / "urls.txt",
        n,
        WORK_DIR / "profile-out",
        w.concurrency,
        peers_py,
        wdir / "curl.cfg",
        w.processes,
        w.resize,
    )
    if not ctx.urls_file.exists():
        ctx.urls_file.parent.mkdir(parents=True, exist_ok=True)
        urls = [origin.url(w.latency_ms, w.rel(i)) for i in range(n)]  # type: ignore[attr-defined]
        ctx.urls_file.write_text("\n".join(urls) + "\n")
    log(f"profiling fetchpool{' --engine multiplexed' if mux else ''} on {key} with py-spy")
    command = fetchpool_mux_cmd(ctx) if mux else fetchpool_cmd(ctx)
    raw = profile.record(command, key, peers_py, ctx.out_dir)
    if raw:
        summary = profile.summarize(raw)
        (WORK_DIR / f"profile-{key}-summary.txt").write_text(summary)
        print(f"\n== py-spy {key} ==\n{summary}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
