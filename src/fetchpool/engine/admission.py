"""Admission: which input items enter a run, and the window of items open at once.

::

    batch of Job / BadInput ──▶ journal: rows at these positions, earlier ok rows of these URLs
        another URL at a position ──▶ refused: a different input (the run stops, nothing written)
        a bad line ──▶ finished (failed) once;  a row still valid ──▶ resumed, untouched
        a URL open now ──▶ waits for it (a duplicate);  one done before, on disk ──▶ duplicate
        else ──▶ opened: an OpenItem queued under its host

Two journal queries per batch, not two per item. The window counts the items admitted and
not yet final (a later copy of an open URL counts too); the loop admits only while it has
room, so memory grows with concurrency, never with the input's length. The loop owns the
finishing: it calls back into :class:`Outcomes` and closes items through :class:`Admission`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fetchpool.config import Options
from fetchpool.engine.scheduler import HostScheduler, host_key
from fetchpool.models import BadInput, ErrorCode, Job, Record, Status
from fetchpool.policies import RetryPolicy

if TYPE_CHECKING:
    from fetchpool.state.journal import Journal


@dataclass(slots=True)
class OpenItem:
    """An input item between admission and its final record."""

    job: Job
    host: str
    policy: RetryPolicy
    attempts: int = 0
    waiters: list[Job] = field(default_factory=list)  # later duplicates of the same URL
    parked: bool = False  # handed to a writer that makes it durable later (a shard)


class Outcomes(Protocol):
    """What admission asks of the run loop."""

    def finish(self, record: Record) -> None:
        """Journal a final record (or hold it with the open shard)."""

    def resumed(self, prior: Record) -> None:
        """Count a record an earlier run finished, left as it is."""

    def refuse(self, reason: str) -> None:
        """Stop the run: this input is not the one that filled the folder."""


class Admission:
    """Admits input items into the run and keeps the window of open ones (one per URL)."""

    def __init__(
        self,
        out: Path,
        options: Options,
        journal: Journal,
        scheduler: HostScheduler[OpenItem],
        outcomes: Outcomes,
    ) -> None:
        self._out = out
        self._options = options
        self._journal = journal
        self._scheduler = scheduler
        self._outcomes = outcomes
        self._open: dict[str, OpenItem] = {}  # by URL: one fetch per URL, later copies wait
        #: Items admitted and not final, later copies included; parked ones have left.
        self.open_items = 0

    # -- admitting ---------------------------------------------------------------------------

    def admit_batch(self, batch: Sequence[Job | BadInput]) -> None:
        """Admit items with two journal queries per batch, not two per item."""
        jobs = [item for item in batch if isinstance(item, Job)]
        priors = self._journal.get_many([item.position for item in batch])
        for item in batch:  # the whole batch first: a refused input leaves no row at all
            prior = priors.get(item.position)
            if prior is not None and prior.url != (item.url if isinstance(item, Job) else item.raw):
                self._refuse_input(item, prior)
                return
        earlier = self._journal.find_ok_by_urls([job.url for job in jobs])
        for item in batch:
            prior = priors.get(item.position)
            if isinstance(item, BadInput):
                if prior is None:
                    self._outcomes.finish(Record.for_bad_input(item))
                else:
                    self._outcomes.resumed(prior)
            else:
                self._admit(item, prior, earlier.get(item.url))

    def _refuse_input(self, item: Job | BadInput, prior: Record) -> None:
        """The journal holds another URL at this position: this is not the input that filled
        the folder. Stop before the item replaces anything (RELIABILITY.md case 44)."""
        from fetchpool.redact import redact_url

        now = item.url if isinstance(item, Job) else item.raw
        where = f"item {item.position}" + (f" (line {item.line})" if item.line else "")
        source = self._journal.earlier_source()
        filled = f" (filled from {source})" if source else ""
        self._outcomes.refuse(
            f"{self._out} holds the records of a different input{filled}: {where} was "
            f"{redact_url(prior.url)!r} there and is {redact_url(now)!r} in this one. "
            "Write this input into another output folder (-o), or run the input that "
            "filled this folder (appending lines to it is fine)."
        )

    def _admit(self, item: Job, prior: Record | None, earlier: Record | None) -> None:
        if prior is not None and self._still_valid(prior):
            self._outcomes.resumed(prior)
            return
        self.open_items += 1
        current = self._open.get(item.url)
        if current is not None and current.parked:
            self.open_items -= 1
            self._outcomes.finish(duplicate(item, current.job, Status.OK))
            return
        if current is not None:
            current.waiters.append(item)
            return
        if earlier is not None and earlier.position != item.position and self._on_disk(earlier):
            self.open_items -= 1
            self._outcomes.finish(duplicate(item, earlier, earlier.status, earlier.path))
            return
        entry = OpenItem(item, host_key(item.url), RetryPolicy.from_config(self._options.fetch))
        self._open[item.url] = entry
        self._scheduler.add(entry.host, entry)

    def _still_valid(self, prior: Record) -> bool:
        """A record from an earlier run that this run keeps as it is."""
        if prior.status is Status.OK:
            return self._on_disk(prior)
        if prior.status is Status.FAILED:
            return not self._options.retry_failed
        return prior.status is Status.SKIPPED and prior.error_code is ErrorCode.DUPLICATE

    def _on_disk(self, record: Record) -> bool:
        if not record.path:
            return False
        target = self._out / record.path.split("#", 1)[0]
        try:
            size = target.stat().st_size
        except OSError:
            return False
        # A file published by the files writer must still have the bytes we journaled.
        return "#" in record.path or size == record.bytes

    # -- the window --------------------------------------------------------------------------

    def get(self, url: str) -> OpenItem | None:
        return self._open.get(url)

    def close(self, record: Record) -> OpenItem | None:
        r"""``record`` is final for its open item: the item is forgotten, and returned when
        its duplicates are still to be :meth:`release`\ d. A failure held with a shard (its
        item left when it failed) or a parked item (it left the window already) returns None."""
        entry = self._open.get(record.url)
        if entry is None or entry.job.position != record.position:
            return None
        del self._open[record.url]
        return None if entry.parked else entry

    def release(self, entry: OpenItem, final: Record) -> list[Record]:
        """``entry`` leaves the window with its final record ``final``; returns the records of
        the duplicates that waited for it, to be finished after it."""
        return self._leave(entry, final.status, final.path)

    def park(self, record: Record) -> list[Record]:
        """The writer holds this item until its shard is closed: it leaves the window now
        (otherwise a shard larger than the window would stall the run waiting for itself);
        its waiting duplicates are returned, to be finished."""
        entry = self._open.get(record.url)
        if entry is None or entry.parked:
            return []
        entry.parked = True
        return self._leave(entry, Status.OK)

    def _leave(self, entry: OpenItem, status: Status, path: str | None = None) -> list[Record]:
        self.open_items -= 1 + len(entry.waiters)
        waiters, entry.waiters = entry.waiters, []
        return [duplicate(waiter, entry.job, status, path) for waiter in waiters]

    def drop(self, record: Record) -> int:
        """Forget an open item (and the duplicates waiting on it) without a final record;
        returns how many items that leaves unfinished."""
        entry = self._open.pop(record.url, None)
        if entry is None:
            return 0
        if not entry.parked:
            self.open_items -= 1 + len(entry.waiters)
        return 1 + len(entry.waiters)

    def abandoned(self) -> int:
        """Items started and never finished (a hurried stop, a lost last shard); items read
        but never dispatched were not under way and are simply read again next time."""
        return sum(
            1 + len(entry.waiters)
            for entry in self._open.values()
            if entry.parked or entry.attempts > 0
        )


def duplicate(job: Job, first: Job | Record, status: Status, path: str | None = None) -> Record:
    """The record of a later copy of a URL: skipped, pointing at the first copy's output."""
    record = Record.for_job(job)
    record.status = Status.SKIPPED
    record.error_code = ErrorCode.DUPLICATE
    record.error_message = f"same URL as item {first.position} ({status})"
    record.path = path
    return record
