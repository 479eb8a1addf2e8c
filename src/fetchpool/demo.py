"""``fetchpool demo``: the notebook's download experiment, offline, on this machine.

Starts the embedded origin on a free loopback port with a latency like a real site, downloads
the same images first with one thread (the notebook's sequential loop) and then with the
thread pool, and prints a table of the two runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click


@dataclass(frozen=True, slots=True)
class DemoRun:
    mode: str
    threads: int
    files: int
    failed: int
    seconds: float
    folder: Path

    @property
    def rate(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


def run_demo(out: Path, *, count: int, latency: float, threads: int) -> list[DemoRun]:
    """Run both modes against a fresh origin; each run gets its own new folder under ``out``."""
    from fetchpool.engine.pipeline import download
    from fetchpool.origin import Origin

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out / f"run-{stamp}"
    suffix = 1
    while base.exists():  # never reuse a folder: resume would make the second run look instant
        suffix += 1
        base = out / f"run-{stamp}-{suffix}"
    base.mkdir(parents=True)
    runs = []
    # A child process serves, so the origin does not share this process's GIL.
    with Origin(latency=latency, process=True) as origin:
        origin.warm(count)
        urls = [origin.image_url(n) for n in range(count)]
        for mode, n_threads in (("sequential", 1), ("thread pool", threads)):
            folder = base / mode.replace(" ", "-")
            report = download(
                urls, folder, threads=n_threads, per_host=n_threads, allow_private_networks=True
            )
            runs.append(DemoRun(mode, n_threads, report.ok, report.failed, report.wall, folder))
    return runs


@click.command("demo")
@click.option("--count", default=15, show_default=True, help="Images to download.")
@click.option("--latency", default=0.1, show_default=True, help="Seconds per request.")
@click.option("--threads", default=32, show_default=True, help="Threads of the pooled run.")
@click.option(
    "-o",
    "--out",
    default="fetchpool-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Parent folder for the demo's runs.",
)
def demo_command(count: int, latency: float, threads: int, out: Path) -> None:
    """Offline demo: images from the embedded origin, sequential vs thread pool."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"Serving {count} generated JPEGs on 127.0.0.1 with {latency * 1000:.0f} ms latency "
        "per request; downloading them sequentially, then with a thread pool..."
    )
    runs = run_demo(out, count=count, latency=latency, threads=threads)
    table = Table(title="fetchpool demo")
    for name in ("mode", "threads", "files", "seconds", "files/s", "speedup"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    baseline = runs[0].seconds
    for run in runs:
        speedup = baseline / run.seconds if run.seconds > 0 else 0.0
        table.add_row(
            run.mode,
            str(run.threads),
            f"{run.files}" + (f" ({run.failed} failed)" if run.failed else ""),
            f"{run.seconds:.2f}",
            f"{run.rate:.1f}",
            f"{speedup:.1f}x",
        )
    console.print(table)
    for run in runs:
        console.print(f"{run.mode}: files in {run.folder}")
    if any(run.failed for run in runs):
        raise SystemExit(1)
