"""Observers that show a run while it happens: a rich progress bar and a log line per item."""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from fetchpool.events import Event, ItemFinished, RunFinished, RunStarted
from fetchpool.models import Status
from fetchpool.redact import redact_text, redact_url

log = logging.getLogger("fetchpool")


class _RateColumn(ProgressColumn):
    """items/s and MB/s since the run started (steadier than rich's windowed speed)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        mb = float(task.fields.get("bytes", 0)) / 1e6
        return Text(f"{task.completed / elapsed:,.0f} items/s {mb / elapsed:,.1f} MB/s", "cyan")


class _FailedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        failed = int(task.fields.get("failed", 0))
        return Text(f"{failed:,} failed", "red" if failed else "dim")


class ProgressBar:
    """done/total (when known), items/s, MB/s, failures, ETA. Redraws at most ~10 times/s."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]fetchpool"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            _FailedColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
            refresh_per_second=8,
        )
        self._task: TaskID | None = None
        self._done = 0
        self._failed = 0
        self._bytes = 0

    def start(self, total: int | None) -> None:
        self._progress.start()
        self._task = self._progress.add_task("fetch", total=total, bytes=0, failed=0)

    def show(self, done: int, failed: int, fetched: int) -> None:
        """Items finished, of which failed, and bytes downloaded so far."""
        if self._task is not None:
            self._progress.update(self._task, completed=done, bytes=fetched, failed=failed)

    def stop(self) -> None:
        self._progress.stop()

    def on_event(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.start(event.total)
        elif isinstance(event, ItemFinished):
            record = event.record
            self._done += 1
            self._failed += record.status is Status.FAILED
            self._bytes += record.bytes if record.status is Status.OK else 0
            self.show(self._done, self._failed, self._bytes)
        elif isinstance(event, RunFinished):
            self.stop()


class ItemLog:
    """One log line per finished item (``-v``), with the thread that fetched it."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def on_event(self, event: Event) -> None:
        if not isinstance(event, ItemFinished):
            return
        r = event.record
        if r.status is Status.OK:
            log.info(
                "ok #%d %s -> %s (%d bytes, %.2fs, %s)",
                r.position,
                r.final_url or r.url,
                r.path,
                r.bytes,
                r.elapsed,
                r.worker,
            )
        else:
            message = redact_text(r.error_message or "")
            log.info(
                "%s #%d %s: %s %s", r.status, r.position, redact_url(r.url), r.error_code, message
            )
