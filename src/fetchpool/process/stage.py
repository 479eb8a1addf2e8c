"""The CPU stage: image work in a process pool that survives crashing and hanging workers.

::

    submit(record) ──▶ events ──▶ supervisor thread ──▶ ProcessPoolExecutor (spawn, N workers)
                         ▲             │  ▲                    │ _run_item → processor(...)
       future callbacks ─┘             │  └── start notices ◀──┘ (token, monotonic time)
                                       ▼
                             on_done(record)   (from the supervisor thread)

One supervisor thread owns all the state (backlog, running futures, the pool), so none of it
needs locks; submitters and the executor's callbacks talk to it through one queue. At most
``worker_count`` items are in the executor at once, so "in flight" means "running in a worker":
that is what makes per-item timeouts and blame after a crash exact.

Faults (RELIABILITY.md case 35) each cost one item ``process_failed``, never the run:

* **Crash** (segfault, abort, OOM kill) breaks the whole pool: every running future fails with
  ``BrokenProcessPool``. If one item was running, it is the culprit. If several were, none can
  be blamed yet: all become *suspects* and are re-run one at a time on a fresh pool; a suspect
  that breaks a pool while running alone fails, the innocent ones succeed.
* **Hang**: each worker posts a start notice, and an item running longer than
  ``item_timeout`` fails; its pool's processes are killed (the only way to stop a stuck C
  decoder) and the other running items, known innocent, are re-queued.
* **Out of memory** under ``memory_limit`` (``RLIMIT_AS``) is a ``MemoryError`` the processor
  turns into ``process_failed``; if the kernel kills the worker instead, it is a crash.

Why "spawn" and not "fork": the parent runs dozens of fetch threads; forking copies whatever
locks they hold at that instant (logging, urllib3 pools, malloc arenas) into a child where no
thread will ever release them. "forkserver" would also be safe, but its server is a
process-wide singleton whose preload list and ``sys.path`` are fixed at first use by whoever
starts it first; spawn costs ~0.3 s per worker, paid only at start and after a crash.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import count
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from fetchpool import fsutil
from fetchpool.config import ImageConfig
from fetchpool.lifeline import follow_parent
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.process.images import ImageResult, configure_pillow, process_image

log = logging.getLogger("fetchpool.process")

Processor = Callable[[str, str, ImageConfig], ImageResult]

#: Extra seconds an item may wait for its start notice before it is declared hung: covers a
#: worker process being spawned and importing Pillow on a loaded machine.
STARTUP_GRACE = 30.0
#: Seconds ``close`` waits for retired worker processes to exit before killing them.
REAP_TIMEOUT = 5.0

# -- worker side ------------------------------------------------------------------------------

_started: SimpleQueue[tuple[int, float]] | None = None


def _init_worker(
    max_pixels: int,
    memory_limit: int | None,
    started: SimpleQueue[tuple[int, float]],
    parent_pid: int,
) -> None:
    """Runs once in each worker: Pillow limits, address-space cap, signals left to the parent,
    and an exit when the parent is gone (:mod:`fetchpool.lifeline`), decoder noise off the
    terminal (libtiff prints its errors on fd 2, even with ``-q``)."""
    from fetchpool.process.images import quiet_native_stderr

    global _started  # noqa: PLW0603 - per-process state set by the pool initializer
    quiet_native_stderr()
    _started = started
    # Ctrl-C and SIGTERM reach the whole process group; the parent decides whether to finish
    # or cancel, and kills its workers itself when it must.
    follow_parent(parent_pid)
    configure_pillow(max_pixels)
    # process_image also does this per call; here it covers any processor the pool runs.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    if memory_limit is not None:
        _limit_address_space(memory_limit)


def _limit_address_space(limit: int) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _run_item(
    processor: Processor, token: int, src: str, dst: str, config: ImageConfig
) -> ImageResult:
    """Worker-side wrapper: post a start notice (for the hang timer), then run the processor."""
    if _started is not None:
        # CLOCK_MONOTONIC is system-wide on Linux and macOS: comparable with the parent's.
        _started.put((token, time.monotonic()))
    return processor(src, dst, config)


# -- parent side ------------------------------------------------------------------------------

#: Items queued per worker: one running and one waiting, so a worker starts its next image
#: the moment it finishes instead of idling for the round trip through this process (whose
#: threads it shares with dozens of fetch threads). Start notices keep timeouts exact: an item
#: that has not started yet is never blamed for a hang, and after a crash only the items that
#: had started are suspects.
PIPELINE_DEPTH = 2


@dataclass(slots=True, eq=False)
class _Item:
    record: Record
    suspect: bool = False  # was running when a pool broke with others; re-run alone
    token: int = 0
    submitted: float = 0.0
    deadline: float = 0.0  # when to look again: provisional until its start notice is read
    started: float | None = None
    grace: bool = False  # the startup grace has been granted


@dataclass(slots=True)
class _Pool:
    executor: ProcessPoolExecutor
    started: SimpleQueue[tuple[int, float]]
    processes: list[Any] = field(default_factory=list)


_Event = (
    tuple[Literal["submit"], _Item]
    | tuple[Literal["done"], Future[ImageResult]]
    | tuple[Literal["close"], bool]
)


class ImageStage:
    """Runs ``processor`` over fetched records in a process pool; reports via ``on_done``.

    ``submit`` never blocks. ``on_done(record)`` is called from the stage's own thread, once
    per submitted record, with the record updated (``temp_path`` now the processed file,
    image facts filled) or failed (``status=FAILED``, temp file discarded). It must be quick
    and must not block (put the record on a queue). ``close(cancel=True)`` stops at once:
    unfinished records come back as ``SKIPPED``/``cancelled`` with their temp files removed.

    ``processor`` is the module-level (picklable) function workers run, ``process_image``
    unless a test injects faults. Workers: ``config.worker_count``; per-item limit:
    ``config.item_timeout``; per-worker address space: ``config.memory_limit``.
    """

    def __init__(
        self,
        config: ImageConfig,
        tmp_dir: Path,
        on_done: Callable[[Record], None],
        *,
        processor: Processor = process_image,
    ) -> None:
        self._config = config
        self._tmp_dir = str(tmp_dir)
        self._on_done = on_done
        self._processor = processor
        self._workers = config.worker_count
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _in_flight and _closed (touched by callers)
        self._in_flight = 0
        self._closed = False
        # Owned by the supervisor thread only:
        self._backlog: deque[_Item] = deque()
        self._suspects: deque[_Item] = deque()
        self._running: dict[Future[ImageResult], _Item] = {}
        self._by_token: dict[int, _Item] = {}
        self._pool: _Pool | None = None
        self._retired: list[_Pool] = []
        self._tokens = count(1)
        self._closing = False
        self._cancel = False
        self._thread = threading.Thread(
            target=self._supervise, name="fetchpool-images", daemon=True
        )
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Records submitted and not yet handed to ``on_done``."""
        with self._lock:
            return self._in_flight

    def submit(self, record: Record) -> None:
        """Queue a fetched record (``status=OK`` with a ``temp_path``) for processing."""
        if record.status is not Status.OK or not record.temp_path:
            raise ValueError("ImageStage.submit needs an OK record with a temp_path")
        with self._lock:
            if self._closed:
                raise RuntimeError("ImageStage is closed")
            self._in_flight += 1
            # Under the lock, so every accepted submission is queued before the close event.
            self._events.put(("submit", _Item(record)))

    def close(self, cancel: bool = False) -> None:
        """Finish every submitted record (or cancel them), stop the workers, and return.

        Always returns: running items are bounded by ``item_timeout``, and cancelling kills
        the workers instead of waiting for them. A cancelling call may follow (or interrupt,
        from another thread) a finishing one.
        """
        with self._lock:
            first = not self._closed
            self._closed = True
        if first or cancel:
            self._events.put(("close", cancel))
        self._thread.join()

    # -- supervisor --------------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("internal error in the image stage; failing its open items")
            self._abandon(ErrorCode.PROCESS_FAILED, "internal error in the image stage")
        finally:
            self._shutdown_pools()

    def _loop(self) -> None:
        while True:
            event = self._next_event()
            if event is not None:
                self._handle(event)
            # Read start notices often: unread ones would fill the pipe and block the workers.
            self._read_start_notices()
            if self._cancel:
                self._abandon(ErrorCode.CANCELLED, "cancelled before the image was processed")
                return
            self._expire_hung()
            self._pump()
            if self._closing and not (self._running or self._backlog or self._suspects):
                return

    def _next_event(self) -> _Event | None:
        timeout = self._time_to_next_deadline()
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, event: _Event) -> None:
        if event[0] == "submit":
            self._backlog.append(event[1])
        elif event[0] == "done":
            self._completed(event[1])
        else:
            self._closing = True
            self._cancel = self._cancel or event[1]

    # -- submitting --------------------------------------------------------------------------

    def _pump(self) -> None:
        """Fill free workers: suspects run strictly alone, others up to the worker count."""
        if self._suspects:
            if not self._running:
                self._start(self._suspects.popleft())
            return
        while self._backlog and len(self._running) < self._workers * PIPELINE_DEPTH:
            self._start(self._backlog.popleft())

    def _start(self, item: _Item) -> None:
        item.token = next(self._tokens)
        item.submitted = time.monotonic()
        item.deadline = item.submitted + self._config.item_timeout
        item.started = None
        item.grace = False
        try:
            future = self._submit(item)
        except Exception as exc:  # cannot start workers at all (fd or process limits, ...)
            log.exception("cannot start image workers")
            self._lose_pool()
            self._fail(item, ErrorCode.PROCESS_FAILED, f"cannot start image workers: {exc}")
            return
        self._running[future] = item
        self._by_token[item.token] = item
        future.add_done_callback(self._future_done)

    def _submit(self, item: _Item) -> Future[ImageResult]:
        src = item.record.temp_path or ""  # submit() checked it is set
        args = (self._processor, item.token, src, self._tmp_dir, self._config)
        try:
            return self._ensure_pool().executor.submit(_run_item, *args)
        except RuntimeError:  # BrokenProcessPool: the pool died while idle; the item never ran
            self._lose_pool()
            return self._ensure_pool().executor.submit(_run_item, *args)

    def _future_done(self, future: Future[ImageResult]) -> None:
        # Runs in the executor's management thread: hand over, do nothing else here.
        self._events.put(("done", future))

    def _ensure_pool(self) -> _Pool:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            started: SimpleQueue[tuple[int, float]] = ctx.SimpleQueue()
            executor = ProcessPoolExecutor(
                max_workers=self._workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(
                    self._config.max_pixels,
                    self._config.memory_limit,
                    started,
                    os.getpid(),
                ),
            )
            self._pool = _Pool(executor, started)
        return self._pool

    # -- results -----------------------------------------------------------------------------

    def _completed(self, future: Future[ImageResult]) -> None:
        # Before this item's token is forgotten: after a crash, blame goes by start notices.
        self._read_start_notices()
        item = self._running.pop(future, None)
        if item is None:  # from a pool already written off: its item was decided then
            _discard_late_output(future)
            return
        self._by_token.pop(item.token, None)
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or isinstance(error, BrokenProcessPool):
            self._pool_broke(item)
        elif error is not None:
            message = f"image worker error: {type(error).__name__}: {error}"
            self._fail(item, ErrorCode.PROCESS_FAILED, message)
        else:
            self._succeed(item, future.result())

    def _succeed(self, item: _Item, result: ImageResult) -> None:
        if not result.ok:
            code = result.error_code or ErrorCode.PROCESS_FAILED
            self._fail(item, code, result.error_message or "image processing failed")
            return
        _apply(item.record, result)
        self._deliver(item)

    def _fail(self, item: _Item, code: ErrorCode, message: str) -> None:
        record = item.record
        fsutil.discard(record.temp_path)
        record.temp_path = None
        record.fail(code, message)
        self._deliver(item)

    def _deliver(self, item: _Item) -> None:
        with self._lock:
            self._in_flight -= 1
        try:
            self._on_done(item.record)
        except Exception:
            log.exception("on_done raised for item %d", item.record.position)

    # -- faults ------------------------------------------------------------------------------

    def _pool_broke(self, first: _Item) -> None:
        """A worker died: blame the item if it ran alone, else re-run everyone alone.

        Items still queued (no start notice) cannot have crashed it: they go back to the
        backlog as they are.
        """
        lost = [first, *self._take_running()]
        self._lose_pool()
        started = [item for item in lost if item.started is not None] or lost
        for item in reversed([item for item in lost if item not in started]):
            (self._suspects if item.suspect else self._backlog).appendleft(item)
        if len(started) == 1:
            message = "the image worker crashed (or was killed) while processing this item"
            self._fail(started[0], ErrorCode.PROCESS_FAILED, message)
            return
        log.warning("an image worker crashed with %d items running; re-running each", len(started))
        for item in started:
            item.suspect = True
            self._suspects.append(item)

    def _expire_hung(self) -> None:
        now = time.monotonic()
        if not any(item.deadline <= now for item in self._running.values()):
            return
        hung = [item for item in self._running.values() if not self._extend(item, now)]
        if not hung:
            return
        innocent = [item for item in self._take_running() if item not in hung]
        self._lose_pool()
        for item in hung:
            timeout = self._config.item_timeout
            self._fail(item, ErrorCode.PROCESS_FAILED, f"image processing took over {timeout}s")
        for item in reversed(innocent):
            (self._suspects if item.suspect else self._backlog).appendleft(item)

    def _extend(self, item: _Item, now: float) -> bool:
        """Move a provisional deadline to its real value; False when the item is hung."""
        if item.deadline > now:
            return True
        if item.started is not None:
            item.deadline = item.started + self._config.item_timeout
        elif not item.grace:  # never reported starting: its worker may still be booting
            item.grace = True
            item.deadline = item.submitted + self._config.item_timeout + STARTUP_GRACE
        return item.deadline > now

    def _read_start_notices(self) -> None:
        pool = self._pool
        if pool is None:
            return
        while not pool.started.empty():
            token, started = pool.started.get()
            item = self._by_token.get(token)
            if item is not None:
                item.started = started

    def _time_to_next_deadline(self) -> float | None:
        if not self._running:
            return None
        nearest = min(item.deadline for item in self._running.values())
        return max(0.0, nearest - time.monotonic())

    def _take_running(self) -> list[_Item]:
        items = list(self._running.values())
        self._running.clear()
        self._by_token.clear()
        return items

    def _lose_pool(self) -> None:
        """Write the current pool off: kill its processes so nothing stuck survives."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Private but stable since 3.2: the only handle on the worker processes.
        pool.processes = list(getattr(pool.executor, "_processes", {}).values())
        for process in pool.processes:
            if process.is_alive():
                process.kill()
        pool.executor.shutdown(wait=False, cancel_futures=True)
        self._retired.append(pool)

    # -- stopping ----------------------------------------------------------------------------

    def _abandon(self, code: ErrorCode, message: str) -> None:
        """Hand back every open item without its output (cancel, or an internal error)."""
        items = [*self._take_running(), *self._suspects, *self._backlog]
        self._suspects.clear()
        self._backlog.clear()
        self._lose_pool()
        while True:  # submissions that raced with close
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "submit":
                items.append(event[1])
            elif event[0] == "done":
                _discard_late_output(event[1])
        for item in items:
            if code is ErrorCode.CANCELLED:
                _cancel(item.record)
                self._deliver(item)
            else:
                self._fail(item, code, message)

    def _shutdown_pools(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # idle: let the workers exit on their own
            pool.processes = list(getattr(pool.executor, "_processes", {}).values())
            pool.executor.shutdown(wait=False, cancel_futures=True)
            self._retired.append(pool)
        deadline = time.monotonic() + REAP_TIMEOUT
        for retired in self._retired:
            for process in retired.processes:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join(1.0)
            retired.started.close()
        self._retired.clear()


def _apply(record: Record, result: ImageResult) -> None:
    if result.temp_path is not None and result.temp_path != record.temp_path:
        fsutil.discard(record.temp_path)
        record.temp_path = result.temp_path
        record.bytes = result.bytes
        record.sha256 = result.sha256
    record.extension = result.extension or record.extension
    record.width = result.width
    record.height = result.height
    record.orig_width = result.orig_width
    record.orig_height = result.orig_height
    record.image_format = result.image_format
    record.exif = result.exif


def _cancel(record: Record) -> None:
    fsutil.discard(record.temp_path)
    record.cancel("cancelled before the image was processed")


def _discard_late_output(future: Future[ImageResult]) -> None:
    """A result that arrived after its pool was written off: its item was re-queued or failed."""
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if result.temp_path is not None:
        fsutil.discard(result.temp_path)
