"""``fetchpool serve``: run the embedded origin in the foreground.

The lead registers :data:`serve_command` on the main CLI group; ``python -m
fetchpool.origin.cli`` runs it standalone.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from fetchpool.origin.server import ENDPOINTS, Origin, image_url_for

__all__ = ["serve_command"]


def _help() -> str:
    width = max(len(path) for path, _ in ENDPOINTS)
    rows = "\n".join(f"  {path:<{width}}  {what}" for path, what in ENDPOINTS)
    return (
        "Serve deterministic test images and HTTP faults on a local port, until Ctrl-C or "
        "SIGTERM.\n\n"
        "Every URL accepts ?latency=SECONDS (replaces --latency/--jitter for that request); "
        "?n=N picks the image where the path has none. Anything else answers 404.\n\n"
        f"\b\nEndpoints:\n{rows}"
    )


@click.command("serve", help=_help(), short_help="Serve test images and HTTP faults locally.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to bind (0: any free port).",
)
@click.option(
    "--latency",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait before every response.",
)
@click.option(
    "--jitter",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Extra random wait, uniform in [0, JITTER] seconds.",
)
@click.option(
    "--bandwidth",
    default=None,
    type=click.IntRange(min=1),
    help="Limit each response body to this many bytes/s.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Selects the image set.")
@click.option(
    "--write-urls",
    type=click.Path(dir_okay=False, writable=True, allow_dash=True, path_type=Path),
    help="Write --count image URLs to this file, one per line, and serve. '-': write them "
    "to stdout and exit without serving (binding nothing): the URLs of the origin that "
    "runs at --host and --port, e.g. for 'fetchpool get -'.",
)
@click.option(
    "--count",
    default=1000,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many URLs --write-urls writes.",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="Serve HTTPS with this PEM certificate (chain); needs --tls-key. For trying "
    "fetchpool get --ca-certificate against a CA of your own.",
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="Its PEM key.")
def serve_command(  # noqa: PLR0917 - click passes every option as a parameter
    host: str,
    port: int,
    latency: float,
    jitter: float,
    bandwidth: int | None,
    seed: int,
    write_urls: Path | None,
    count: int,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> None:
    """Run the origin until interrupted (the help text is built by _help())."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    if write_urls == Path("-"):
        # Only a list is asked for: a pipe to 'fetchpool get -' must end, and the origin the
        # URLs name is another process's (a second bind of its port would fail).
        if port == 0:
            raise click.UsageError(
                "--write-urls - writes the URLs of an origin already running at --host and "
                "--port without serving; give its --port (0 names no port)"
            )
        _write_urls(host, port, write_urls, count, "https" if tls else "http")
        return
    origin = Origin(
        host, port, latency=latency, jitter=jitter, bandwidth=bandwidth, seed=seed, tls=tls
    )
    try:
        origin.start()
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot serve on {host}:{port}: {exc}") from exc
    try:
        # The bare URL on its own line, so scripts can read it; the hint goes to stderr.
        click.echo(origin.base_url)
        click.echo("fetchpool origin running; Ctrl-C to stop", err=True)
        if write_urls is not None:
            _write_urls(origin.host, origin.port, write_urls, count, origin.scheme)
        _wait_for_signal()
    finally:
        origin.stop()


def _write_urls(host: str, port: int, target: Path, count: int, scheme: str = "http") -> None:
    text = "".join(f"{image_url_for(host, port, n, scheme=scheme)}\n" for n in range(count))
    if target == Path("-"):
        click.echo(text, nl=False)
        return
    target.write_text(text, encoding="utf-8")
    click.echo(f"wrote {count} URLs to {target}")


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (the server runs in its own thread meanwhile)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # A timed wait keeps the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    serve_command()
