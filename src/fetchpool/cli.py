"""The ``fetchpool`` command line. Subcommands load lazily so ``fetchpool --help`` stays fast.

Exit codes: 0 every item ok; 1 some items failed; 2 usage or run-level failure (bad option,
unreadable input, unusable or locked output folder, disk full); 130 interrupted by Ctrl-C,
143 by SIGTERM (state saved: run the same command again to resume).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click

from fetchpool._version import __version__
from fetchpool.engine.backends import BACKENDS

EXIT_OK, EXIT_FAILED, EXIT_RUN_ERROR = 0, 1, 2

_SUBCOMMANDS = {
    "get": ("fetchpool.cli", "get_command"),
    "manifest": ("fetchpool.cli", "manifest_command"),
    "demo": ("fetchpool.demo", "demo_command"),
    "serve": ("fetchpool.origin.cli", "serve_command"),
    "lab": ("fetchpool.lab.cli", "lab_command"),
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs (or its help is shown)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        command = getattr(importlib.import_module(target[0]), target[1])
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SUMMARIES[name]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


_SUMMARIES = {
    "get": "Download every URL of a list into a folder (resumable).",
    "manifest": "Export the per-item records of an output folder.",
    "demo": "Offline demo: sequential vs thread pool against the embedded origin.",
    "serve": "Run the embedded test origin (images, latency, faults) on loopback.",
    "lab": "Re-measure the threading notebook's claims on this machine.",
}


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, message="fetchpool %(version)s")
def main() -> None:
    """fetchpool: download large lists of URLs, images above all, fast and resumably.

    \b
    Exit codes: 0 all ok, 1 some items failed, 2 usage or run-level failure,
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Re-run to resume.
    """


def _size(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = value.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a size like 100M") from exc


def _shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    k, sep, n = value.partition("/")
    try:
        shard = (int(k), int(n))
    except ValueError:
        shard = (-1, 0)
    if not sep or not 0 <= shard[0] < shard[1]:
        raise click.BadParameter(f"{value!r} is not K/N with 0 <= K < N")
    return shard


def _storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value that parses as JSON (true, 3, {"a": 1}) is taken as such."""
    import json

    options: dict[str, Any] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{value!r} is not KEY=VALUE", param_hint="--storage-option")
        try:
            options[key.strip()] = json.loads(text)
        except ValueError:
            options[key.strip()] = text
    return options


_STORAGE_OPTION = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    callback=lambda c, p, v: _storage_options(v),
    help="fsspec option for an s3://… (gs://…) OUT or SOURCE, e.g. endpoint_url=http://host:9000 "
    "(repeatable; a JSON value is parsed: anon=true). AWS_* variables are read as usual.",
)


def _header(value: str) -> tuple[str, str]:
    name, sep, content = value.partition(":")
    if not sep or not name.strip() or any(c in value for c in "\r\n\0"):
        raise click.BadParameter(f"{value!r} is not a header like 'Name: value'")
    return name.strip(), content.strip()


def _setup_logging(verbose: int, log_file: str | None) -> None:
    # The notebook's logging format, plus the thread name: who did what, when.
    fmt = logging.Formatter("%(asctime)s.%(msecs)03d %(threadName)s: %(message)s", "%H:%M:%S")
    logger = logging.getLogger("fetchpool")
    logger.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    if log_file:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)


@click.command("get")
@click.argument("source", type=str)
@click.option(
    "-o",
    "--out",
    required=True,
    type=str,
    help="Output folder; with --cluster also an fsspec URL (s3://bucket/ds).",
)
@click.option("--threads", default=32, show_default=True, help="Fetch threads.")
@click.option(
    "--engine",
    type=click.Choice(list(BACKENDS)),
    help="Where fetches run: threads (in this process), processes (--fetch-processes "
    "workers) or multiplexed (one loop thread driving many connections, in this process). "
    "[default: processes with --fetch-processes 2+, else threads]",
)
@click.option(
    "--fetch-processes",
    type=int,
    help="Processes sharing the threads; 2+ uses more cores on fast networks. "
    "[default: 1; 2 with --engine processes]",
)
@click.option("--per-host", default=8, show_default=True, help="Concurrent fetches per host.")
@click.option("--rate-per-host", type=float, help="Requests per second per host.")
@click.option("--connect-timeout", default=10.0, show_default=True, help="Seconds.")
@click.option("--read-timeout", default=30.0, show_default=True, help="Idle seconds.")
@click.option(
    "--timeout",
    "total_timeout",
    default=300.0,
    show_default=True,
    help="Seconds per attempt, in all.",
)
@click.option("--max-bytes", default="100M", show_default=True, help="Largest file (e.g. 20M).")
@click.option("--max-redirects", default=10, show_default=True)
@click.option(
    "--attempts",
    default=3,
    show_default=True,
    help="Tries per URL (transient errors, 408/429/5xx).",
)
@click.option("--retry-failed", is_flag=True, help="Re-attempt items that failed in earlier runs.")
@click.option(
    "--input-format",
    type=click.Choice(["txt", "csv", "tsv", "jsonl", "parquet"]),
    help="Input format (default: from the file name).",
)
@click.option("--url-column", default="url", show_default=True, help="CSV/JSONL/Parquet column.")
@click.option(
    "--caption-column",
    help="Input column saved as the caption: KEY.txt in WebDataset, NAME.txt beside each file, "
    "a caption column in Parquet (an empty caption when a row has none).",
)
@click.option(
    "--hash",
    type=click.Choice(["md5", "sha256", "sha512"], case_sensitive=False),
    help="Also keep this digest of the downloaded bytes (as fetched, before any resizing) in "
    "a column of its name (md5, sha512; sha256 is always kept as fetched_sha256), in the "
    "manifest, sidecars, WebDataset .json and Parquet.",
)
@click.option(
    "--verify-hash-column",
    metavar="COLUMN",
    help="Input column with each row's expected digest (hex or base64): a download whose "
    "digest differs fails hash_mismatch and is not saved; a row without one fails bad_input.",
)
@click.option(
    "--verify-hash-type",
    type=click.Choice(["md5", "sha256", "sha512"], case_sensitive=False),
    help="Algorithm of --verify-hash-column (default: --hash, else sha256).",
)
@click.option(
    "--shard",
    callback=lambda c, p, v: _shard(v),
    metavar="K/N",
    help="Only input items whose position % N == K (run shards apart, merge later).",
)
@click.option(
    "--format",
    "output_format",
    default="files",
    show_default=True,
    type=click.Choice(["files", "webdataset", "parquet"]),
    help="Output format.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    help="Samples per shard (default 1000); with --format files, items per numbered "
    "subfolder OUT/00000/, OUT/00001/... (default: one flat folder).",
)
@click.option("--sidecar", is_flag=True, help="Write KEY.json metadata beside each file.")
@click.option("--resize", type=int, help="Target size in pixels.")
@click.option(
    "--resize-mode",
    default="keep-ratio-largest",
    show_default=True,
    type=click.Choice(["keep-ratio", "keep-ratio-largest", "center-crop", "border", "no"]),
    help="As img2dataset: keep-ratio: shorter side to SIZE; keep-ratio-largest: longer side "
    "to SIZE; center-crop: SIZExSIZE middle; border: longer side to SIZE, padded white.",
)
@click.option("--resize-only-down", is_flag=True, help="Never upscale.")
@click.option(
    "--downsample-filter",
    default="auto",
    show_default=True,
    type=click.Choice(
        ["auto", "area", "box", "nearest", "bilinear", "hamming", "bicubic", "lanczos"]
    ),
    help="Resampling when shrinking; auto: reduced JPEG decode + lanczos (fastest), a named "
    "filter decodes in full (area = box, img2dataset's default).",
)
@click.option(
    "--upsample-filter",
    default="auto",
    show_default=True,
    type=click.Choice(
        ["auto", "area", "box", "nearest", "bilinear", "hamming", "bicubic", "lanczos"]
    ),
    help="Resampling when enlarging; auto: lanczos (img2dataset's default).",
)
@click.option(
    "--encode",
    type=click.Choice(["keep", "jpeg", "webp", "png"]),
    help="Output image format [default: jpeg with --resize, else keep]. keep with --resize "
    "keeps each image's format: datasets cannot load WebDataset shards that mix them.",
)
@click.option("--quality", default=90, show_default=True, help="JPEG/WebP quality.")
@click.option("--min-size", type=int, help="Drop images whose smaller side is below this.")
@click.option(
    "--min-area", type=int, help="Drop images with fewer pixels (width x height) than this."
)
@click.option("--max-area", type=int, help="Drop images with more pixels than this.")
@click.option(
    "--max-aspect-ratio",
    type=float,
    help="Drop images whose longer side over shorter side is above this (e.g. 3).",
)
@click.option(
    "--save-exif", is_flag=True, help="Keep the original's EXIF tags (JSON) in the metadata."
)
@click.option("--max-pixels", type=int, help="Decompression-bomb limit (pixels).")
@click.option("--verify", is_flag=True, help="Check that every image decodes.")
@click.option("--processes", type=int, help="CPU-stage processes (default: CPU count).")
@click.option("--user-agent", default="", help="Default: fetchpool/<version>.")
@click.option(
    "--user-agent-token",
    metavar="TOKEN",
    help="Appended to the User-Agent as '(compatible; TOKEN)'; X-Robots-Tag rules scoped to "
    "TOKEN (TOKEN: noai) apply to this run, as those scoped to fetchpool do.",
)
@click.option(
    "--disallowed-header-directives",
    metavar="LIST",
    help="Comma-separated opt-out directives honoured: a response with X-Robots-Tag (or "
    "tdm-reservation: 1) carrying one is not saved (opted_out). '' honours none. "
    "Default: noai,noimageai,noml,noindex,noimageindex,tdm-reservation.",
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    callback=lambda c, p, v: tuple(_header(h) for h in v),
    help="Extra request header 'Name: value' (repeatable).",
)
@click.option(
    "--accept",
    metavar="TYPES",
    default="",
    help="Comma-separated media types or ranges (image/*,application/pdf): a response whose "
    "Content-Type matches none fails unwanted_content_type and nothing is saved "
    "[default: accept everything].",
)
@click.option("--insecure", is_flag=True, help="Do not verify TLS certificates (recorded).")
@click.option(
    "--ca-certificate",
    metavar="FILE",
    help="Also trust the CA certificates of this PEM bundle (a private CA), besides the "
    "system store, as wget's option does. SSL_CERT_FILE replaces the store instead.",
)
@click.option(
    "--ca-directory",
    metavar="DIR",
    help="Also trust the CA certificates of this OpenSSL hashed folder (openssl rehash DIR).",
)
@click.option(
    "--allow-private-networks",
    is_flag=True,
    help="Allow loopback/private/link-local destinations (off by default).",
)
@click.option("--allow-cidr", "allow_cidrs", multiple=True, help="Allow this network (repeatable).")
@click.option(
    "--proxy",
    metavar="URL|env",
    help="HTTP proxy for http and https URLs: http://[user:password@]host:port, or 'env' for "
    "http_proxy, https_proxy, all_proxy, no_proxy from the environment, as curl reads them. "
    "Default: no proxy (the environment's only when asked).",
)
@click.option(
    "--cluster",
    metavar="ADDRESS",
    help="Spread the run over a Dask cluster: tcp://host:8786, or local / local:N "
    "(N worker processes started here). See docs/distributed.md.",
)
@click.option(
    "--parts",
    type=click.IntRange(min=1),
    help="With --cluster: parts the input is cut into (default: 4 per worker; pinned in OUT).",
)
@_STORAGE_OPTION
@click.option("--timeline", type=click.Path(path_type=Path), help="Write a timeline SVG here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("-v", "--verbose", count=True, help="Log each item (-vv: debug).")
@click.option("--log-file", type=click.Path(), help="Also log to this file.")
def get_command(source: str, out: str, **kw: Any) -> None:
    """Download every URL of SOURCE into OUT.

    SOURCE is a .txt (one URL a line), .csv/.tsv, .jsonl or .parquet file (also .gz), or -
    for stdin. Re-running the same command resumes: finished items are not fetched again.
    """
    quiet, verbose, log_file, timeline = (
        kw.pop("quiet"),
        kw.pop("verbose"),
        kw.pop("log_file"),
        kw.pop("timeline"),
    )
    _setup_logging(verbose, log_file)
    cluster, parts = kw.pop("cluster"), kw.pop("parts")
    if parts is not None and cluster is None:
        raise click.UsageError("--parts goes with --cluster")
    options = _options(kw)
    if cluster is not None:
        sys.exit(_run_cluster(source, out, options, cluster=cluster, parts=parts, quiet=quiet))
    from fetchpool.storage import is_remote

    for given, what in ((out, "-o/--out"), (source, "SOURCE")):
        if is_remote(given):
            raise click.UsageError(
                f"{what} {given}: a URL needs --cluster (--cluster local:2 runs on this "
                "machine); see docs/distributed.md"
            )
    if options.storage_options:
        raise click.UsageError("--storage-option goes with an s3://… (fsspec URL) OUT or SOURCE")
    sys.exit(_run_get(source, Path(out), options, quiet=quiet, verbose=verbose, timeline=timeline))


def _options(kw: dict[str, Any]) -> Any:
    from fetchpool.config import Options
    from fetchpool.errors import ConfigError

    kw["max_bytes"] = _size(kw["max_bytes"])
    kw["format"] = kw.pop("output_format")
    kw["allow_cidrs"] = tuple(kw["allow_cidrs"])
    for name in (
        "engine",
        "fetch_processes",
        "max_pixels",
        "processes",
        "resize",
        "min_size",
        "rate_per_host",
        "shard",
        "user_agent_token",
        "disallowed_header_directives",
        "proxy",
        "ca_certificate",
        "ca_directory",
        "hash",
        "verify_hash_column",
        "verify_hash_type",
        "min_area",
        "max_area",
        "max_aspect_ratio",
    ):
        if kw.get(name) is None:
            kw.pop(name, None)
    try:
        options = Options.from_kwargs(**kw)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    _log_proxies(options.fetch)
    return options


def _log_proxies(fetch: Any) -> None:
    # The environment's proxies are used without a flag (as curl and wget do): say so.
    from fetchpool.proxies import ProxyPolicy

    policy = ProxyPolicy.build(fetch.proxy, fetch.proxy_environment or ())
    for scheme, proxy in (("http", policy.http), ("https", policy.https)):
        if proxy is not None:
            bypass = f", not for {policy.no_proxy}" if policy.no_proxy else ""
            logging.getLogger("fetchpool").info(
                "%s URLs go through proxy %s (%s%s)", scheme, proxy.shown, proxy.source, bypass
            )


def _run_get(
    source: str, out: Path, options: Any, *, quiet: bool, verbose: int, timeline: Path | None
) -> int:
    from fetchpool.engine.pipeline import Pipeline
    from fetchpool.errors import FetchpoolError

    observers: list[Any] = []
    console = None
    if not quiet:  # rich costs ~20 ms of imports: only when something is shown
        from rich.console import Console

        from fetchpool.report.progress import ProgressBar

        console = Console(stderr=True)
        if console.is_terminal:
            observers.append(ProgressBar(console))
        else:  # a log or a pipe: one line per line, never wrapped at 80 columns (grep)
            console = Console(stderr=True, width=100_000, soft_wrap=True)
    if verbose:
        from fetchpool.report.progress import ItemLog

        observers.append(ItemLog())
    recorder = None
    if timeline is not None:
        from fetchpool.report.timeline import TimelineObserver

        recorder = TimelineObserver()
        observers.append(recorder)
    pipeline = Pipeline(out, options, observers=observers)
    received = _install_stop_handlers(pipeline)
    # At exit, skip the interpreter's last garbage collections: every file, socket and the
    # journal are closed explicitly by then, and collecting a run's objects at teardown
    # cost ~15 ms per command (W1, medians of 7). Registered, not called: a process that
    # goes on (tests, library use) keeps its normal collector.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        report = pipeline.run(source)
    except FetchpoolError as exc:
        click.echo(f"fetchpool: {_error_kind(exc)}: {exc}", err=True)
        return EXIT_RUN_ERROR
    if recorder is not None and timeline is not None:
        recorder.write(timeline)
    if console is not None:
        from fetchpool.report.summary import render_summary

        render_summary(report, console)
    elif report.fatal:  # -q: a run-level failure is still said, in one line
        click.echo(f"fetchpool: {report.fatal_kind or 'error'}: {report.fatal}", err=True)
    code = 128 + received[0] if report.interrupted and received else report.exit_code
    if pipeline.hurried:
        # The journal is closed and its last commit done; fetch threads may still be in the
        # middle of an attempt nobody will hear: leave without waiting for them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_cluster(
    source: str, out: str, options: Any, *, cluster: str, parts: int | None, quiet: bool
) -> int:
    """``get --cluster``: the parts run as Dask tasks; Ctrl-C stops them and saves state."""
    import threading

    from fetchpool.cluster import download_on_cluster
    from fetchpool.errors import FetchpoolError

    stop = threading.Event()
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if len(received) > 1:  # a LocalCluster's workers and their children die with us
            os._exit(128 + received[0])
        os.write(2, b"\nfetchpool: stopping the parts, saving their state (again to quit)\n")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    progress = None
    if not quiet:
        from rich.console import Console

        from fetchpool.cluster.driver import ClusterProgress
        from fetchpool.report.progress import ProgressBar

        console = Console(stderr=True)
        if console.is_terminal:  # one bar for the whole cluster, summed over the parts
            progress = ClusterProgress(ProgressBar(console))
    try:
        report = download_on_cluster(
            source,
            out,
            options,
            cluster=cluster,
            parts=parts,
            stop_requested=stop,
            quiet=quiet,
            progress=progress,
        )
    except FetchpoolError as exc:
        click.echo(f"fetchpool: {_error_kind(exc)}: {exc}", err=True)
        return EXIT_RUN_ERROR
    if not quiet:
        from rich.console import Console

        from fetchpool.report.summary import render_summary

        render_summary(report, Console(stderr=True, width=100_000, soft_wrap=True))
    elif report.fatal:
        click.echo(f"fetchpool: {report.fatal_kind or 'error'}: {report.fatal}", err=True)
    if report.interrupted and not report.fatal:
        return 128 + received[0] if received else 130
    return report.exit_code


def _error_kind(exc: Exception) -> str:
    """A stable word for a run-level failure, for scripts that read stderr."""
    from fetchpool import errors

    kinds: list[tuple[type[Exception], str]] = [
        (errors.LockedError, "locked"),
        (errors.DiskFullError, "disk_full"),
        (errors.OutputError, "output_error"),
        (errors.InputError, "input_error"),
        (errors.StateError, "state_error"),
        (errors.ConfigError, "usage"),
    ]
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), "error")


def _install_stop_handlers(pipeline: Any) -> list[int]:
    """First SIGINT/SIGTERM: stop taking work, finish in-flight items, save state.

    A second one hurries the stop: items in flight are abandoned (the next run fetches them),
    and the run ends as soon as the journal has committed everything finished. A third leaves
    at once; the journal is consistent at every commit, so at worst the items finished since
    its last commit are fetched again (and their files adopted) by the next run. Worker
    processes end with this one however it ends (:mod:`fetchpool.lifeline`).
    """
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        # Plain writes: a signal handler must not re-enter rich while it draws the bar.
        if len(received) == 1:
            os.write(2, b"\nfetchpool: stopping, finishing in-flight items (again to hurry)\n")
            pipeline.stop()
        elif len(received) == 2:
            os.write(2, b"fetchpool: hurrying: saving state, dropping in-flight items\n")
            pipeline.stop(hurry=True)
        else:
            os._exit(128 + received[0])

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return received


@click.command("manifest")
@click.argument("out", nargs=-1, required=True, type=str)
@click.option(
    "--format",
    "fmt",
    default="jsonl",
    show_default=True,
    type=click.Choice(["jsonl", "csv", "parquet"]),
)
@click.option("--status", type=click.Choice(["ok", "failed", "skipped"]), help="Only this status.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Write here (default: stdout; required for parquet).",
)
@_STORAGE_OPTION
def manifest_command(
    out: tuple[str, ...],
    fmt: str,
    status: str | None,
    output: Path | None,
    storage_options: dict[str, Any],
) -> None:
    """Export the per-item records of OUT (credentials redacted).

    Several OUT folders (one per --shard) are merged in input order; each path is then
    prefixed with its folder's name. OUT may be a cluster run's destination, a folder or an
    fsspec URL (s3://bucket/ds): its parts are merged, paths relative to it.
    """
    from fetchpool.errors import FetchpoolError
    from fetchpool.models import Status
    from fetchpool.state.manifest import export_manifest
    from fetchpool.storage import is_remote

    if fmt == "parquet" and output is None:
        raise click.UsageError("--format parquet needs -o FILE")
    for folder in out:
        if not is_remote(folder) and not Path(folder).is_dir():
            raise click.BadParameter(f"{folder!r} is not a folder", param_hint="OUT")
    try:
        dest: Any = (
            output
            if output is not None
            else (sys.stdout.buffer if fmt == "parquet" else sys.stdout)
        )
        export_manifest(
            list(out),
            dest,
            fmt=fmt,
            status=Status(status) if status else None,
            storage_options=storage_options,
        )
    except FetchpoolError as exc:
        click.echo(f"fetchpool: {exc}", err=True)
        sys.exit(EXIT_RUN_ERROR)
