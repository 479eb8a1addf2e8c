"""The ``threads`` engine: fetch threads in the run's own process (the default).

::

    run loop ──submit(job)──▶ TaskPool(threads): fetch_and_publish(job) ──▶ on_done(Done)
                                  │ ok, files writer: link through the PublishGate
                                  ▼
                              the run's writer (shared: its folder fsyncs are the run's)

One thread per attempt in flight, ``--threads`` of them; each publishes its file itself when
fetches publish, so the link and its syscalls run in parallel, not in the run loop.
"""

from __future__ import annotations

from fetchpool.engine.backends import BackendSetup, FetcherFactory
from fetchpool.engine.backends.shared import PublishGate, fetch_and_publish, fetcher_factory
from fetchpool.engine.runner import Done, TaskPool
from fetchpool.models import Job, Record


def build(setup: BackendSetup) -> ThreadFetchPool:
    """``--threads`` fetch threads sharing one fetcher (and the run's writer)."""
    return ThreadFetchPool(setup)


def check_fetcher(factory: FetcherFactory) -> None:
    """Any factory will do: it is called in this process."""


class ThreadFetchPool:
    """:class:`~fetchpool.engine.backends.FetchBackend` over a pool of threads."""

    def __init__(self, setup: BackendSetup) -> None:
        self._fetcher = fetcher_factory(setup, setup.fetch)(setup.tmp_dir)
        self._writer = setup.writer
        self._gate = PublishGate() if setup.writer is not None else None
        self._on_done = setup.on_done
        self._pool: TaskPool[Record] = TaskPool(
            "threads", setup.fetch.threads, name="fetch", on_done=self._deliver
        )

    @property
    def in_flight(self) -> int:
        return self._pool.in_flight

    def submit(self, job: Job, label: str = "", attempt: int = 1) -> int:
        return self._pool.submit(self._attempt, job, attempt, label=label)

    def flush(self) -> None:
        """Nothing to do: a thread starts on its job when it is submitted."""

    def shutdown(self, *, cancel: bool = False, wait: bool = True) -> None:
        """Wait for the fetch threads; cancelling, publish nothing more first. With
        ``wait=False`` the threads end their attempts (bounded by the timeouts) unheard."""
        try:
            if cancel and self._gate is not None:
                self._gate.close()
            self._pool.shutdown(cancel=cancel, wait=wait or not cancel)
        finally:
            self._fetcher.close()

    def _attempt(self, job: Job, attempt: int) -> Record:
        return fetch_and_publish(self._fetcher, self._writer, job, self._gate, attempt)

    def _deliver(self, done: Done[Record]) -> None:
        """The result is with the run loop once ``on_done`` returns: only then does the gate
        stop counting it as under way."""
        self._on_done(done)
        if self._gate is not None:
            self._gate.delivered(done.value)
