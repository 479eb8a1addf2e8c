"""The end-of-run summary: the notebook's "Finished in X seconds", for every run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fetchpool.engine.pipeline import Report


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"  # pragma: no cover - the loop always returns


def headline(report: Report) -> str:
    rate = report.items / report.wall if report.wall > 0 else 0.0
    return f"Finished {report.items:,} items in {report.wall:.2f} s ({rate:,.1f} items/s)"


def render_summary(report: Report, console: Console) -> None:
    """Print the headline, outcomes by error code, bytes and the concurrency gain."""
    console.print(f"[bold]{headline(report)}[/bold]")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("outcome")
    table.add_column("items", justify="right")
    table.add_row("[green]ok[/green]", f"{report.ok:,}")
    for code, count in sorted(report.errors.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(
            f"[red]{code}[/red]" if code != "duplicate" else f"skipped: {code}", f"{count:,}"
        )
    if report.resumed:
        table.add_row("[dim]done by an earlier run[/dim]", f"{report.resumed:,}")
    console.print(table)
    console.print(
        f"{human_bytes(report.bytes)} downloaded; concurrency gain {report.gain:.1f}x "
        f"(sum of per-item times {report.busy:.2f} s / wall {report.wall:.2f} s)"
    )
    if report.fatal:
        kind = f"{report.fatal_kind}: " if report.fatal_kind else ""
        console.print(f"[bold red]stopped early: {kind}{report.fatal}[/bold red]")
    elif report.interrupted:
        console.print("[yellow]interrupted: state saved; run the same command to resume[/yellow]")
    if report.unfinished:
        console.print(
            f"{report.unfinished:,} items were under way when the run stopped; they are not "
            "journaled, and the next run of the same command fetches them"
        )
    console.print(f"output: {report.out}   state: {report.out / '.fetchpool' / 'state.db'}")
