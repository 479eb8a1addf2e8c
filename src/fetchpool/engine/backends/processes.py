"""The ``processes`` engine: fetches in worker processes, each with its own threads (and GIL).

::

    run loop ──[(task id, Job), ...]──▶ pipe ──▶ worker process k: reader ─▶ ThreadPoolExecutor
                                                  fetch_and_publish(job): fetch, then link the file
    run loop ◀── on_done(Done) ◀── reader thread ◀── pipe ◀──[(task id, Record, times), ...]──┘

Messages are lists, in both directions. The run loop sends each worker one message per
dispatch round (``flush``); in a worker, the thread that finishes a fetch while no other is
sending sends everything finished so far, so results travel alone when the run is quiet and
in batches when it is busy, without waiting for a batch to fill. Every message costs a pickle,
a write and two reads, each a GIL hand-off in both processes; at 100,000 small files per run
that was the cost of a second process.

A fetch is mostly waiting, but each request still costs a few hundred microseconds of Python;
with many threads in one process they queue for one GIL, so a throughput-bound run uses one
core while the other idles. Measured on 2 cores, 2,000 loopback files at concurrency 16: one
process 1.8 s, two processes of 8 threads 0.9 s. Workers only fetch (and, for the files
writer, publish); scheduling, retries and the journal stay in the run loop, which sends each
worker at most its own share of the in-flight budget.

A worker builds its fetcher and writer by calling the factories of its :class:`WorkerSpec`
(picklable: module-level functions or ``functools.partial`` of them), so any fetcher and
writer the run was given travel to it.

Workers are started with ``spawn`` (the parent has threads), ignore SIGINT and SIGTERM (the
parent decides how a run stops: a signal to the process group must not turn their items into
failures) and exit at once when their pipe closes or their parent is gone
(:mod:`fetchpool.lifeline`), so a parent killed with SIGKILL leaves none behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetchpool.config import FetchConfig
from fetchpool.engine.backends import BackendSetup, FetcherFactory, WriterFactory
from fetchpool.engine.backends.shared import fetch_and_publish, fetcher_factory
from fetchpool.engine.runner import Done
from fetchpool.errors import ConfigError
from fetchpool.models import ErrorCode, Job, Record, TaskRecord

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


def build(setup: BackendSetup) -> ProcessFetchPool:
    """``--fetch-processes`` workers sharing ``--threads`` out; each builds its fetcher (and
    the files writer, when fetches publish) from picklable factories."""
    fetch = setup.fetch
    processes = fetch.fetch_processes
    # Each worker's share of the threads; ceil, so the budget is never smaller.
    share = replace(fetch, threads=-(-fetch.threads // processes), fetch_processes=1)
    spec = WorkerSpec(
        share,
        str(setup.tmp_dir),
        fetcher=fetcher_factory(setup, share),
        writer=setup.writer_factory if setup.publishes else None,
    )
    return ProcessFetchPool(spec, processes, setup.on_done)


def check_fetcher(factory: FetcherFactory) -> None:
    """Refuse, in the CLI's words, a fetcher factory that cannot travel to a worker process."""
    try:
        pickle.dumps(factory)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigError(
            "--engine processes builds each worker's fetcher in that worker, and the fetcher "
            f"factory given (download(fetcher=...)) cannot be pickled: {exc}. Give a "
            "module-level function or a functools.partial of one, or use --engine threads"
        ) from exc


#: A worker's startup error is cut to this many characters in each item's message.
_MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class _StartupFailed:
    """A worker's only message when it could not build its fetcher or writer: why."""

    reason: str


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a fetch worker process builds its fetcher (and files writer) from."""

    fetch: FetchConfig  # this worker's share: ``threads`` is its own thread count
    tmp_dir: str
    fetcher: FetcherFactory  # called with the temp folder, in the worker
    writer: WriterFactory | None = None  # set when the worker links finished files itself


def _worker_main(conn: Connection, spec: WorkerSpec, parent_pid: int) -> None:
    """A fetch worker: fetch jobs from ``conn`` on ``spec.fetch.threads`` threads."""
    from fetchpool.lifeline import follow_parent

    follow_parent(parent_pid)
    from fetchpool.heap import keep_heap_trimmed

    keep_heap_trimmed()
    try:
        fetcher = spec.fetcher(Path(spec.tmp_dir))
        writer = spec.writer() if spec.writer is not None else None
    except Exception as exc:  # noqa: BLE001 - the caller's factory: its error is the message
        with contextlib.suppress(OSError):
            conn.send(_StartupFailed(f"{type(exc).__name__}: {exc}"[:_MESSAGE_LIMIT]))
        os._exit(1)
    outbox = _Outbox(conn)
    pid = f"pid-{os.getpid()}"

    def work(task_id: int, job: Job, attempt: int) -> None:
        start = time.time()
        record = fetch_and_publish(fetcher, writer, job, attempt=attempt)
        thread = threading.current_thread().name
        outbox.put((task_id, record, TaskRecord(task_id, start, time.time(), pid, thread)))

    with ThreadPoolExecutor(spec.fetch.threads, thread_name_prefix="fetch") as executor:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                # The parent is gone (or gave up on us): nobody will hear the results, and a
                # next run may already own the folder. Leave now, mid-fetch.
                os._exit(1)
            if message is None:  # the parent's shutdown: finish what is in flight
                break
            for task_id, job, attempt in message:
                executor.submit(work, task_id, job, attempt)
    fetcher.close()


class _Outbox:
    """Results on their way to the parent, sent in batches by whichever thread is free.

    ``put`` appends; if no thread is sending, the caller sends everything queued (and what
    arrives meanwhile) before it returns, so nothing waits for a timer or for a batch to fill.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._items: list[tuple[int, Record, TaskRecord]] = []
        self._sending = False

    def put(self, item: tuple[int, Record, TaskRecord]) -> None:
        with self._lock:
            self._items.append(item)
            if self._sending:
                return  # the sending thread takes it along
            self._sending = True
        try:
            while True:
                with self._lock:
                    batch, self._items = self._items, []
                    if not batch:
                        return
                with contextlib.suppress(OSError):  # the parent is gone: nothing to tell
                    self._conn.send(batch)  # one sender at a time: the one that set _sending
        finally:
            with self._lock:
                self._sending = False


class _Worker:
    def __init__(self, context: Any, spec: WorkerSpec, index: int) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main,
            args=(child, spec, os.getpid()),
            name=f"fetchpool-fetch-{index}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.in_flight: dict[int, tuple[Job, str]] = {}
        self.outbox: list[tuple[int, Job, int]] = []  # submitted, sent at the next flush
        self.send_lock = threading.Lock()
        self.alive = True
        #: Why the process could not start (its factories raised), once it said so.
        self.startup_failure: str | None = None


class ProcessFetchPool:
    """:class:`~fetchpool.engine.backends.FetchBackend` over ``processes`` worker processes
    built from ``spec``; results reach ``on_done`` from reader threads, as
    :class:`~fetchpool.engine.runner.TaskPool` delivers them."""

    def __init__(
        self,
        spec: WorkerSpec,
        processes: int,
        on_done: Callable[[Done[Record]], None],
    ) -> None:
        import multiprocessing  # only when worker processes are asked for

        context = multiprocessing.get_context("spawn")
        self._on_done = on_done
        self._lock = threading.Lock()
        self._next_id = 0
        self._workers = [_Worker(context, spec, i) for i in range(processes)]
        self._readers = [
            threading.Thread(target=self._read, args=(w,), name=f"fetch-reader-{i}", daemon=True)
            for i, w in enumerate(self._workers)
        ]
        for reader in self._readers:
            reader.start()
        # Workers ignore SIGTERM, so multiprocessing's own exit hook (terminate, then join)
        # would wait for them forever if shutdown() never ran (an exception, a second
        # KeyboardInterrupt during it): kill them at interpreter exit instead.
        atexit.register(self._kill)

    def _kill(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                worker.process.kill()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(len(w.in_flight) for w in self._workers)

    def submit(self, job: Job, label: str = "", attempt: int = 1) -> int:
        """Queue ``job`` for the least busy worker; :meth:`flush` sends it."""
        with self._lock:
            task_id = self._next_id
            self._next_id += 1
            # The least busy live worker; with none left, the job fails (as _lost explains).
            live = [w for w in self._workers if w.alive] or self._workers
            worker = min(live, key=lambda w: len(w.in_flight))
            worker.in_flight[task_id] = (job, label)
            worker.outbox.append((task_id, job, attempt))
        return task_id

    def flush(self) -> None:
        """Send each worker the jobs submitted since the last flush, in one message; never
        blocks for long (pipes are buffered)."""
        rerouted = False
        for worker in self._workers:
            with self._lock:
                batch, worker.outbox = worker.outbox, []
            if not batch:
                continue
            try:
                with worker.send_lock:
                    worker.conn.send(batch)
            except OSError:
                rerouted = self._reroute(worker, batch) or rerouted
                continue
            if not worker.alive:  # died while we sent: its reader may already have swept
                for task_id, *_ in batch:
                    self._lost(worker, task_id)
        if rerouted:
            self.flush()

    def _reroute(self, worker: _Worker, batch: list[tuple[int, Job, int]]) -> bool:
        """``worker`` is gone before ``batch`` reached it: mark it dead at once (its reader
        may not have run yet, and a dead worker with nothing in flight looks the least busy,
        so every job dispatched meanwhile would go there and fail), and give the jobs, which
        never started, to a live worker. True when they were moved; with none alive, they
        fail."""
        with self._lock:
            worker.alive = False
            live = [w for w in self._workers if w.alive]
            for task_id, job, attempt in batch if live else ():
                entry = worker.in_flight.pop(task_id, None)
                if entry is not None:
                    target = min(live, key=lambda w: len(w.in_flight))
                    target.in_flight[task_id] = entry
                    target.outbox.append((task_id, job, attempt))
        if not live:
            for task_id, *_ in batch:
                self._lost(worker, task_id)
        return bool(live)

    def shutdown(self, *, cancel: bool = False, wait: bool = True) -> None:
        """Stop the workers: after their in-flight jobs are delivered, or at once (cancel;
        a killed worker cannot be waited for, so ``wait`` changes nothing)."""
        atexit.unregister(self._kill)
        for worker in self._workers:
            with worker.send_lock, contextlib.suppress(OSError):
                worker.conn.send(None)
        if cancel:  # SIGKILL: workers ignore SIGTERM (see the module docstring)
            for worker in self._workers:
                worker.process.kill()
        for reader in self._readers:
            reader.join()
        for worker in self._workers:
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def _read(self, worker: _Worker) -> None:
        while True:
            try:
                batch = worker.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(batch, _StartupFailed):
                worker.startup_failure = batch.reason
                continue
            for task_id, record, task in batch:
                with self._lock:
                    _job, label = worker.in_flight.pop(task_id)
                self._on_done(Done(task_id, label, record, None, task))
        # The pipe ends as the process exits: wait a moment for its exit code, which the
        # message of each lost item gives (else it reads "exited (None)").
        worker.process.join(_REAP_SECONDS)
        with self._lock:
            worker.alive = False
            lost = list(worker.in_flight)
        for task_id in lost:
            self._lost(worker, task_id)

    def _lost(self, worker: _Worker, task_id: int) -> None:
        """A worker died with this job in flight: the job fails, the run goes on."""
        with self._lock:
            entry = worker.in_flight.pop(task_id, None)
        if entry is None:
            return
        job, label = entry
        record = Record.for_job(job).fail(ErrorCode.INTERNAL_ERROR, _gone(worker))
        now = time.time()
        self._on_done(Done(task_id, label, record, None, TaskRecord(task_id, now, now, "", "")))


#: Seconds a reader waits for a worker whose pipe ended to be reaped (its exit code).
_REAP_SECONDS = 1.0


def _gone(worker: _Worker) -> str:
    """Why ``worker`` took its items with it: the error its factories raised, or how it
    ended (a negative exit code is the signal that killed it)."""
    name = worker.process.name
    if worker.startup_failure is not None:
        return f"fetch worker process {name} could not start: {worker.startup_failure}"
    code = worker.process.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"fetch worker process {name} was killed by {signal.Signals(-code).name}"
    return f"fetch worker process {name} exited ({code})"
