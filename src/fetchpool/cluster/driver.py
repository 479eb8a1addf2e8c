"""The driver of a cluster run: plan the parts, run them as Dask tasks, sum their reports.

::

    input ──one streaming pass──▶ DEST/.fetchpool/parts/part-K.jsonl.gz   (plan.split)
                                        │ a Dask task per part not done yet, a bounded window
                                        ▼
       worker: run_part(K) = an ordinary run into DEST/part-K, or on local scratch and then
               published whole (object storage); writes part-K.done last   (part.py)
                                        │ progress events ─▶ the driver's one progress bar
                                        ▼ Report
              driver: reports summed into one Report for DEST

Every ``get`` option means what it means on one machine, per part, with one exception:
``--per-host`` is a limit for the whole run, so it is shared out among the parts that run at
once (each gets ``ceil(per_host / workers)``). ``--threads`` is per part. A worker killed
mid-part makes Dask run the part again elsewhere, resuming from its journal; a part that keeps
failing ends the run with an error naming the part. Ctrl-C (a KeyboardInterrupt here) asks every
running part to stop, which saves its state, and leaves the rest for the next run.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from fetchpool.cluster import plan as plans
from fetchpool.cluster.part import report_of_done, run_part
from fetchpool.config import Options
from fetchpool.engine.pipeline import Source
from fetchpool.errors import ConfigError
from fetchpool.models import Report
from fetchpool.state.exported import iter_cluster_records
from fetchpool.state.paths import DB_NAME, STATE_DIR
from fetchpool.storage import Store

_INSTALL_HINT = "cluster runs need dask.distributed: pip install 'fetchpool[dask]'"
#: Parts when --parts is not given: several per worker, so a slow part does not leave the
#: others idle at the end, few enough that each part's journal stays worth having.
PARTS_PER_WORKER = 4


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(_INSTALL_HINT) from exc
    return distributed


@contextmanager
def connect(cluster: Any) -> Iterator[Any]:
    """A Dask client for ``cluster``: a Client as it is, ``tcp://host:port`` (a scheduler),
    or ``local`` / ``local:N`` (a LocalCluster of N worker processes, stopped at the end)."""
    distributed = _distributed()
    if isinstance(cluster, distributed.Client):
        yield cluster
        return
    address = str(cluster)
    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2]
        if count and not count.isdigit():
            raise ConfigError(f"--cluster {address}: expected local or local:N")
        workers = int(count) if count else max(1, os.cpu_count() or 1)
        import dask

        # Workers start fetchpool's own processes; lifeline ties them to the worker.
        with dask.config.set({"distributed.worker.daemon": False}):
            local = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        try:
            with distributed.Client(local) as client:
                yield client
        finally:
            local.close()
        return
    try:
        client = distributed.Client(address, timeout=30)
    except OSError as exc:
        raise ConfigError(f"--cluster {address}: cannot reach the scheduler ({exc})") from exc
    with client:
        yield client


def download_on_cluster(
    source: Source,
    dest: str | os.PathLike[str],
    options: Options,
    *,
    cluster: Any,
    parts: int | None = None,
    stop_requested: threading.Event | None = None,
    quiet: bool = True,
    progress: ClusterProgress | None = None,
) -> Report:
    """Run ``source`` into ``dest`` as parts on ``cluster`` (see the module docstring).

    ``dest`` and ``source`` may be local paths or fsspec URLs (``s3://bucket/ds``; options in
    ``options.storage_options``). ``stop_requested``, when set (from a signal handler, another
    thread), stops the run as Ctrl-C does. ``quiet=False`` prints the Dask dashboard's address
    when there is one. ``progress`` is told the whole run's progress as the parts report it.
    """
    from fetchpool.inputs import check_input, read_input

    if not isinstance(source, str | os.PathLike) or str(source) == "-":
        raise ConfigError("--cluster needs an input file (not stdin or an iterable)")
    if options.shard is not None:
        raise ConfigError("--cluster and --shard do not go together: the cluster makes parts")
    storage_options = options.storage_options
    check_input(
        source,
        format=options.input_format,
        url_column=options.url_column,
        storage_options=storage_options,
        caption_column=options.output.caption_column,
        required=options.required_columns,
    )
    store = Store(dest, storage_options)
    if not store.remote and (store.path / STATE_DIR / DB_NAME).exists():
        raise ConfigError(
            f"{dest} holds a run made without --cluster; write the cluster run elsewhere"
        )
    started = time.perf_counter()
    with connect(cluster) as client:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        name, size, digest = plans.fingerprint(source, storage_options)
        wanted = plans.Plan(name, size, digest, parts or PARTS_PER_WORKER * workers)
        found = plans.load(store)
        if found is not None:
            plans.check_matches(found, replace(wanted, parts=parts or found.parts), store)
            plan = found
        else:
            store.mkdir()
            items = read_input(
                source,
                format=options.input_format,
                url_column=options.url_column,
                storage_options=storage_options,
            )
            plan = plans.split(items, store, wanted)
        if not quiet and getattr(client, "dashboard_link", None):
            print(f"fetchpool: Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        report = _run_parts(
            client,
            store,
            plan,
            _per_task(options, workers),
            workers=workers,
            stop_requested=stop_requested,
            progress=progress,
        )
    report.wall = time.perf_counter() - started
    report.store = store
    return report


def _per_task(options: Options, workers: int) -> Options:
    """--per-host is for the whole run: shared out among the parts running at once."""
    fetch = options.fetch
    share = max(1, math.ceil(fetch.per_host / workers))
    return replace(options, fetch=replace(fetch, per_host=share))


#: Seconds between looks at the parts in flight (and at a stop request).
POLL_SECONDS = 0.2
#: After a stop, how long the driver waits for the running parts to save their state.
STOP_GRACE_SECONDS = 120.0


def _run_parts(
    client: Any,
    store: Store,
    plan: plans.Plan,
    options: Options,
    *,
    workers: int,
    stop_requested: threading.Event | None,
    progress: ClusterProgress | None,
) -> Report:
    """Run the parts not done yet, at most ``2 * workers`` submitted at once, and sum them.

    The driver polls its futures instead of blocking in Dask's waits, so a stop (the CLI's
    signal handler sets ``stop_requested``; a library caller's Ctrl-C is a KeyboardInterrupt)
    is seen at once: no part is submitted any more, the running ones are told through a Dask
    Event (they stop and save, as a stopped run does), and the driver collects their reports.
    """
    runner = _Parts(client, store, options, window=2 * workers, progress=progress)
    for index in range(plan.parts):
        done = plans.read_done(store, index)
        if done is not None and not (options.retry_failed and done.get("failed")):
            _add(runner.total, report_of_done(done, runner.total.out))
            if progress is not None:
                progress.part(index, int(done.get("items", 0)), int(done.get("failed", 0)), 0)
        else:
            runner.todo.append(index)
    if progress is not None:
        progress.start(plan.items)
    try:
        while runner.todo or runner.running:
            try:
                if stop_requested is not None and stop_requested.is_set():
                    runner.stop()
                if not runner.step():
                    break
            except KeyboardInterrupt:
                runner.stop()
    finally:
        runner.unsubscribe()
        if progress is not None:
            progress.stop()
    return runner.finish()


class Totals(Protocol):
    """What shows a run's totals: the CLI's progress bar (report.progress.ProgressBar)."""

    def start(self, total: int | None) -> None: ...
    def show(self, done: int, failed: int, fetched: int) -> None: ...
    def stop(self) -> None: ...


class ClusterProgress:
    """The whole run's progress, summed over its parts, shown by ``totals``.

    Parts send ``[part, items, failed, bytes]`` every half second (their counts so far, items
    resumed from their journal included); a part finished earlier counts whole from the
    start. Dask calls :meth:`on_dask_event` on its client's thread, hence the lock.
    """

    def __init__(self, totals: Totals) -> None:
        self._totals = totals
        self._lock = threading.Lock()
        self._parts: dict[int, tuple[int, int, int]] = {}
        self._running = False

    def start(self, total: int | None) -> None:
        with self._lock:
            self._totals.start(total)
            self._running = True
            self._show()

    def part(self, index: int, items: int, failed: int, fetched: int) -> None:
        with self._lock:
            self._parts[index] = (items, failed, fetched)
            if self._running:
                self._show()

    def on_dask_event(self, event: tuple[float, Any]) -> None:
        index, items, failed, fetched = event[1]
        self.part(int(index), int(items), int(failed), int(fetched))

    def _show(self) -> None:
        counts = list(self._parts.values())
        self._totals.show(
            sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts)
        )

    def stop(self) -> None:
        with self._lock:
            if self._running:
                self._running = False
                self._totals.stop()


class _Parts:
    """The parts of one driver run: waiting, running (futures), and what they reported."""

    def __init__(
        self,
        client: Any,
        store: Store,
        options: Options,
        *,
        window: int,
        progress: ClusterProgress | None,
    ) -> None:
        self.distributed = _distributed()
        self.client = client
        self.store = store
        self.options = options
        self.window = window
        self.progress = progress
        self.total = Report(
            out=Path() if store.remote else store.path,
            store=store,
            source=partial(iter_cluster_records, store),
        )
        self.todo: list[int] = []
        self.running: dict[Any, int] = {}
        self.failures: list[str] = []
        token = uuid.uuid4().hex
        self.event = f"fetchpool-stop-{token}"
        self.topic = f"fetchpool-progress-{token}" if progress is not None else None
        if progress is not None:
            client.subscribe_topic(self.topic, progress.on_dask_event)

    def unsubscribe(self) -> None:
        if self.topic is not None:
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(self.topic)

    def step(self) -> bool:
        """Submit what the window allows, collect what finished; False to give up waiting
        (stopped, and the grace period is over: the next run resumes the rest)."""
        while self.todo and len(self.running) < self.window and self.stopping_since is None:
            index = self.todo.pop(0)
            key = f"fetchpool-part-{index}-{self.event}"
            future = self.client.submit(
                run_part, self.store.url, index, self.options, self.event, self.topic, key=key
            )
            self.running[future] = index
        finished = [future for future in self.running if future.done()]
        for future in finished:
            index = self.running.pop(future)
            failure = _collect(self.total, index, future, self.distributed, self.progress)
            if failure is not None:
                self.failures.append(failure)
        if not finished:
            since = self.stopping_since
            if since is not None and time.monotonic() - since > STOP_GRACE_SECONDS:
                return False
            time.sleep(POLL_SECONDS)
        return True

    stopping_since: float | None = None

    def stop(self) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
            self.total.interrupted = True
            self.todo.clear()
            self.distributed.Event(self.event, client=self.client).set()  # parts stop

    def finish(self) -> Report:
        for future in self.running:
            future.cancel()
        if self.stopping_since is None:
            # Every part has ended, but their watchers may still be waiting on the Event at
            # the scheduler (a wait the scheduler logs as an error when it closes): release
            # them, then clear it, so a long-lived scheduler forgets it once they are gone.
            with contextlib.suppress(Exception):
                event = self.distributed.Event(self.event, client=self.client)
                event.set()
                event.clear()
        if self.failures:
            self.total.fatal = "; ".join(self.failures)
            self.total.fatal_kind = "part_failed"
        return self.total


def _collect(
    total: Report, index: int, future: Any, distributed: Any, progress: ClusterProgress | None
) -> str | None:
    """Add a finished part's report. Its failure, said with the part's name, or None."""
    try:
        part = future.result()
    except distributed.KilledWorker as exc:
        return f"part {index}: its worker died every time it ran it ({exc})"
    except Exception as exc:  # noqa: BLE001 - a part's failure is reported by name
        return f"part {index}: {type(exc).__name__}: {exc}"
    _add(total, part)
    if progress is not None:
        progress.part(index, part.items, part.failed, part.bytes)
    if part.fatal:
        return f"part {index}: {part.fatal_kind or 'error'}: {part.fatal}"
    return None


def _add(total: Report, part: Report) -> None:
    """Sum one part's report into the run's."""
    for status, n in part.counts.items():
        total.counts[status] = total.counts.get(status, 0) + n
    for code, n in part.errors.items():
        total.errors[code] = total.errors.get(code, 0) + n
    for code, details in part.breakdown.items():
        mine = total.breakdown.setdefault(code, {})
        for detail, n in details.items():
            mine[detail] = mine.get(detail, 0) + n
    for code, n in part.resumed_errors.items():
        total.resumed_errors[code] = total.resumed_errors.get(code, 0) + n
    total.bytes += part.bytes
    total.busy += part.busy
    total.items += part.items
    total.resumed += part.resumed
    total.resumed_failed += part.resumed_failed
    total.unfinished += part.unfinished
    total.interrupted = total.interrupted or part.interrupted
