"""Every tool the benchmarks run, as one command line per workload run.

All tools get the same URL list, the same concurrency and a fresh output folder. A tool that is
not installed is skipped with a reason; a tool whose command fails is reported as failed.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness import web
from harness.env import BENCH_DIR, fetchpool_exe

PEERS_DIR = BENCH_DIR / "peers"


@dataclass
class RunContext:
    urls_file: Path
    n: int
    out_dir: Path
    concurrency: int
    peers_python: Path | None
    curl_config: Path
    processes: int = 1
    resize: int | None = None  # W3: center-crop to this square size, JPEG out
    extra: dict[str, str] = field(default_factory=dict)
    fetch_processes: int = 1  # fetchpool only: processes sharing the same concurrency
    # W5 (web-like): a per-host limit, the trust store with the local CA, and the same
    # connect / idle / total timeouts and redirect policy for every tool (see harness/web.py)
    per_host: int | None = None
    ca_bundle: Path | None = None
    web: bool = False


@dataclass
class Tool:
    name: str
    describe: str
    build: Callable[[RunContext], list[str]]
    missing: Callable[[RunContext], str | None]
    env: dict[str, str] = field(default_factory=dict)
    supports_resize: bool = False


def _need_binary(binary: str) -> Callable[[RunContext], str | None]:
    return lambda ctx: None if shutil.which(binary) else f"{binary} not installed"


def _need_peers(ctx: RunContext) -> str | None:
    return None if ctx.peers_python and ctx.peers_python.exists() else "peers venv unavailable"


def _need_fetchpool(ctx: RunContext) -> str | None:
    return None if fetchpool_exe() else "fetchpool console script not found"


def fetchpool_cmd(ctx: RunContext) -> list[str]:
    exe = fetchpool_exe()
    cmd = [
        str(exe),
        "get",
        str(ctx.urls_file),
        "-o",
        str(ctx.out_dir),
        "--threads",
        str(ctx.concurrency),
        "--per-host",
        str(ctx.per_host or ctx.concurrency),
        "--quiet",
        "--allow-private-networks",
    ]
    if ctx.web:
        # trust: SSL_CERT_FILE=ctx.ca_bundle in its environment (no CA option yet)
        cmd += [
            "--connect-timeout",
            str(web.CONNECT_TIMEOUT_S),
            "--read-timeout",
            str(web.IDLE_TIMEOUT_S),
            "--timeout",
            str(web.TOTAL_TIMEOUT_S),
            "--attempts",
            "1",
            "--max-redirects",
            "10",
        ]
    if ctx.fetch_processes > 1:
        cmd += ["--fetch-processes", str(ctx.fetch_processes)]
    if ctx.resize:
        cmd += [
            "--resize",
            str(ctx.resize),
            "--resize-mode",
            "center-crop",
            "--encode",
            "jpeg",
            "--processes",
            str(ctx.processes),
        ]
    return cmd


def fetchpool_mux_cmd(ctx: RunContext) -> list[str]:
    """fetchpool on the multiplexed engine: the same command in the same round, but one
    loop in one process (the engine takes no --fetch-processes)."""
    one = replace(ctx, fetch_processes=1)
    return [*fetchpool_cmd(one), "--engine", "multiplexed"]


def wget2_cmd(ctx: RunContext) -> list[str]:
    return [
        "wget2",
        # W5: its normal output (one line per event, to a file), for its count of errors
        "--quiet" if not ctx.web else "--no-quiet",
        "--no-config",
        "--no-robots",
        "--no-directories",
        "--max-threads",
        str(ctx.concurrency),
        "--tries",
        "1",
        "--directory-prefix",
        str(ctx.out_dir),
        "--input-file",
        str(ctx.urls_file),
    ] + (
        [
            "--connect-timeout",
            str(web.CONNECT_TIMEOUT_S),
            "--read-timeout",
            str(web.IDLE_TIMEOUT_S),  # wget2 has no total timeout per file
            "--max-redirect",
            "10",
            "--ca-certificate",
            str(ctx.ca_bundle),
        ]
        if ctx.web
        else []
    )


def curl_cmd(ctx: RunContext) -> list[str]:
    return [
        "curl",
        "--silent",
        "--show-error",
        "--fail",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        str(ctx.concurrency),
        "--create-dirs",
        "--output-dir",
        str(ctx.out_dir),
        "--remote-name-all",
        "--config",
        str(ctx.curl_config),
    ] + (
        [
            "--location",
            "--max-redirs",
            "10",
            "--connect-timeout",
            str(web.CONNECT_TIMEOUT_S),
            "--speed-limit",  # the idle timeout: < 1 byte/s for IDLE s
            "1",
            "--speed-time",
            str(web.IDLE_TIMEOUT_S),
            "--max-time",
            str(web.TOTAL_TIMEOUT_S),
            "--cacert",
            str(ctx.ca_bundle),
        ]
        if ctx.web
        else []
    )


def aria2c_cmd(ctx: RunContext) -> list[str]:
    return [
        "aria2c",
        # W5: its "Download Results" table at exit, for its count of errors
        "--quiet" if not ctx.web else "--console-log-level=error",
        "--input-file",
        str(ctx.urls_file),
        "--dir",
        str(ctx.out_dir),
        "--max-concurrent-downloads",
        str(ctx.concurrency),
        "--max-connection-per-server",
        "1",
        "--split",
        "1",
        "--auto-file-renaming=false",
        "--file-allocation=none",
        "--max-tries",
        "1",
    ] + (
        [
            "--connect-timeout",
            str(web.CONNECT_TIMEOUT_S),
            "--timeout",
            str(web.IDLE_TIMEOUT_S),  # aria2c has no total timeout per download
            "--summary-interval=0",
            "--show-console-readout=false",
            "--ca-certificate",
            str(ctx.ca_bundle),
        ]
        if ctx.web
        else []
    )


def _peer(script: str, with_concurrency: bool = True) -> Callable[[RunContext], list[str]]:
    def build(ctx: RunContext) -> list[str]:
        cmd = [str(ctx.peers_python), str(PEERS_DIR / script), str(ctx.urls_file), str(ctx.out_dir)]
        return [*cmd, str(ctx.concurrency)] if with_concurrency else cmd

    return build


def img2dataset_cmd(ctx: RunContext) -> list[str]:
    exe = Path(str(ctx.peers_python)).with_name("img2dataset")
    # one shard per process, or img2dataset leaves the second process idle
    per_shard = math.ceil(ctx.n / ctx.processes)
    cmd = [
        str(exe),
        "--url_list",
        str(ctx.urls_file),
        "--input_format",
        "txt",
        "--output_format",
        "files",
        "--output_folder",
        str(ctx.out_dir),
        "--thread_count",
        str(ctx.concurrency),
        "--processes_count",
        str(ctx.processes),
        "--number_sample_per_shard",
        str(per_shard),
        "--timeout",
        str(web.IDLE_TIMEOUT_S) if ctx.web else "30",
        "--retries",
        "0",
        "--enable_wandb",
        "False",
    ]
    if ctx.resize:
        cmd += [
            "--resize_mode",
            "center_crop",
            "--image_size",
            str(ctx.resize),
            "--encode_format",
            "jpg",
        ]
    else:
        cmd += ["--resize_mode", "no", "--disable_all_reencoding", "True"]
    return cmd


PROTOTYPES_DIR = BENCH_DIR / "prototypes"


def _prototype(script: str, processes: int) -> Callable[[RunContext], list[str]]:
    """A multiplexed-engine prototype (benchmarks/prototypes/), run by the peers' python
    (it has pycurl), with the run's concurrency as its limit and as its per-host limit."""

    def build(ctx: RunContext) -> list[str]:
        return [
            str(ctx.peers_python),
            str(PROTOTYPES_DIR / script),
            str(ctx.urls_file),
            str(ctx.out_dir),
            "--concurrency",
            str(ctx.concurrency),
            "--per-host",
            str(ctx.per_host or ctx.concurrency),
            "--processes",
            str(processes),
            "--allow-loopback",
        ]

    return build


#: the prototypes of issue 14's multiplexed engine, 1 and 2 processes each
#: (benchmarks/engine_prototypes.py runs them; no workload lists them by default)
PROTOTYPE_TOOLS = [
    Tool(
        f"{name}-{n}p",
        f"prototype: {what}, {n} process{'es' if n > 1 else ''}",
        _prototype(script, n),
        _need_peers,
    )
    for name, script, what in (
        ("curl-multi", "curl_multi.py", "pycurl CurlMulti, one thread"),
        ("selector", "selector_loop.py", "selectors + non-blocking sockets, one thread"),
    )
    for n in (1, 2)
]

_QUIET_PEERS = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}

TOOLS: dict[str, Tool] = {
    t.name: t
    for t in [
        Tool(
            "fetchpool",
            "fetchpool get --threads C --per-host C",
            fetchpool_cmd,
            _need_fetchpool,
            supports_resize=True,
        ),
        Tool(
            "fetchpool-mux",
            "fetchpool get --threads C --per-host C --engine multiplexed",
            fetchpool_mux_cmd,
            _need_fetchpool,
        ),
        Tool("wget2", "wget2 --max-threads C -i urls", wget2_cmd, _need_binary("wget2")),
        Tool("curl", "curl --parallel --parallel-max C -K cfg", curl_cmd, _need_binary("curl")),
        Tool("aria2c", "aria2c -i urls -j C -x1", aria2c_cmd, _need_binary("aria2c")),
        Tool(
            "requests-threads",
            "requests, Session per thread, ThreadPoolExecutor(C)",
            _peer("requests_threads.py"),
            _need_peers,
        ),
        Tool(
            "parfive",
            "parfive Downloader(max_conn=C, max_splits=1)",
            _peer("parfive_get.py"),
            _need_peers,
        ),
        Tool(
            "img2dataset",
            "img2dataset --thread_count C --processes_count P",
            img2dataset_cmd,
            _need_peers,
            env=_QUIET_PEERS,
            supports_resize=True,
        ),
        Tool(
            "notebook-threadpool",
            "notebook: ThreadPoolExecutor().map(requests.get)",
            _peer("notebook_threadpool.py", with_concurrency=False),
            _need_peers,
        ),
        Tool(
            "notebook-sequential",
            "notebook: for url: requests.get(url)",
            _peer("notebook_sequential.py", with_concurrency=False),
            _need_peers,
        ),
        *PROTOTYPE_TOOLS,
    ]
}


def tool_env(tool: Tool, ctx: RunContext | None = None) -> dict[str, str]:
    extra = {}
    if ctx is not None and ctx.ca_bundle is not None:
        # the trust store of tools without a CA option (fetchpool, the Python peers):
        # OpenSSL's default verify paths, and requests' own bundle setting
        extra = {"SSL_CERT_FILE": str(ctx.ca_bundle), "REQUESTS_CA_BUNDLE": str(ctx.ca_bundle)}
    return {**os.environ, **tool.env, **extra}
