"""The run loop: one thread that admits, dispatches, retries, publishes and journals.

::

    admission ──▶ per-host queues (HostScheduler: per-host cap, rate, Retry-After)
                     │ dispatch
                     ▼
                  FetchBackend ──Fetched──┐
                  ImageStage ──Processed──┼──▶ events queue ──▶ loop thread
                  publishers ──Published──┤     retry? ──▶ scheduler.add_later(backoff)
                  Pipeline.stop ──Wake────┘     ok ──▶ publish (as the plan says) ──▶ journal

Stages talk to the loop only through typed events on one queue; everything stateful (journal,
writer, scheduler, window, observers) is touched by the loop thread alone, so none of it needs
locks. Time is read from an injected monotonic ``clock``, so scheduling is testable without
sleeping.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fetchpool import fsutil
from fetchpool.config import Options
from fetchpool.engine.admission import Admission, OpenItem
from fetchpool.engine.assembly import PublishPlan, assemble
from fetchpool.engine.backends import FetcherFactory
from fetchpool.engine.backends.shared import publish
from fetchpool.engine.runner import Done
from fetchpool.engine.scheduler import HostScheduler, host_key
from fetchpool.errors import DiskFullError, OutputError
from fetchpool.events import Broadcast, ItemFinished
from fetchpool.models import BadInput, ErrorCode, Job, Record, Report, Status
from fetchpool.policies import RetriesExhausted

if TYPE_CHECKING:
    from fetchpool.state.journal import Journal

log = logging.getLogger("fetchpool")

#: Input items admitted per journal round trip: large enough that lookups cost little per
#: item, small enough that a batch never holds up dispatching for long.
ADMIT_BATCH = 256


@dataclass(frozen=True, slots=True)
class Fetched:
    """A fetch attempt ended (the backend's ``on_done``)."""

    done: Done[Record]


@dataclass(frozen=True, slots=True)
class Processed:
    """The CPU stage finished (or failed) an item."""

    record: Record


@dataclass(frozen=True, slots=True)
class Published:
    """A publisher thread gave a CPU-stage result its final name."""

    record: Record


@dataclass(frozen=True, slots=True)
class Wake:
    """Look at the stop flags now (a stop was asked)."""


LoopEvent = Fetched | Processed | Published | Wake


@dataclass(frozen=True, slots=True)
class Controls:
    """What a pipeline shares with its loop: the events queue and the stop flags. Its
    :meth:`stop` is thread-safe and safe in a signal handler."""

    events: queue.SimpleQueue[LoopEvent]
    stopping: threading.Event
    hurrying: threading.Event

    @classmethod
    def new(cls) -> Controls:
        return cls(queue.SimpleQueue(), threading.Event(), threading.Event())

    def stop(self, *, hurry: bool = False) -> None:
        if hurry:
            self.hurrying.set()
        self.stopping.set()
        self.events.put(Wake())


class RunLoop:
    """One run's loop over an open journal: see the module docstring."""

    def __init__(
        self,
        out: Path,
        options: Options,
        journal: Journal,
        report: Report,
        *,
        observers: Broadcast,
        controls: Controls,
        fetcher: FetcherFactory | None,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self._options = options
        self._journal = journal
        self._report = report
        self._observers = observers
        self._controls = controls
        self._events = controls.events
        self._stop = controls.stopping
        self._hurry = controls.hurrying
        self._rng = rng
        self._clock = clock
        fetch = options.fetch
        self._scheduler: HostScheduler[OpenItem] = HostScheduler(
            fetch.per_host, fetch.rate_per_host
        )
        self._admission = Admission(out, options, journal, self._scheduler, self)
        self._cancelling = False
        stages = assemble(
            out,
            options,
            journal,
            fetcher=fetcher,
            on_fetched=lambda done: self._events.put(Fetched(done)),
            on_processed=lambda record: self._events.put(Processed(record)),
            on_published=self._published,
        )
        self._writer = stages.writer
        self._images = stages.images
        self._backend = stages.backend
        self._publishers = stages.publishers
        self._plan = stages.plan
        self._holds_rows = stages.holds_rows

    def run(self, items: Iterator[Job | BadInput]) -> None:
        cancel = False
        try:
            self._pump(items)
        except KeyboardInterrupt:
            # Library use without our signal handler: stop now, keep what is finished.
            self._report.interrupted = True
            cancel = True
        finally:
            self._shutdown(cancel=cancel or self._hurry.is_set())

    # -- Outcomes, for admission ---------------------------------------------------------------

    def finish(self, record: Record) -> None:
        self._finish(record)

    def resumed(self, prior: Record) -> None:
        self._report.add(prior, resumed=True)
        self._observers.on_event(ItemFinished(prior))

    def refuse(self, reason: str) -> None:
        self.stop_run("input_mismatch", reason)

    def stop_run(self, kind: str, reason: str) -> None:
        """A run-level failure: remember the first one and stop (exit code 2)."""
        self._report.fail_run(kind, reason)
        self._controls.stop()

    # -- the loop ----------------------------------------------------------------------------

    def _pump(self, items: Iterator[Job | BadInput]) -> None:
        exhausted = False
        while True:
            if self._stop.is_set():
                self._report.interrupted = self._report.fatal is None
                self._settle()
                return
            while not exhausted and self._room() > 0 and not self._stop.is_set():
                wanted = min(self._room(), ADMIT_BATCH)
                batch = list(itertools.islice(items, wanted))
                exhausted = len(batch) < wanted
                self._admission.admit_batch(batch)
            self._dispatch()
            if exhausted and self._admission.open_items == 0:
                return
            self._wait_for_events()

    def _settle(self) -> None:
        """After a stop: handle the results of the work in flight as they come, until there
        is none left or the stop is hurried (then :meth:`_shutdown` abandons the rest)."""
        while not self._hurry.is_set() and self._busy():
            # Nothing is dispatched any more: retries due now must not make this spin.
            self._wait_for_events(wake=1.0)

    def _busy(self) -> bool:
        stages = (self._backend, self._images, self._publishers)
        return any(stage is not None and stage.in_flight > 0 for stage in stages)

    def _room(self) -> int:
        """How many items to admit now: none until a quarter of the window is free (or the
        pipeline ran dry), so admission comes in batches, not in ones and twos."""
        window = self._options.in_flight
        free = window - self._admission.open_items
        if free < window // 4 and self._backend.in_flight > 0:
            return 0
        return free

    def _wait_for_events(self, wake: float | None = None) -> None:
        if wake is None:
            wake = self._scheduler.next_wakeup(self._clock())
        try:
            event = self._events.get(timeout=min(wake, 1.0) if wake is not None else 1.0)
        except queue.Empty:
            return
        self._handle(event)
        self._drain_events()  # whatever else is ready, before dispatching again

    def _drain_events(self) -> None:
        """Handle every result already queued: even when cancelling, what is finished gets
        its journal row (only waiting for more is skipped)."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(event)

    def _handle(self, event: LoopEvent) -> None:
        match event:
            case Fetched(done):
                self._on_fetched(done)
            case Processed(record) if self._plan is PublishPlan.AFTER_CPU_IN_PUBLISHERS:
                assert self._publishers is not None
                self._publishers.submit(publish, self._writer, record)
            case Processed(record) | Published(record):
                self._publish(record)
            case Wake():
                pass  # the loop looks at the stop flags before it waits again

    # -- fetching ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        budget = self._options.fetch.threads - self._backend.in_flight
        if budget <= 0 or self._stop.is_set():
            return
        for _, entry in self._scheduler.take(self._clock(), budget):
            entry.attempts += 1
            self._backend.submit(entry.job, entry.host, entry.attempts)
        self._backend.flush()

    def _published(self, done: Done[Record]) -> None:
        if done.value is not None:
            self._events.put(Published(done.value))

    def _on_fetched(self, done: Done[Record]) -> None:
        record = done.value
        entry = self._admission.get(record.url) if record is not None else None
        if record is None or entry is None:  # backends never raise; defensive only
            return
        self._report.busy += max(0.0, done.task.end - done.task.start)
        now = self._clock()
        self._scheduler.release(entry.host, now)
        if record.moved_to is not None:
            self._move(entry, record)
            return
        record.attempts = entry.attempts
        # A fetch worker process gone while stopping gives internal_error.
        if self._cut_short(record, ErrorCode.INTERNAL_ERROR):
            return
        if record.status is not Status.OK:
            self._retry_or_finish(entry, record, now)
        elif self._images is not None:
            if self._cancelling:  # the CPU stage is being cancelled: late results are dropped
                self._drop(record)
                return
            self._images.submit(record)
        else:
            self._publish(record)

    def _move(self, entry: OpenItem, record: Record) -> None:
        """A redirect led to another host: the same attempt goes on, queued under that host,
        so its per-host limit and rate hold for every item redirected there."""
        hop = record.moved_to
        assert hop is not None
        if self._stop.is_set():
            self._drop(record)
            return
        entry.job = replace(entry.job, hop=hop)
        entry.host = host_key(hop.url)
        entry.attempts -= 1  # counted again when dispatched: it is still the same attempt
        self._scheduler.add(entry.host, entry)

    def _retry_or_finish(self, entry: OpenItem, record: Record, now: float) -> None:
        policy = entry.policy
        if not policy.retryable(record):
            self._finish_open(record)
            return
        try:
            entry.policy = policy.increment(record)
        except RetriesExhausted:
            self._finish_open(record)
            return
        if self._stop.is_set():
            # Not journaled: a transient failure during shutdown is retried by the next run.
            self._drop(record)
            return
        delay = policy.delay(record, self._rng)
        if record.retry_after is not None:
            self._scheduler.slow_down(entry.host, now + delay)
        log.info(
            "retrying item %d in %.2fs after %s (attempt %d)",
            record.position,
            delay,
            record.error_code,
            entry.attempts,
        )
        self._scheduler.add_later(entry.host, entry, now + delay)

    # -- publishing --------------------------------------------------------------------------

    def _publish(self, record: Record) -> None:
        """An item done with fetching (and the CPU stage). With ``IN_LOOP`` the writer
        publishes it here; with the other plans it was published already (in fetch, or by a
        publisher thread), and the files writer's ``write`` only notes its folder for the next
        sync (its ``temp_path`` is gone)."""
        # CPU-stage workers gone down with the stop give process_failed.
        if self._cut_short(record, ErrorCode.PROCESS_FAILED):
            return
        if record.status is not Status.OK:
            self._finish_open(record)
            return
        try:
            durable = self._writer.write(record)
        except DiskFullError as exc:
            self._fatal(record.fail(ErrorCode.DISK_FULL, str(exc)), str(exc))
            return
        except OutputError as exc:
            if record.path is not None:
                # Its shard got its name before the error: its staged row stands, and the
                # journal's next open settles it (journaling a failure here would contradict
                # the shard).
                self._drop(record)
                return
            self._finish_open(record.fail(ErrorCode.IO_ERROR, str(exc)))
            return
        if record not in durable:
            for waiter in self._admission.park(record):
                self._finish(waiter)
        for done in durable:
            self._finish_open(done, durable=True)

    def _cut_short(self, record: Record, lost: ErrorCode) -> bool:
        """Handle an item that a full disk or the stop cut short, and say so. ``lost`` is
        the code its stage gives when its workers went down with the stop: an interrupted
        item is not a failed one, so it is dropped, and the next run fetches it."""
        if record.error_code is ErrorCode.DISK_FULL:
            self._fatal(record, record.error_message or "disk full")
            return True
        if record.error_code is ErrorCode.CANCELLED or (
            self._stop.is_set() and record.error_code is lost
        ):
            self._drop(record)
            return True
        return False

    def _finish_open(self, record: Record, *, durable: bool = False) -> None:
        """``record`` is final for its open item (``durable``: the writer just published it,
        with its shard); so are the duplicates that waited for it."""
        entry = self._admission.close(record)
        record.temp_path = None
        self._finish(record, durable=durable)
        if entry is not None:
            for waiter in self._admission.release(entry, record):
                self._finish(waiter)

    def _finish(self, record: Record, *, durable: bool = False) -> None:
        """Journal a final record, or hand it to a writer that holds rows with its open shard
        (then it is journaled, with the shard, when the writer publishes it)."""
        if self._holds_rows and not durable:
            self._hold(record)
            return
        try:
            self._journal.put(record)
        except DiskFullError as exc:
            # The journal cannot grow: stop. Rows not committed are fetched again next time,
            # and their files, already named, are adopted as identical then.
            self.stop_run("disk_full", str(exc))
        self._report.add(record)
        self._observers.on_event(ItemFinished(record))

    def _hold(self, record: Record) -> None:
        try:
            published = self._writer.write(record)
        except DiskFullError as exc:
            self.stop_run("disk_full", str(exc))
            self._report.unfinished += 1
            return
        except OutputError as exc:  # the shard it would have closed is lost
            self.stop_run("output_error", str(exc))
            self._report.unfinished += 1
            return
        for done in published:
            self._finish_open(done, durable=True)

    def _fatal(self, record: Record, reason: str) -> None:
        """A run-level failure (disk full): stop. The item that met it is neither journaled
        nor counted as failed, since it did nothing wrong: it is unfinished, and the next run,
        with space freed, fetches it like any other."""
        self.stop_run("disk_full", reason)
        self._drop(record)

    def _drop(self, record: Record) -> None:
        """Forget an open item without journaling it (and the duplicates waiting on it): it
        is unfinished, and the next run fetches it."""
        fsutil.discard(record.temp_path)
        self._report.unfinished += self._admission.drop(record)

    # -- stopping ----------------------------------------------------------------------------

    def _shutdown(self, *, cancel: bool) -> None:
        """Stop the stages in data-flow order, journaling what finished.

        Cancelling, stages drop their queued and running work (a hurried stop does not even
        wait for the fetch threads: the CLI leaves right after). Whatever was admitted and
        is not journaled in the end is counted unfinished: the next run fetches it.
        """
        self._cancelling = cancel
        try:
            self._backend.shutdown(cancel=cancel, wait=not self._hurry.is_set())
            self._drain_events()
            if self._images is not None:
                self._images.close(cancel=cancel)
                self._drain_events()
            if self._publishers is not None:
                self._publishers.shutdown(cancel=cancel)
                self._drain_events()
            try:
                for record in self._writer.close():
                    self._finish_open(record, durable=True)
            except DiskFullError as exc:
                self.stop_run("disk_full", str(exc))
            except OutputError as exc:  # the last shard is lost; its items are unfinished
                self.stop_run("output_error", str(exc))
        finally:
            self._report.unfinished += self._admission.abandoned()


__all__ = ["Controls", "Fetched", "LoopEvent", "Processed", "Published", "RunLoop", "Wake"]
