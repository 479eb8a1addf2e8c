"""Showing lab results: rich tables on the terminal, and an HTML page with every picture."""

from __future__ import annotations

import html
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fetchpool.lab.scenarios import SCENARIOS, Result, gil_enabled, usable_cores

__all__ = ["machine_summary", "print_list", "print_result", "print_summary", "write_report"]


def machine_summary(scale: float) -> str:
    """One line saying where and how the figures were measured."""
    gil = gil_enabled()
    gil_text = "GIL build" if gil is None else ("GIL enabled" if gil else "GIL disabled")
    return (
        f"Python {platform.python_version()} ({sys.implementation.name}, {gil_text}) on "
        f"{platform.system()} {platform.machine()}, {usable_cores()} usable cores; "
        f"scale {scale:g} (1 = the notebook's durations)"
    )


def _verdict_text(result: Result) -> Text:
    style = "bold green" if result.verdict.holds else "bold red"
    return Text(result.verdict.text, style=style)


def print_list(console: Console) -> None:
    """The table of scenarios (``fetchpool lab --list``)."""
    table = Table(title="Lab scenarios: the threading notebook's claims")
    table.add_column("#", justify="right")
    table.add_column("name", style="bold")
    table.add_column("claim")
    for s in SCENARIOS.values():
        table.add_row(str(s.number), s.name, s.claim)
    console.print(table)


def print_result(console: Console, result: Result) -> None:
    """One scenario: the claim, the figures against expectations, order, log, verdict."""
    table = Table(
        title=f"{result.number}. {result.name}: {result.title}",
        caption=result.claim,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("measured")
    table.add_column("value", justify="right")
    table.add_column("the notebook leads one to expect")
    for figure in result.figures:
        table.add_row(figure.label, figure.shown(), figure.expected)
    console.print(table)
    if result.order is not None:
        console.print(f"  order: {' -> '.join(result.order)}")
    for line in result.log:
        console.print(Text(f"  {line}", style="dim"))
    for note in result.notes:
        console.print(Text(f"  {note}", style="dim"))
    console.print(
        Text("  verdict: ").append(_verdict_text(result)).append(f" - {result.verdict.reason}")
    )
    console.print()


def print_summary(console: Console, results: Sequence[Result]) -> None:
    """One row per scenario: its verdict and reason."""
    table = Table(title="Summary")
    table.add_column("#", justify="right")
    table.add_column("scenario", style="bold")
    table.add_column("verdict")
    table.add_column("why")
    for r in results:
        table.add_row(str(r.number), r.name, _verdict_text(r), r.verdict.reason)
    console.print(table)


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; max-width: 1060px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.holds { color: #1b7a2a; font-weight: bold; }
.nothold { color: #b3261e; font-weight: bold; }
.claim { font-style: italic; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #ddd; }
section { margin-top: 2.5em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _verdict_html(result: Result) -> str:
    css = "holds" if result.verdict.holds else "nothold"
    return f'<span class="{css}">{_e(result.verdict.text)}</span>'


def _summary_html(results: Sequence[Result]) -> list[str]:
    rows = [
        f'<tr><td class="num">{r.number}</td><td><a href="#{_e(r.name)}">{_e(r.name)}</a></td>'
        f'<td class="claim">{_e(r.claim)}</td><td>{_verdict_html(r)}</td></tr>'
        for r in results
    ]
    return [
        "<table><tr><th>#</th><th>scenario</th><th>claim</th><th>verdict</th></tr>",
        *rows,
        "</table>",
    ]


def _section_html(result: Result, picture: str) -> list[str]:
    out = [
        f'<section id="{_e(result.name)}">',
        f"<h2>{result.number}. {_e(result.name)}: {_e(result.title)}</h2>",
        f'<p class="claim">The notebook: {_e(result.claim)}</p>',
        "<table><tr><th>measured</th><th>value</th><th>expected</th></tr>",
    ]
    out += [
        f'<tr><td>{_e(f.label)}</td><td class="num">{_e(f.shown())}</td>'
        f"<td>{_e(f.expected)}</td></tr>"
        for f in result.figures
    ]
    out.append("</table>")
    if result.order is not None:
        out.append(f"<p>Order: {_e(' → '.join(result.order))}</p>")
    if result.log:
        out.append(f"<pre>{_e(chr(10).join(result.log))}</pre>")
    out += [f"<p>{_e(note)}</p>" for note in result.notes]
    out.append(f"<p>Verdict: {_verdict_html(result)}: {_e(result.verdict.reason)}</p>")
    out.append(
        f'<p><a href="{_e(picture)}"><img src="{_e(picture)}" '
        f'alt="timeline of {_e(result.name)}"></a></p>'
    )
    out.append("</section>")
    return out


def write_report(results: Sequence[Result], directory: str | Path, *, scale: float) -> Path:
    """Write ``DIR/NAME.svg`` for every result and ``DIR/index.html`` showing them all.

    Returns the path of ``index.html``. Each picture is shown on the page and links to its
    own SVG file.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    body: list[str] = []
    for result in results:
        picture = f"{result.name}.svg"
        (folder / picture).write_text(result.svg(), encoding="utf-8")
        body += _section_html(result, picture)
    held = sum(r.verdict.holds for r in results)
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>fetchpool lab: the threading notebook, re-measured</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>The threading notebook, re-measured</h1>",
        f"<p>{_e(machine_summary(scale))}. Measured {_e(time.strftime('%Y-%m-%d %H:%M'))}; "
        f"{held} of {len(results)} claims hold here.</p>",
        "<p>Each picture: one lane per worker (thread, process or the main thread), one bar per "
        "task from its start to its end; colours tell the phases apart (sequential, threads, "
        "processes).</p>",
        *_summary_html(results),
        *body,
        "</body></html>",
    ]
    index = folder / "index.html"
    index.write_text("\n".join(page) + "\n", encoding="utf-8")
    return index
