"""What every fetch backend does around one attempt: fetch, then publish through the writer.

A backend runs :func:`fetch_and_publish` wherever its attempts run (a fetch thread, a thread of
a worker process); :class:`PublishGate` is how an in-process backend keeps a hurried stop from
naming a file the run loop will never hear of. :func:`http_fetcher` is the default fetcher
factory, a module-level function so that ``functools.partial`` of it pickles to a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path

from fetchpool import fsutil
from fetchpool.config import FetchConfig
from fetchpool.engine.backends import BackendSetup, FetcherFactory
from fetchpool.errors import DiskFullError, FetchpoolError
from fetchpool.models import ErrorCode, Job, Record, Status
from fetchpool.stages import Fetcher, Writer

log = logging.getLogger("fetchpool")


def http_fetcher(config: FetchConfig, tmp_dir: Path, *, sync_temp: bool = False) -> Fetcher:
    """The HTTP client of a run (or of one worker process, with its share of the threads):
    redirects to another host come back to the run loop, which queues them under that host."""
    from fetchpool.fetch import AddressGuard, HttpFetcher

    guard = AddressGuard(
        allow_private_networks=config.allow_private_networks, allow_cidrs=config.allow_cidrs
    )
    return HttpFetcher(config, tmp_dir, guard=guard, sync_temp=sync_temp, hand_back_redirects=True)


def fetcher_factory(setup: BackendSetup, config: FetchConfig) -> FetcherFactory:
    """The caller's fetcher factory, or the HTTP client's for ``config`` (a backend's share
    of the run's fetch configuration), fsyncing bodies as written when fetches publish."""
    if setup.fetcher is not None:
        return setup.fetcher
    return partial(http_fetcher, config, sync_temp=setup.publishes)


def fetch_and_publish(
    fetcher: Fetcher,
    writer: Writer | None,
    job: Job,
    gate: PublishGate | None = None,
    attempt: int = 1,
) -> Record:
    """Attempt number ``attempt`` at ``job``, published by ``writer`` when given and ok
    (through ``gate`` when given). Never raises."""
    try:
        record = fetcher.fetch(job)
    except FetchpoolError as exc:
        return Record.for_job(job).fail(_local_error_code(exc), str(exc))
    except Exception as exc:  # a bug must cost one item, never the run
        log.exception("internal error fetching item %d", job.position)
        return Record.for_job(job).fail(ErrorCode.INTERNAL_ERROR, repr(exc))
    record.attempts = attempt  # before publishing: a sidecar carries it too
    if writer is not None and record.status is Status.OK:
        return gate.publish(writer, record) if gate is not None else publish(writer, record)
    return record


def publish(writer: Writer, record: Record) -> Record:
    """Give a finished record its final name through a concurrent writer. Never raises: a
    full disk comes back as DISK_FULL (the run loop then stops the run)."""
    try:
        (record,) = writer.write(record)
    except FetchpoolError as exc:
        record.fail(_local_error_code(exc), str(exc))
    except Exception as exc:  # a bug must cost one item, never the run
        log.exception("internal error publishing item %d", record.position)
        record.fail(ErrorCode.INTERNAL_ERROR, repr(exc))
    return record


class PublishGate:
    """Lets fetch threads publish until :meth:`close`; after it, none does.

    A hurried stop closes it before the journal's last commit. A record counts as under way
    from the moment its thread enters the gate until the run loop has its result
    (:meth:`delivered`), so once :meth:`close` returns, every file that got its final name
    is in the run loop's queue and reaches the journal: the journal is never left behind the
    files on disk. Costs two uncontended lock round trips per item.
    """

    #: Seconds :meth:`close` waits for results under way (each is a link and a queue put).
    CLOSE_TIMEOUT = 10.0

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._under_way: set[int] = set()  # id() of records entered and not yet delivered
        self._closed = False

    def publish(self, writer: Writer, record: Record) -> Record:
        """:func:`publish`, or, once closed, the record cancelled and its temp file removed."""
        with self._cond:
            if self._closed:
                return _cancelled(record)
            self._under_way.add(id(record))
        try:
            return publish(writer, record)
        except BaseException:
            self.delivered(record)
            raise

    def delivered(self, record: Record | None) -> None:
        """The run loop has ``record`` (from :meth:`publish`) in its queue."""
        if record is None:
            return
        with self._cond:
            self._under_way.discard(id(record))
            if not self._under_way:
                self._cond.notify_all()

    def close(self) -> None:
        """Let no more publications start; wait until the ones under way are delivered."""
        deadline = time.monotonic() + self.CLOSE_TIMEOUT
        with self._cond:
            self._closed = True
            while self._under_way and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)


def _cancelled(record: Record) -> Record:
    fsutil.discard(record.temp_path)
    return record.cancel("the run was stopped before this item was published")


def _local_error_code(exc: FetchpoolError) -> ErrorCode:
    return ErrorCode.DISK_FULL if isinstance(exc, DiskFullError) else ErrorCode.IO_ERROR
