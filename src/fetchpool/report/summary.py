"""The end-of-run summary: the notebook's "Finished in X seconds", for every run."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fetchpool.models import Report


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"  # pragma: no cover - the loop always returns


def headline(report: Report) -> str:
    rate = report.items / report.wall if report.wall > 0 else 0.0
    return f"Finished {report.items:,} items in {report.wall:.2f} s ({rate:,.1f} items/s)"


#: What to do about each kind of failure, in the CLI's words (shown when it occurred).
HINTS: dict[str, str] = {
    "blocked_address": (
        "the address guard refuses loopback, private and link-local destinations; "
        "--allow-private-networks or --allow-cidr CIDR lets them through"
    ),
    "tls_error": (
        "the certificate was not trusted: a server with a private CA needs --ca-certificate "
        "FILE (the CA's PEM, trusted beside the system store); --insecure skips the check "
        "(recorded)"
    ),
    "too_large": "the body was larger than --max-bytes",
    "image_too_large": "the image has more pixels (or frames) than --max-pixels allows",
    "image_too_small": "the image is smaller than --min-size",
    "unwanted_content_type": "the response's Content-Type is not one --accept lets through",
    "not_an_image": (
        "the body is not an image Pillow can read (often an HTML page served with 200); "
        "dataset formats never store it as a sample"
    ),
    "image_area_too_small": "the image has fewer pixels (width x height) than --min-area",
    "image_area_too_large": "the image has more pixels (width x height) than --max-area",
    "aspect_ratio_too_large": "the image is more elongated than --max-aspect-ratio allows",
    "connect_timeout": "no connection within --connect-timeout",
    "read_timeout": "the server went silent for longer than --read-timeout",
    "total_timeout": (
        "the attempt took longer than --timeout: with no response, the server is overloaded "
        "(lower --per-host); in the body, the transfer is slow (raise --timeout)"
    ),
    "too_slow": "the transfer stayed below the minimum speed",
    "too_many_redirects": "more redirects than --max-redirects",
    "hash_mismatch": (
        "the downloaded bytes differ from the digest in --verify-hash-column: the file "
        "changed since the list was made (often re-encoded by the site), or the column holds "
        "another algorithm (--verify-hash-type)"
    ),
    "opted_out": (
        "the server's X-Robots-Tag (noai, noimageai, ...) or tdm-reservation header reserves "
        "these files, so they were not saved; --disallowed-header-directives sets which "
        "directives are honoured"
    ),
    "proxy_error": (
        "the proxy refused the request (a 407 wants credentials: "
        "--proxy http://user:password@host:port, or the same in https_proxy/http_proxy "
        "with --proxy env)"
    ),
}
#: HTTP statuses that ask the client to slow down.
_SLOW_DOWN = {"429", "503"}


def outcome_rows(report: Report) -> list[tuple[str, int]]:
    """(outcome, items) rows: ok, then failures by error code, largest first, split where one
    code needs different actions (``http_error 404`` / ``http_error 500``, ``total_timeout
    (no response)`` / ``total_timeout (in the body)``)."""
    rows: list[tuple[str, int]] = []
    for code, count in report.errors.items():
        details = report.breakdown.get(code)
        if details:
            spell = "{} {}" if code == "http_error" else "{} ({})"
            rows += [(spell.format(code, detail), n) for detail, n in details.items()]
            if count > sum(details.values()):
                rows.append((str(code), count - sum(details.values())))
        else:
            rows.append((f"skipped: {code}" if code == "duplicate" else str(code), count))
    rows.sort(key=lambda row: (-row[1], row[0]))
    return [("ok", report.ok), *rows]


def advice(report: Report) -> list[str]:
    """What the user can do next, one line each (empty when all is well)."""
    # Hints for what failed in this run; earlier failures get the --retry-failed line.
    fresh = [c for c, n in report.errors.items() if n > report.resumed_errors.get(c, 0)]
    lines = [f"{code}: {HINTS[code]}" for code in sorted(fresh) if code in HINTS]
    statuses = report.breakdown.get("http_error", {})
    slow = sum(n for status, n in statuses.items() if status in _SLOW_DOWN)
    if slow:
        lines.append(
            f"http_error 429/503 ({slow:,}): the server asked to slow down; "
            "lower --per-host or set --rate-per-host"
        )
    if report.resumed_failed:
        lines.append(
            f"{report.resumed_failed:,} items failed in an earlier run and were kept as they "
            "are: add --retry-failed to try them again"
        )
    if report.failed:
        lines.append(
            "every failure, with its message: fetchpool manifest "
            f"{report.store or report.out} --status failed"
        )
    return lines


def render_summary(report: Report, console: Console) -> None:
    """Print the headline, outcomes by error code, bytes, the concurrency gain and advice."""
    console.print(f"[bold]{headline(report)}[/bold]")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("outcome")
    table.add_column("items", justify="right")
    for outcome, count in outcome_rows(report):
        style = "green" if outcome == "ok" else "" if outcome.startswith("skipped") else "red"
        table.add_row(f"[{style}]{outcome}[/{style}]" if style else outcome, f"{count:,}")
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
    for line in advice(report):
        console.print(f"hint: {line}", highlight=False)
    if report.store is not None:  # a cluster run: its plan, parts and their records
        console.print(f"output: {report.store}   state: {report.store.display('.fetchpool')}")
        return
    console.print(f"output: {report.out}   state: {report.out / '.fetchpool' / 'state.db'}")
