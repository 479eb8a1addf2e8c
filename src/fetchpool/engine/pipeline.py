"""The download pipeline: a bounded scheduler feeding fetch threads, a CPU stage and writers.

::

    read_input ──▶ admit ──(bad line, done before, duplicate)──────────────────▶ finish
                     │
                     ▼ per-host queues (HostScheduler: per-host cap, rate, Retry-After)
                   dispatch ──▶ FetchBackend (--engine: threads | processes) ── one attempt
                                      │ on_done                 (Fetcher.fetch(job))
                                      ▼
                   events queue ◀── ImageStage (process pool), when images are processed
                     │
        loop thread: retry? ──▶ scheduler.add_later(backoff / Retry-After)
                     │ ok
                     ▼
                   Writer.write ──▶ durable records ──▶ Journal.put ──▶ observers

Everything stateful (journal, writer, scheduler, observers) is touched only by the loop
thread, so none of it needs locks; fetch threads and the CPU stage talk to it through one
queue. At most ``Options.in_flight`` input items are open at once (read but not finished):
memory grows with concurrency, never with the input's length.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from fetchpool import fsutil
from fetchpool.config import Options
from fetchpool.engine.backends import (
    BackendSetup,
    FetchBackend,
    FetcherFactory,
    build_backend,
    check_engine,
)
from fetchpool.engine.backends.shared import publish
from fetchpool.engine.runner import Done, TaskPool
from fetchpool.engine.scheduler import HostScheduler, host_key
from fetchpool.errors import ConfigError, DiskFullError, FetchpoolError, OutputError
from fetchpool.events import Broadcast, ItemFinished, Observer, RunFinished, RunStarted
from fetchpool.models import BadInput, ErrorCode, Job, Record, Report, Status
from fetchpool.policies import RetriesExhausted, RetryPolicy
from fetchpool.stages import Writer
from fetchpool.storage import is_remote

log = logging.getLogger("fetchpool")

Source = str | os.PathLike[str] | Iterable[str | Mapping[str, Any]]
#: Input items admitted per journal round trip: large enough that lookups cost little per
#: item, small enough that a batch never holds up dispatching for long.
ADMIT_BATCH = 256

#: Threads that publish CPU-stage results: fsync + link are short and disk-bound; a few
#: overlap them without taking fetch threads.
PUBLISH_THREADS = 4


@dataclass(slots=True)
class _Open:
    """An input item between admission and its final record."""

    job: Job
    host: str
    policy: RetryPolicy
    attempts: int = 0
    waiters: list[Job] = field(default_factory=list)  # later duplicates of the same URL
    parked: bool = False  # handed to a writer that makes it durable later (a shard)


class Pipeline:
    """One run over one output folder. Use :func:`download` unless you need ``stop()``."""

    def __init__(
        self,
        out: Path,
        options: Options,
        *,
        fetcher: FetcherFactory | None = None,
        observers: Iterable[Observer] = (),
        rng: random.Random | None = None,
    ) -> None:
        check_engine(options.fetch, fetcher)
        self.out = out
        self.options = options
        self._custom_fetcher = fetcher
        self._observers = Broadcast(observers)
        self._rng = rng or random.Random()
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._open: dict[str, _Open] = {}  # by URL: one fetch per URL, later copies wait
        self._open_items = 0
        from fetchpool.state.journal import iter_journal

        self._report = Report(out=out, source=partial(iter_journal, out))

    def stop(self, *, hurry: bool = False) -> None:
        """Ask the run to stop: no new work starts; finished work is kept. Thread-safe, and
        safe in a signal handler.

        Items in flight are finished and journaled first, unless ``hurry``: then they are
        abandoned (not journaled, so the next run fetches them) and the run returns as soon
        as the journal has committed what is finished. A stop may be hurried later.
        """
        if hurry:
            self._hurry.set()
        self._stop.set()
        self._events.put(("wake", None))

    @property
    def report(self) -> Report:
        """The run's report as it stands (counts grow while the run goes on): read it from
        another thread for progress, never change it."""
        return self._report

    @property
    def hurried(self) -> bool:
        """Whether a stop was hurried: fetch threads may still be winding down."""
        return self._hurry.is_set()

    def run(self, source: Source) -> Report:
        from fetchpool.inputs import check_input, read_input

        # A missing file, an unknown format or no URL column: refused before OUT is touched.
        check_input(
            source,
            format=self.options.input_format,
            url_column=self.options.url_column,
            caption_column=self.options.output.caption_column,
            required=self.options.required_columns,
        )
        if (self.out / ".fetchpool" / "plan.json").is_file():
            raise ConfigError(
                f"{self.out} holds a cluster run (its parts are in {self.out}/part-*): "
                "rerun it with --cluster, or write this run elsewhere"
            )
        name, size = _describe(source)
        return self.run_items(
            lambda: read_input(
                source,
                format=self.options.input_format,
                url_column=self.options.url_column,
                shard=self.options.shard,
            ),
            source_name=name,
            source_size=size,
            total=lambda: self._total(source),
        )

    def run_items(
        self,
        items: Callable[[], Iterator[Job | BadInput]],
        *,
        source_name: str | None = None,
        source_size: int | None = None,
        total: Callable[[], int | None] = lambda: None,
    ) -> Report:
        """Run over input items already read and numbered (``items()`` is called once the
        journal is open): what :meth:`run` does after reading, and what a part of a cluster
        run does with its part of the input (positions stay those of the whole input)."""
        from fetchpool.heap import keep_heap_trimmed
        from fetchpool.state.journal import Journal

        keep_heap_trimmed()
        started = time.perf_counter()
        try:
            with Journal.open(
                self.out,
                source=source_name,
                source_size=source_size,
                settings=self.options.recorded(),
            ) as journal:
                self._journal = journal
                self._observers.on_event(RunStarted(total=total(), out=str(self.out)))
                self._loop(items())
        except DiskFullError as exc:  # the journal's last commit, at close
            self._stop_run("disk_full", str(exc))
        self._report.wall = time.perf_counter() - started
        self._observers.on_event(
            RunFinished(wall=self._report.wall, interrupted=self._report.interrupted)
        )
        return self._report

    def _total(self, source: Source) -> int | None:
        from fetchpool.inputs import estimate_total

        if not isinstance(source, str | os.PathLike) or str(source) == "-":
            return None
        try:
            return estimate_total(source, format=self.options.input_format)
        except (FetchpoolError, OSError, ValueError):
            return None

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self, items: Iterator[Job | BadInput]) -> None:
        fetch = self.options.fetch
        self._scheduler: HostScheduler[_Open] = HostScheduler(fetch.per_host, fetch.rate_per_host)
        self._writer = self._make_writer()
        # A sharded writer keeps failed and skipped rows with its open shard (its metadata):
        # they are journaled when it is published, like its samples.
        self._holds_rows = self._writer.holds_rows
        self._journal.before_commit = self._writer.sync
        self._images = self._make_image_stage()
        # Files are published by the fetch thread that downloaded them when nothing else has
        # to happen in between: the link and its syscalls then run in parallel, not in the loop.
        self._publish_in_fetch = self._images is None and self._writer.concurrent
        # CPU-stage results are published by a few threads of their own, for the same reason.
        self._publishers: TaskPool[Record] | None = None
        if self._images is not None and self._writer.concurrent:
            self._publishers = TaskPool(
                "threads", PUBLISH_THREADS, name="publish", on_done=self._published
            )
        self._cancelling = False
        self._pool = self._make_backend()
        cancel = False
        try:
            self._pump(items)
        except KeyboardInterrupt:
            # Library use without our signal handler: stop now, keep what is finished.
            self._report.interrupted = True
            cancel = True
        finally:
            self._shutdown(cancel=cancel or self._hurry.is_set())

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
                self._admit_batch(batch)
            self._dispatch()
            if exhausted and self._open_items == 0:
                return
            self._wait_for_events()

    def _settle(self) -> None:
        """After a stop: handle the results of the work in flight as they come, until there
        is none left or the stop is hurried (then :meth:`_shutdown` abandons the rest)."""
        while not self._hurry.is_set() and self._busy():
            # Nothing is dispatched any more: retries due now must not make this spin.
            self._wait_for_events(wake=1.0)

    def _busy(self) -> bool:
        stages = (self._pool, self._images, self._publishers)
        return any(stage is not None and stage.in_flight > 0 for stage in stages)

    def _room(self) -> int:
        """How many items to admit now: none until a quarter of the window is free (or the
        pipeline ran dry), so admission comes in batches, not in ones and twos."""
        free = self.options.in_flight - self._open_items
        if free < self.options.in_flight // 4 and self._pool.in_flight > 0:
            return 0
        return free

    def _wait_for_events(self, wake: float | None = None) -> None:
        if wake is None:
            wake = self._scheduler.next_wakeup(time.monotonic())
        try:
            kind, payload = self._events.get(timeout=min(wake, 1.0) if wake is not None else 1.0)
        except queue.Empty:
            return
        self._handle(kind, payload)
        while True:  # drain whatever else is ready before dispatching again
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(kind, payload)

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "fetched":
            self._on_fetched(*payload)
        elif kind == "processed" and self._publishers is not None:
            self._publishers.submit(publish, self._writer, payload)
        elif kind in ("processed", "published"):
            self._publish(payload)

    # -- admission ---------------------------------------------------------------------------

    def _admit_batch(self, batch: list[Job | BadInput]) -> None:
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
                    self._finish(Record.for_bad_input(item))
                else:
                    self._report.add(prior, resumed=True)
                    self._observers.on_event(ItemFinished(prior))
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
        self._stop_run(
            "input_mismatch",
            f"{self.out} holds the records of a different input{filled}: {where} was "
            f"{redact_url(prior.url)!r} there and is {redact_url(now)!r} in this one. "
            "Write this input into another output folder (-o), or run the input that "
            "filled this folder (appending lines to it is fine).",
        )

    def _admit(self, item: Job, prior: Record | None, earlier: Record | None) -> None:
        if prior is not None and self._still_valid(prior):
            self._report.add(prior, resumed=True)
            self._observers.on_event(ItemFinished(prior))
            return
        self._open_items += 1
        current = self._open.get(item.url)
        if current is not None and current.parked:
            self._open_items -= 1
            self._finish(_duplicate(item, current.job, Status.OK))
            return
        if current is not None:
            current.waiters.append(item)
            return
        if earlier is not None and earlier.position != item.position and self._on_disk(earlier):
            self._open_items -= 1
            self._finish(_duplicate(item, earlier, earlier.status, earlier.path))
            return
        entry = _Open(item, host_key(item.url), RetryPolicy.from_config(self.options.fetch))
        self._open[item.url] = entry
        self._scheduler.add(entry.host, entry)

    def _still_valid(self, prior: Record) -> bool:
        """A record from an earlier run that this run keeps as it is."""
        if prior.status is Status.OK:
            return self._on_disk(prior)
        if prior.status is Status.FAILED:
            return not self.options.retry_failed
        return prior.status is Status.SKIPPED and prior.error_code is ErrorCode.DUPLICATE

    def _on_disk(self, record: Record) -> bool:
        if not record.path:
            return False
        target = self.out / record.path.split("#", 1)[0]
        try:
            size = target.stat().st_size
        except OSError:
            return False
        # A file published by the files writer must still have the bytes we journaled.
        return "#" in record.path or size == record.bytes

    # -- fetching ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        budget = self.options.fetch.threads - self._pool.in_flight
        if budget <= 0 or self._stop.is_set():
            return
        for _, entry in self._scheduler.take(time.monotonic(), budget):
            entry.attempts += 1
            self._pool.submit(entry.job, entry.host, entry.attempts)
        self._pool.flush()

    def _make_backend(self) -> FetchBackend:
        """The fetch backend ``--engine`` names; with the files writer and no CPU stage,
        it publishes each file itself (the pipeline's writer in-process, the same writer
        built again in a worker process)."""
        from fetchpool.outputs import make_writer

        publishes = self._publish_in_fetch
        setup = BackendSetup(
            self.options.fetch,
            self.out / ".fetchpool" / "tmp",
            self._fetched,
            fetcher=self._custom_fetcher,
            writer=self._writer if publishes else None,
            writer_factory=partial(make_writer, self.out, self.options.output)
            if publishes
            else None,
        )
        return build_backend(setup)

    def _fetched(self, done: Done[Record]) -> None:
        self._events.put(("fetched", (done,)))

    def _published(self, done: Done[Record]) -> None:
        if done.value is not None:
            self._events.put(("published", done.value))

    def _on_fetched(self, done: Done[Record]) -> None:
        record = done.value
        entry = self._open.get(record.url) if record is not None else None
        if record is None or entry is None:  # _fetch_one never raises; defensive only
            return
        self._report.busy += max(0.0, done.task.end - done.task.start)
        now = time.monotonic()
        self._scheduler.release(entry.host, now)
        if record.moved_to is not None:
            self._move(entry, record)
            return
        record.attempts = entry.attempts
        if record.error_code is ErrorCode.DISK_FULL:
            self._fatal(record, record.error_message or "disk full")
            return
        if record.error_code is ErrorCode.CANCELLED or (
            self._stop.is_set() and record.error_code is ErrorCode.INTERNAL_ERROR
        ):
            # Cut short by the stop (or its worker process gone while stopping): an
            # interrupted item is not a failed one; the next run fetches it.
            self._drop(record)
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

    def _move(self, entry: _Open, record: Record) -> None:
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

    def _retry_or_finish(self, entry: _Open, record: Record, now: float) -> None:
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
        if record.error_code is ErrorCode.DISK_FULL:
            self._fatal(record, record.error_message or "disk full")
            return
        if record.error_code is ErrorCode.CANCELLED or (
            self._stop.is_set() and record.error_code is ErrorCode.PROCESS_FAILED
        ):
            # The CPU stage was cancelled, or its workers went down with the stop.
            self._drop(record)
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
            self._park(record)
        for done in durable:
            self._finish_open(done, durable=True)

    def _park(self, record: Record) -> None:
        """The writer holds this item until its shard is closed: it leaves the window now.

        Otherwise a shard larger than the window would stall the run waiting for itself.
        """
        entry = self._open.get(record.url)
        if entry is None or entry.parked:
            return
        entry.parked = True
        self._open_items -= 1
        for waiter in entry.waiters:
            self._open_items -= 1
            self._finish(_duplicate(waiter, entry.job, Status.OK))
        entry.waiters.clear()

    def _finish_open(self, record: Record, *, durable: bool = False) -> None:
        """``record`` is final for its open item (``durable``: the writer just published it,
        with its shard)."""
        entry = self._open.get(record.url)
        if entry is not None and entry.job.position == record.position:
            del self._open[record.url]
        else:  # a failure held with a shard: its item left the window when it failed
            entry = None
        record.temp_path = None
        self._finish(record, durable=durable)
        if entry is None or entry.parked:
            return
        self._open_items -= 1
        for waiter in entry.waiters:
            self._open_items -= 1
            self._finish(_duplicate(waiter, entry.job, record.status, record.path))

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
            self._stop_run("disk_full", str(exc))
        self._report.add(record)
        self._observers.on_event(ItemFinished(record))

    def _hold(self, record: Record) -> None:
        try:
            published = self._writer.write(record)
        except DiskFullError as exc:
            self._stop_run("disk_full", str(exc))
            self._report.unfinished += 1
            return
        except OutputError as exc:  # the shard it would have closed is lost
            self._stop_run("output_error", str(exc))
            self._report.unfinished += 1
            return
        for done in published:
            self._finish_open(done, durable=True)

    def _stop_run(self, kind: str, reason: str) -> None:
        """A run-level failure: remember the first one and stop (exit code 2)."""
        if self._report.fatal is None:
            self._report.fatal = reason
            self._report.fatal_kind = kind
        self.stop()

    def _fatal(self, record: Record, reason: str) -> None:
        """A run-level failure (disk full): stop. The item that met it is neither journaled
        nor counted as failed, since it did nothing wrong: it is unfinished, and the next run,
        with space freed, fetches it like any other."""
        self._stop_run("disk_full", reason)
        self._drop(record)

    def _drop(self, record: Record) -> None:
        """Forget an open item without journaling it (and the duplicates waiting on it): it
        is unfinished, and the next run fetches it."""
        entry = self._open.pop(record.url, None)
        fsutil.discard(record.temp_path)
        if entry is None:
            return
        self._report.unfinished += 1 + len(entry.waiters)
        if not entry.parked:
            self._open_items -= 1 + len(entry.waiters)

    # -- stages ------------------------------------------------------------------------------

    def _make_writer(self) -> Writer:
        from fetchpool.outputs import make_writer

        return make_writer(
            self.out, self.options.output, ledger=self._journal, digests=self.options.fetch.digests
        )

    def _make_image_stage(self) -> Any:
        if not self.options.image.active:
            return None
        from fetchpool.process import ImageStage

        def done(record: Record) -> None:
            self._events.put(("processed", record))

        return ImageStage(self.options.image, self.out / ".fetchpool" / "tmp", done)

    def _shutdown(self, *, cancel: bool) -> None:
        """Stop the stages in data-flow order, journaling what finished.

        Cancelling, stages drop their queued and running work (a hurried stop does not even
        wait for the fetch threads: the CLI leaves right after). Whatever was admitted and
        is not journaled in the end is counted unfinished: the next run fetches it.
        """
        self._cancelling = cancel
        try:
            self._pool.shutdown(cancel=cancel, wait=not self._hurry.is_set())
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
                self._stop_run("disk_full", str(exc))
            except OutputError as exc:  # the last shard is lost; its items are unfinished
                self._stop_run("output_error", str(exc))
        finally:
            # Started and abandoned (a hurried stop, a lost last shard); items read but
            # never dispatched were not under way and are simply read again next time.
            self._report.unfinished += sum(
                1 + len(entry.waiters)
                for entry in self._open.values()
                if entry.parked or entry.attempts > 0
            )

    def _drain_events(self) -> None:
        """Handle every result already queued: even when cancelling, what is finished gets
        its journal row (only waiting for more is skipped)."""
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(kind, payload)


def _describe(source: Source) -> tuple[str | None, int | None]:
    """The input's name and size for the journal's ``runs`` table, when it has them."""
    if isinstance(source, str | os.PathLike):
        if str(source) == "-":
            return "<stdin>", None
        path = Path(source)
        try:
            return str(path.resolve()), path.stat().st_size
        except OSError:
            return str(path), None
    return None, None


def _duplicate(job: Job, first: Job | Record, status: Status, path: str | None = None) -> Record:
    """The record of a later copy of a URL: skipped, pointing at the first copy's output."""
    record = Record.for_job(job)
    record.status = Status.SKIPPED
    record.error_code = ErrorCode.DUPLICATE
    record.error_message = f"same URL as item {first.position} ({status})"
    record.path = path
    return record


def download(
    source: Source,
    out: str | os.PathLike[str],
    *,
    observers: Iterable[Observer] = (),
    fetcher: FetcherFactory | None = None,
    **options: Any,
) -> Report:
    """Download every URL of ``source`` into the folder ``out``; return what happened.

    ``source`` is a path to a txt/csv/tsv/jsonl/parquet file, ``"-"`` for stdin, or an iterable
    of URLs or records. Options are the flat names of :class:`fetchpool.config.Options` and its
    stage configs (``threads=64``, ``per_host=16``, ``resize=256``, ``format="webdataset"``...).
    Re-running with the same ``out`` resumes: finished items are not fetched again.
    ``fetcher`` replaces the HTTP client (e.g. ``lambda tmp: MockFetcher(handler, tmp)``);
    with ``engine="processes"`` it is called in each worker process, so it must pickle (a
    module-level function, or ``functools.partial`` of one).
    ``cluster`` (a ``distributed.Client``, ``"tcp://host:8786"`` or ``"local:N"``) spreads the
    run over Dask workers, the input cut into ``parts`` (docs/distributed.md); ``out`` (and
    ``source``) may then be an fsspec URL such as ``s3://bucket/ds``, with ``storage_options``.
    """
    cluster, parts = options.pop("cluster", None), options.pop("parts", None)
    opts = options.pop("options", None) or Options.from_kwargs(**options)
    check_engine(opts.fetch)
    if cluster is not None:
        from fetchpool.cluster import download_on_cluster

        return download_on_cluster(source, out, opts, cluster=cluster, parts=parts)
    if is_remote(out) or is_remote(source):
        raise ConfigError(
            f"{out if is_remote(out) else source}: a URL as destination or input needs "
            "--cluster (e.g. --cluster local:2 on this machine); see docs/distributed.md"
        )
    pipeline = Pipeline(Path(out), opts, fetcher=fetcher, observers=observers)
    return pipeline.run(source)
