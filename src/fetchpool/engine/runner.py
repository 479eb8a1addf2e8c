"""The generic engine: run callables on threads, processes, or one by one, and time each task.

Two levels:

* :class:`TaskPool` — submit callables, receive each finished task as a :class:`Done`
  (value or error, plus a :class:`~fetchpool.models.TaskRecord` with when and where it ran),
  either by calling :meth:`TaskPool.wait` or through an ``on_done`` callback.
* :func:`run` — ``map``/``as_completed`` over an iterable with a bounded window: it never reads
  the input further ahead than ``window`` items, so a generator of millions of items streams.

Every task is timed *where it executes*: in process mode a module-level wrapper measures the
start and end inside the worker process, so a timeline shows real execution, not queueing.

The same engine serves the download pipeline (which uses :class:`TaskPool` with ``on_done``)
and the lab (which measures :func:`run` against the threading notebook's claims).
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from queue import Empty, SimpleQueue
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, cast

from fetchpool.models import TaskRecord

__all__ = ["Done", "Mode", "Run", "TaskPool", "run"]

T = TypeVar("T")
R = TypeVar("R")
A = TypeVar("A")

Mode = Literal["threads", "processes", "sequential"]
MODES: tuple[Mode, ...] = ("threads", "processes", "sequential")


@dataclass(frozen=True, slots=True)
class Done(Generic[T]):
    """One finished task: its value or its error, and when/where it ran."""

    task_id: int
    label: str
    value: T | None
    error: BaseException | None
    task: TaskRecord

    @property
    def ok(self) -> bool:
        """True when the callable returned without raising."""
        return self.error is None

    def result(self) -> T:
        """The value, or raise the task's exception (like ``Future.result``)."""
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


class RemoteTraceback(Exception):
    """Carries a worker process's formatted traceback as ``__cause__`` of its exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the worker-side wrapper measured; crosses the process boundary (must pickle)."""

    start: float
    end: float
    pid: int
    thread: str
    ident: int
    value: Any
    error: Exception | None
    remote_tb: str | None


def _execute(
    fn: Callable[..., Any], args: tuple[Any, ...], clock: Callable[[], float], remote: bool
) -> _Outcome:
    """Run ``fn(*args)`` and time it where it runs. Module level so process pools can pickle it.

    ``Exception`` is caught so its timing survives; ``BaseException`` (KeyboardInterrupt,
    SystemExit) is left to the executor, like a bare ``Executor.submit`` would.
    """
    start = clock()
    value: Any = None
    error: Exception | None = None
    remote_tb: str | None = None
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the task's error is data, delivered in its Done
        error = exc
        # Pickling drops __traceback__; keep the text so the parent can show where it failed.
        remote_tb = traceback.format_exc() if remote else None
    end = clock()
    # In a worker process the thread is always MainThread; the process name says more.
    name = _process_name() if remote else threading.current_thread().name
    return _Outcome(start, end, os.getpid(), name, threading.get_ident(), value, error, remote_tb)


def _process_name() -> str:
    import multiprocessing  # loaded already in a worker process

    return multiprocessing.current_process().name


@dataclass(slots=True)
class _Queued:
    """A task waiting for its turn in sequential mode."""

    task_id: int
    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]


class TaskPool(Generic[T]):
    """Run callables in ``mode`` on ``workers`` workers; deliver each one as a :class:`Done`.

    * ``"threads"``: a ``ThreadPoolExecutor`` (threads named ``{name}_N``).
    * ``"processes"``: a ``ProcessPoolExecutor`` with the *spawn* start method; callables and
      arguments must pickle (define them at module level). Times are measured in the worker
      with the wall clock and shifted onto the pool's clock (so inject a clock that ticks in
      seconds, as the default does).
    * ``"sequential"``: tasks run one at a time in the caller's thread inside :meth:`wait`
      (or :meth:`shutdown`), so :meth:`submit` never blocks in any mode.

    Results are delivered either by :meth:`wait` (completion order) or, when ``on_done`` is
    given, by calling ``on_done(done)`` from the thread that completed the task (a worker
    thread, the process pool's manager thread, or the caller's thread in sequential mode);
    ``on_done`` must be quick and must not raise. Times in each ``TaskRecord`` are seconds
    since the pool was created.
    """

    def __init__(
        self,
        mode: Mode = "threads",
        workers: int = 8,
        *,
        name: str = "worker",
        on_done: Callable[[Done[T]], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.mode: Mode = mode
        self.workers = workers
        self._on_done = on_done
        self._clock = clock
        # Two anchors taken together: the pool clock for local tasks, the wall clock for tasks
        # timed in another process (perf_counter's origin is not guaranteed to be shared).
        self._t0 = clock()
        self._wall0 = time.time()
        self._lock = threading.Lock()
        self._results: SimpleQueue[Done[T]] = SimpleQueue()
        self._queued: deque[_Queued] = deque()
        self._thread_numbers: dict[int, int] = {}
        self._next_id = 0
        self._in_flight = 0
        self._closed = False
        self._executor = self._make_executor(name)

    def _make_executor(self, name: str) -> Executor | None:
        if self.mode == "threads":
            return ThreadPoolExecutor(self.workers, thread_name_prefix=name)
        if self.mode == "processes":
            import multiprocessing  # not at import: thread-only runs never load it

            context = multiprocessing.get_context("spawn")
            from concurrent.futures import ProcessPoolExecutor

            return ProcessPoolExecutor(self.workers, mp_context=context)
        return None

    # -- public API -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Tasks submitted and not yet delivered (returned by :meth:`wait` or to ``on_done``)."""
        with self._lock:
            return self._in_flight

    def now(self) -> float:
        """Seconds since the pool was created, on the pool's clock."""
        return self._clock() - self._t0

    def submit(self, fn: Callable[..., T], *args: Any, label: str = "") -> int:
        """Schedule ``fn(*args)``; never blocks. Returns the task id (0, 1, 2, ...)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("submit after shutdown")
            task_id = self._next_id
            self._next_id += 1
            # Counted before the executor sees it: its callback may run before submit returns.
            self._in_flight += 1
        if self._executor is None:
            self._queued.append(_Queued(task_id, label, fn, args))
            return task_id
        remote = self.mode == "processes"
        clock = time.time if remote else self._clock
        submitted = self.now()
        future = self._executor.submit(_execute, fn, args, clock, remote)
        future.add_done_callback(partial(self._future_done, task_id, label, submitted))
        return task_id

    def wait(self, timeout: float | None = None) -> Done[T] | None:
        """The next finished task, in completion order; ``None`` on timeout or when idle.

        Returns ``None`` at once when nothing is in flight (waiting would never end). Only for
        pools without ``on_done``, except in sequential mode, where ``wait`` is what runs the
        next queued task: it is then passed to ``on_done`` and ``None`` is returned.
        """
        if self._executor is None:
            return self._wait_sequential()
        if self._on_done is not None:
            raise RuntimeError("wait() is not available when on_done is set")
        if self.in_flight == 0:
            return None
        try:
            done = self._results.get(timeout=timeout)
        except Empty:
            return None
        with self._lock:
            self._in_flight -= 1
        return done

    def shutdown(self, *, cancel: bool = False, wait: bool = True) -> None:
        """Stop accepting work and wait for running tasks (unless ``wait`` is False).

        ``cancel=False`` lets every queued task run (sequential mode runs them here);
        ``cancel=True`` drops queued tasks without delivering them. Idempotent.
        """
        with self._lock:
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=cancel)
            return
        if cancel:
            with self._lock:
                self._in_flight -= len(self._queued)
            self._queued.clear()
            return
        while self._queued:
            self._deliver(self._run_queued())

    def __enter__(self) -> TaskPool[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On an error there is nobody left to consume results: drop the queued work.
        self.shutdown(cancel=exc_type is not None)

    # -- internals ---------------------------------------------------------------------------

    def _wait_sequential(self) -> Done[T] | None:
        if self._results.empty():  # nothing left over from shutdown(): run the next task
            if not self._queued:
                return None
            self._deliver(self._run_queued())
            if self._on_done is not None:
                return None
        with self._lock:
            self._in_flight -= 1
        return self._results.get()

    def _run_queued(self) -> Done[T]:
        item = self._queued.popleft()
        outcome = _execute(item.fn, item.args, self._clock, False)
        return self._make_done(item.task_id, item.label, outcome, "main")

    def _future_done(self, task_id: int, label: str, submitted: float, future: Future[Any]) -> None:
        """Called by the executor when a future finishes (from the completing thread)."""
        if future.cancelled():
            with self._lock:
                self._in_flight -= 1
            return
        error = future.exception()
        if error is None:
            outcome = cast(_Outcome, future.result())
            done = self._make_done(task_id, label, outcome, self._worker_name(outcome))
        else:
            # The wrapper never returned (broken pool, unpicklable result, BaseException):
            # the best timing we have is submission to now, seen from the parent.
            record = TaskRecord(task_id, submitted, self.now(), "pool", "", False, label)
            done = Done(task_id, label, None, error, record)
        self._deliver(done)

    def _deliver(self, done: Done[T]) -> None:
        if self._on_done is None:
            self._results.put(done)
            return
        with self._lock:
            self._in_flight -= 1
        self._on_done(done)

    def _worker_name(self, outcome: _Outcome) -> str:
        if self.mode == "processes":
            return f"pid-{outcome.pid}"
        with self._lock:
            number = self._thread_numbers.setdefault(outcome.ident, len(self._thread_numbers) + 1)
        return f"thread-{number}"

    def _make_done(self, task_id: int, label: str, outcome: _Outcome, worker: str) -> Done[T]:
        origin = self._wall0 if self.mode == "processes" else self._t0
        error = outcome.error
        if error is not None and outcome.remote_tb is not None and error.__cause__ is None:
            error.__cause__ = RemoteTraceback(outcome.remote_tb)
        record = TaskRecord(
            index=task_id,
            start=outcome.start - origin,
            end=outcome.end - origin,
            worker=worker,
            thread=outcome.thread,
            ok=error is None,
            label=label,
        )
        return Done(task_id, label, cast("T | None", outcome.value), error, record)


class Run(Generic[R]):
    """The streaming result of :func:`run`: iterate it for results, then read its timings.

    Iterating with ``for`` closes the run (shutting the pool down and cancelling queued
    work) when the loop ends, breaks, or raises. ``next(run)`` works too; call
    :meth:`close` (or use ``with``) if you stop early that way.
    """

    def __init__(
        self,
        fn: Callable[[Any], R],
        items: Iterable[Any],
        *,
        mode: Mode,
        workers: int,
        ordered: bool,
        window: int | None,
        keep_tasks: bool,
    ) -> None:
        self.window = 2 * workers if window is None else window
        if self.window < 1:
            raise ValueError("window must be >= 1")
        self.ordered = ordered
        self.tasks: list[TaskRecord] = []
        self.busy = 0.0
        self._fn = fn
        self._items: Iterator[Any] = iter(items)
        self._keep_tasks = keep_tasks
        self._pool: TaskPool[R] = TaskPool(mode, workers, name="run")
        self._started = self._pool.now()
        self._ended: float | None = None
        self._exhausted = False
        self._submitted = 0
        self._yielded = 0
        self._buffer: dict[int, Done[R]] = {}  # ordered mode: finished, waiting for their turn

    # -- measurements --------------------------------------------------------------------------

    @property
    def wall(self) -> float:
        """Seconds from the start of the run to its end (or to now, while it runs)."""
        end = self._ended if self._ended is not None else self._pool.now()
        return end - self._started

    @property
    def gain(self) -> float:
        """busy / wall: how many tasks ran at once on average (1.0 = no concurrency)."""
        wall = self.wall
        return self.busy / wall if wall > 0 else 0.0

    @property
    def ahead(self) -> int:
        """Items taken from the input and not yet yielded (never more than ``window``)."""
        return self._submitted - self._yielded

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Generator[R, None, None]:
        # A fresh generator per loop, not ``self``: when a ``for`` loop breaks, the generator
        # is dropped and its ``finally`` shuts the pool down, even if ``self`` lives on.
        try:
            while True:
                try:
                    value = next(self)
                except StopIteration:
                    return
                yield value
        finally:
            self.close()

    def __next__(self) -> R:
        if self._ended is not None:
            raise StopIteration
        self._fill()
        done = self._next_done()
        if done is None:
            self.close()
            raise StopIteration
        self._yielded += 1
        if done.error is not None:
            self.close()  # like Executor.map: the first error ends the run
            raise done.error
        return cast(R, done.value)

    def close(self) -> None:
        """Stop: cancel queued tasks, wait for running ones, fix ``wall``. Idempotent."""
        if self._ended is None:
            self._pool.shutdown(cancel=True)
            self._ended = self._pool.now()

    def __enter__(self) -> Run[R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Submit items until ``window`` are taken but not yielded (the reorder buffer counts)."""
        while not self._exhausted and self.ahead < self.window:
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
                return
            self._pool.submit(self._fn, item)
            self._submitted += 1

    def _next_done(self) -> Done[R] | None:
        if not self.ordered:
            return self._collect()
        while self._yielded not in self._buffer:
            done = self._collect()
            if done is None:
                return None
            self._buffer[done.task_id] = done
        return self._buffer.pop(self._yielded)

    def _collect(self) -> Done[R] | None:
        done = self._pool.wait()
        if done is not None:
            self.busy += done.task.end - done.task.start
            if self._keep_tasks:
                self.tasks.append(done.task)
        return done


def run(
    fn: Callable[[A], R],
    items: Iterable[A],
    *,
    mode: Mode = "threads",
    workers: int = 8,
    ordered: bool = True,
    window: int | None = None,
    keep_tasks: bool = True,
) -> Run[R]:
    """Apply ``fn`` to every item on a :class:`TaskPool`, streaming the results.

    ``ordered=True`` yields in input order (``Executor.map`` semantics: a task's exception is
    raised when its turn comes); ``ordered=False`` yields in completion order
    (``as_completed`` semantics). At most ``window`` (default ``2 * workers``) items are taken
    from ``items`` ahead of the results yielded, the reorder buffer included, so the input is
    never consumed up front. ``keep_tasks=False`` keeps no per-task records (flat memory).
    """
    return Run(
        fn,
        items,
        mode=mode,
        workers=workers,
        ordered=ordered,
        window=window,
        keep_tasks=keep_tasks,
    )
