"""The ``multiplexed`` engine: one selector loop thread drives every fetch of the run.

::

    run loop ──submit(job)──▶ MultiplexFetcher (fetch/multiplex.py): one loop thread, many
                              non-blocking connections; resolver threads for DNS; a proxy
                              lane with the blocking driver for requests through a proxy
                                  │ failed: on_done from the loop
                                  │ ok: a finisher thread fsyncs and closes the body, then
                                  ▼     links it through the PublishGate (files writer)
                              on_done(Done) ──▶ the run loop

No thread per request: the ~9 blocking syscalls an item costs no longer hand the GIL among
``--threads`` threads, which is what bounds the threads engine on many small files
(docs/benchmarks.md). ``--threads`` is the number of attempts under way at once.

One loop in the run's process: ``--fetch-processes`` 2+ is refused with this engine for now
(the processes engine's worker runs a blocking fetcher on threads; a worker running a loop
would need its own fetch core). A custom fetcher factory (``download(fetcher=...)``) is a
blocking ``fetch(job)``, which a loop cannot multiplex: it runs on the threads engine, and
the log says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial

from fetchpool.engine.backends import BackendSetup, FetchBackend, FetcherFactory
from fetchpool.engine.backends.shared import PublishGate, publish
from fetchpool.engine.runner import Done
from fetchpool.models import Job, Record, Status, TaskRecord

log = logging.getLogger("fetchpool")


def build(setup: BackendSetup) -> FetchBackend:
    """The loop, or the threads engine for a custom fetcher factory (see the module doc)."""
    if setup.fetcher is not None:
        from fetchpool.engine.backends import threads

        log.warning(
            "--engine multiplexed: the fetcher given (download(fetcher=...)) blocks in "
            "fetch(job), which one loop cannot multiplex; it runs on --threads fetch threads"
        )
        return threads.build(setup)
    return MultiplexFetchPool(setup)


def check_fetcher(factory: FetcherFactory) -> None:
    """Any factory will do: it runs on fetch threads in this process (see :func:`build`)."""


class MultiplexFetchPool:
    """:class:`~fetchpool.engine.backends.FetchBackend` over one
    :class:`~fetchpool.fetch.multiplex.MultiplexFetcher`."""

    def __init__(self, setup: BackendSetup) -> None:
        from fetchpool.fetch.guard import AddressGuard
        from fetchpool.fetch.multiplex import MultiplexFetcher

        config = setup.fetch
        guard = AddressGuard(
            allow_private_networks=config.allow_private_networks, allow_cidrs=config.allow_cidrs
        )
        self._writer = setup.writer
        self._gate = PublishGate() if setup.writer is not None else None
        self._on_done = setup.on_done
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._next_id = 0
        self._worker = f"pid-{os.getpid()}"
        self._fetcher = MultiplexFetcher(
            config,
            setup.tmp_dir,
            guard=guard,
            sync_temp=setup.publishes,
            hand_back_redirects=True,
        )

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def submit(self, job: Job, label: str = "", attempt: int = 1) -> int:
        with self._cond:
            task_id = self._next_id
            self._next_id += 1
            self._in_flight += 1
        done = partial(self._done, task_id, label, attempt, time.time())
        self._fetcher.submit(job, done)
        return task_id

    def flush(self) -> None:
        """Nothing to do: the loop starts each job as it is submitted."""

    def shutdown(self, *, cancel: bool = False, wait: bool = True) -> None:
        """Wait for the attempts under way, or (``cancel``) publish nothing more and abandon
        them: the loop closes their connections and removes their temp files."""
        try:
            if cancel:
                if self._gate is not None:
                    self._gate.close()
            else:
                with self._cond:
                    while self._in_flight:
                        self._cond.wait()
        finally:
            self._fetcher.close(wait=wait or not cancel)

    def _done(self, task_id: int, label: str, attempt: int, start: float, record: Record) -> None:
        """A record from the fetcher (the loop, or a finisher thread for an ok one): publish
        it here, off the loop, then hand it to the run loop."""
        record.attempts = attempt  # before publishing: a sidecar carries it too
        writer, gate = self._writer, self._gate
        if writer is not None and record.status is Status.OK:
            record = gate.publish(writer, record) if gate is not None else publish(writer, record)
        thread = threading.current_thread().name
        task = TaskRecord(task_id, start, time.time(), self._worker, thread, label=label)
        with self._cond:
            self._in_flight -= 1
            if not self._in_flight:
                self._cond.notify_all()
        try:
            self._on_done(Done(task_id, label, record, None, task))
        finally:
            if gate is not None:
                gate.delivered(record)
