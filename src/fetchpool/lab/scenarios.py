"""The lab's scenarios: every claim of the threading notebook, re-measured on this machine.

Each scenario runs the notebook's experiment (durations multiplied by ``scale``; 1.0 is the
notebook), records every task as a :class:`~fetchpool.models.TaskRecord`, and returns a
:class:`Result`: the claim in a sentence, the measured figures, a :class:`Verdict` with its
reason, the completion order where it matters, and the tasks for a timeline picture.

The executor and thread-pool scenarios use fetchpool's own engine (:func:`fetchpool.engine.run`
and :class:`fetchpool.engine.TaskPool`), so the lab measures the engine the downloader uses;
the ``threading.Thread`` scenarios use raw threads, as the notebook does, and time each
thread themselves.

Functions run in worker processes (:func:`nap`, :func:`cpu_work`) are module level so they
pickle; this module imports nothing heavy at import time, because spawned workers import it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetchpool.engine import Run, TaskPool, run
from fetchpool.models import TaskRecord

__all__ = [
    "SCENARIOS",
    "Figure",
    "Result",
    "Scenario",
    "Verdict",
    "cpu_verdict",
    "cpu_work",
    "nap",
    "resolve",
    "run_scenarios",
]

#: Colours per task label, shared by every lab picture so "threads" looks the same everywhere.
LAB_COLORS = {
    "sequential": "#1f77b4",
    "threads": "#2ca02c",
    "processes": "#ff7f0e",
    "main": "#7f7f7f",
    "without join": "#9467bd",
    "with join": "#17becf",
}
GAP = 0.05  # seconds drawn between two phases placed on one timeline


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the notebook's claim held on this machine, and why."""

    holds: bool
    reason: str

    @property
    def text(self) -> str:
        return "holds" if self.holds else "does not hold here"


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured number, with what the notebook leads one to expect."""

    key: str
    label: str
    value: float
    unit: str = "s"
    expected: str = ""

    def shown(self) -> str:
        if self.unit == "s":
            return f"{self.value:.3f} s"
        if self.unit == "x":
            return f"{self.value:.2f}x"
        return f"{self.value:g} {self.unit}".rstrip()


@dataclass(slots=True)
class Result:
    """What one scenario measured."""

    name: str
    number: int
    title: str
    claim: str
    scale: float
    figures: list[Figure]
    verdict: Verdict
    tasks: list[TaskRecord]
    order: list[str] | None = None  # completion / yield order, where the claim is about it
    log: list[str] = field(default_factory=list)  # captured output (logging-thread)
    notes: list[str] = field(default_factory=list)

    def value(self, key: str) -> float:
        """The measured figure with this key."""
        return next(f.value for f in self.figures if f.key == key)

    def svg(self) -> str:
        """The scenario's timeline picture (time 0 = start of the scenario's first phase)."""
        from fetchpool.report.timeline import timeline_svg

        title = f"{self.number}. {self.name}: {self.title}"
        return timeline_svg(self.tasks, title=title, colors=LAB_COLORS, origin=0.0)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named experiment: ``run(scale)`` returns its :class:`Result`."""

    number: int
    name: str
    title: str
    claim: str
    run: Callable[[float], Result]


#: Every scenario by name, in the notebook's order (filled by :func:`scenario` below).
SCENARIOS: dict[str, Scenario] = {}


def scenario(
    number: int, name: str, title: str, claim: str
) -> Callable[[Callable[[float], Result]], Callable[[float], Result]]:
    """Register a scenario function under ``name`` with the notebook's claim."""

    def register(fn: Callable[[float], Result]) -> Callable[[float], Result]:
        SCENARIOS[name] = Scenario(number, name, title, claim, fn)
        return fn

    return register


def _result(
    name: str,
    scale: float,
    figures: list[Figure],
    verdict: Verdict,
    tasks: list[TaskRecord],
    **extra: Any,
) -> Result:
    meta = SCENARIOS[name]
    return Result(
        name, meta.number, meta.title, meta.claim, scale, figures, verdict, tasks, **extra
    )


# -- shared helpers --------------------------------------------------------------------------------


def nap(seconds: float, scale: float = 1.0) -> float:
    """The notebook's ``do_something(seconds)``: sleep ``seconds * scale``; return ``seconds``."""
    time.sleep(seconds * scale)
    return seconds


def cpu_work(iterations: int) -> int:
    """Pure-Python CPU work (holds the GIL throughout): a loop of integer arithmetic."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def warm_up(seconds: float) -> int:
    """Keep a worker busy for a moment; return its pid (to see which workers are up)."""
    time.sleep(seconds)
    return os.getpid()


def notebook_workers() -> int:
    """``ThreadPoolExecutor()``'s default worker count, which the notebook relies on."""
    return min(32, (os.cpu_count() or 1) + 4)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gil_enabled() -> bool | None:
    """``sys._is_gil_enabled()`` where it exists (3.13+); ``None`` on builds that always have
    the GIL."""
    probe = getattr(sys, "_is_gil_enabled", None)
    return bool(probe()) if callable(probe) else None


def _close_to(measured: float, expected: float) -> bool:
    # Sleeps only ever overshoot; 15% (at least 40 ms) absorbs thread start-up and a busy box.
    return abs(measured - expected) <= max(0.15 * expected, 0.04)


def _about(measured: float, expected: float, what: str) -> Verdict:
    if _close_to(measured, expected):
        return Verdict(True, f"{what} took {measured:.3f} s, expected about {expected:.3f} s")
    return Verdict(False, f"{what} took {measured:.3f} s, not about {expected:.3f} s")


def _both(*verdicts: Verdict) -> Verdict:
    return Verdict(all(v.holds for v in verdicts), "; ".join(v.reason for v in verdicts))


def _relabel(
    tasks: Iterable[TaskRecord], label: str, *, shift: float = 0.0, lane: str | None = None
) -> list[TaskRecord]:
    """Put a phase's tasks on a shared picture: a label (colour), a time shift, a lane prefix."""
    return [
        dataclasses.replace(
            t,
            start=t.start + shift,
            end=t.end + shift,
            label=label,
            worker=f"{lane} {t.worker}" if lane else t.worker,
        )
        for t in tasks
    ]


class Stopwatch:
    """Times work run on raw threads (or inline) as TaskRecords on one shared clock."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tasks: list[TaskRecord] = []  # list.append is atomic: threads may share it

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def timed(self, fn: Callable[..., Any], label: str = "") -> Callable[..., None]:
        """Wrap ``fn`` so each call appends a record (worker = the thread's name)."""

        def wrapper(*args: Any) -> None:
            start = self.now()
            ok = True
            try:
                fn(*args)
            except Exception:
                ok = False
                raise
            finally:
                name = threading.current_thread().name
                index = len(self.tasks)
                self.tasks.append(TaskRecord(index, start, self.now(), name, name, ok, label))

        return wrapper


def _threads(
    watch: Stopwatch,
    count: int,
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    label: str = "threads",
) -> list[threading.Thread]:
    return [
        threading.Thread(target=watch.timed(fn, label), args=tuple(args), name=f"Thread-{i + 1}")
        for i in range(count)
    ]


# -- 1-7: sleeping, sequentially and on raw threads ------------------------------------------------


@scenario(
    1,
    "one-task",
    "one call",
    "Calling do_something() once takes about 1 second.",
)
def one_task(scale: float) -> Result:
    watch = Stopwatch()
    watch.timed(nap, "sequential")(1, scale)
    wall = watch.now()
    return _result(
        "one-task",
        scale,
        [Figure("wall", "one call", wall, expected=f"about {scale:g} s")],
        _about(wall, scale, "one call"),
        watch.tasks,
    )


@scenario(
    2,
    "two-tasks",
    "two calls in a row",
    "Calling it twice, one after the other, takes about 2 seconds.",
)
def two_tasks(scale: float) -> Result:
    watch = Stopwatch()
    for _ in range(2):
        watch.timed(nap, "sequential")(1, scale)
    wall = watch.now()
    return _result(
        "two-tasks",
        scale,
        [Figure("wall", "two sequential calls", wall, expected=f"about {2 * scale:g} s")],
        _about(wall, 2 * scale, "two sequential calls"),
        watch.tasks,
    )


@scenario(
    3,
    "created-not-started",
    "threads created, never started",
    "Creating two Thread objects without start() finishes in about 0 s and nothing runs.",
)
def created_not_started(scale: float) -> Result:
    watch = Stopwatch()
    threads = _threads(watch, 2, nap, (1, scale))
    wall = watch.now()
    ran = len(watch.tasks)
    alive = sum(t.is_alive() for t in threads)
    holds = ran == 0 and alive == 0 and wall < 0.05
    reason = (
        f"finished in {wall * 1000:.2f} ms; {ran} of 2 functions ran ({alive} threads alive): "
        "a Thread object does nothing until start()"
    )
    return _result(
        "created-not-started",
        scale,
        [
            Figure("wall", "script time", wall, expected="about 0 s"),
            Figure("ran", "functions that ran", ran, unit="", expected="0"),
        ],
        Verdict(holds, reason),
        watch.tasks,
    )


@scenario(
    4,
    "started-not-joined",
    "started, not joined",
    "Starting two threads without join() makes the script 'finish' in about 0 s while the "
    "threads are still running.",
)
def started_not_joined(scale: float) -> Result:
    watch = Stopwatch()
    threads = _threads(watch, 2, nap, (1, scale))
    for t in threads:
        t.start()
    reported = watch.now()  # what the notebook prints as "Finished in ..."
    for t in threads:  # not in the notebook: wait, so we can see when the work really ended
        t.join()
    ended = max(t.end for t in watch.tasks)
    main = TaskRecord(len(watch.tasks), 0.0, reported, "MainThread", "MainThread", True, "main")
    holds = reported < 0.1 * scale + 0.02 and ended >= 0.9 * scale and ended > reported
    reason = (
        f"the script printed 'finished' after {reported * 1000:.1f} ms while both threads "
        f"were still sleeping; they ended at {ended:.3f} s"
    )
    return _result(
        "started-not-joined",
        scale,
        [
            Figure("reported", "reported 'finished in'", reported, expected="about 0 s"),
            Figure("ended", "threads actually ended at", ended, expected=f"about {scale:g} s"),
        ],
        Verdict(holds, reason),
        [*watch.tasks, main],
    )


@scenario(
    5,
    "start-and-join",
    "two threads, started and joined",
    "Two threads started and then joined take about 1 second, not 2.",
)
def start_and_join(scale: float) -> Result:
    watch = Stopwatch()
    threads = _threads(watch, 2, nap, (1, scale))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = watch.now()
    return _result(
        "start-and-join",
        scale,
        [Figure("wall", "two threads", wall, expected=f"about {scale:g} s")],
        _about(wall, scale, "two joined threads"),
        watch.tasks,
    )


@scenario(
    6,
    "ten-tasks",
    "ten calls: in a row vs ten threads",
    "Ten calls take about 10 seconds one after the other, about 1 second on ten threads.",
)
def ten_tasks(scale: float) -> Result:
    seq: Run[float] = run(ScaledNap(scale), [1] * 10, mode="sequential")
    list(seq)
    thr: Run[float] = run(ScaledNap(scale), [1] * 10, mode="threads", workers=10)
    list(thr)
    tasks = _relabel(seq.tasks, "sequential") + _relabel(thr.tasks, "threads", shift=seq.wall + GAP)
    return _result(
        "ten-tasks",
        scale,
        [
            Figure(
                "sequential", "10 sequential calls", seq.wall, expected=f"about {10 * scale:g} s"
            ),
            Figure("threads", "10 threads", thr.wall, expected=f"about {scale:g} s"),
            Figure("speedup", "speedup", seq.wall / thr.wall, unit="x", expected="about 10x"),
        ],
        _both(_about(seq.wall, 10 * scale, "sequential"), _about(thr.wall, scale, "threads")),
        tasks,
    )


class ScaledNap:
    """``nap`` with the scale bound: ``ScaledNap(scale)(seconds)``. A class so it pickles."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, seconds: float) -> float:
        return nap(seconds, self.scale)


@scenario(
    7,
    "with-arguments",
    "ten threads, argument 1.5 s",
    "Ten threads each sleeping 1.5 s (passed with args=) finish in about 1.5 s, not 15 s.",
)
def with_arguments(scale: float) -> Result:
    watch = Stopwatch()
    threads = _threads(watch, 10, nap, (1.5, scale))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = watch.now()
    return _result(
        "with-arguments",
        scale,
        [Figure("wall", "10 threads x 1.5 s", wall, expected=f"about {1.5 * scale:g} s")],
        _about(wall, 1.5 * scale, "ten threads"),
        watch.tasks,
    )


# -- 8-10: the executor ----------------------------------------------------------------------------


@scenario(
    8,
    "executor-submit",
    "submit() and result()",
    "executor.submit() then .result() takes about 1 s for one task, and still about 1 s for two.",
)
def executor_submit(scale: float) -> Result:
    tasks: list[TaskRecord] = []
    with TaskPool[float]("threads", notebook_workers()) as pool:
        start = pool.now()
        pool.submit(nap, 1, scale, label="one task")
        done = pool.wait()
        assert done is not None
        done.result()
        one = pool.now() - start
        tasks.append(done.task)
        start = pool.now()
        for _ in range(2):
            pool.submit(nap, 1, scale, label="two tasks")
        for _ in range(2):
            done = pool.wait()
            assert done is not None
            done.result()
            tasks.append(done.task)
        two = pool.now() - start
    return _result(
        "executor-submit",
        scale,
        [
            Figure("one", "one submitted task", one, expected=f"about {scale:g} s"),
            Figure("two", "two submitted tasks", two, expected=f"about {scale:g} s"),
        ],
        _both(_about(one, scale, "one task"), _about(two, scale, "two tasks")),
        _relabel(tasks, "threads"),
    )


SECS = [5, 4, 3, 2, 1]


def _ordering(scale: float, ordered: bool) -> tuple[list[float], list[float], Run[float]]:
    r: Run[float] = run(ScaledNap(scale), SECS, workers=notebook_workers(), ordered=ordered)
    values: list[float] = []
    yielded_at: list[float] = []
    for value in r:
        values.append(value)
        yielded_at.append(r.wall)
    return values, yielded_at, r


@scenario(
    9,
    "as-completed-order",
    "as_completed: completion order",
    "With submit() and as_completed(), sleeps of 5,4,3,2,1 s come back 1,2,3,4,5, "
    "in about 5 s in total.",
)
def as_completed_order(scale: float) -> Result:
    values, yielded_at, r = _ordering(scale, ordered=False)
    order = [f"{v:g}" for v in values]
    holds_order = values == sorted(SECS)
    total = _about(r.wall, 5 * scale, "all five")
    reason = f"results came back {', '.join(order)}; " + total.reason
    return _result(
        "as-completed-order",
        scale,
        [
            Figure("wall", "total", r.wall, expected=f"about {5 * scale:g} s"),
            *[
                Figure(
                    f"got{v:g}",
                    f"result '{v:g}' received at",
                    at,
                    expected=f"about {v * scale:g} s",
                )
                for v, at in zip(values, yielded_at, strict=True)
            ],
        ],
        Verdict(holds_order and total.holds, reason),
        _relabel(r.tasks, "threads"),
        order=order,
    )


@scenario(
    10,
    "map-order",
    "map: submission order",
    "With executor.map(), the same sleeps come back in the order submitted, 5,4,3,2,1, "
    "in about 5 s in total.",
)
def map_order(scale: float) -> Result:
    values, yielded_at, r = _ordering(scale, ordered=True)
    order = [f"{v:g}" for v in values]
    finished = [f"{t.index}" for t in sorted(r.tasks, key=lambda t: t.end)]
    holds_order = values == SECS
    total = _about(r.wall, 5 * scale, "all five")
    reason = (
        f"results came back {', '.join(order)} (submission order) although the tasks finished "
        f"1,2,3,4,5 s; the first result waited {yielded_at[0]:.3f} s; " + total.reason
    )
    return _result(
        "map-order",
        scale,
        [
            Figure("wall", "total", r.wall, expected=f"about {5 * scale:g} s"),
            *[
                Figure(
                    f"got{v:g}",
                    f"result '{v:g}' received at",
                    at,
                    expected=f"about {5 * scale:g} s",
                )
                for v, at in zip(values, yielded_at, strict=True)
            ],
        ],
        Verdict(holds_order and total.holds, reason),
        _relabel(r.tasks, "threads"),
        order=order,
        notes=[f"tasks finished (by submission index): {', '.join(finished)}"],
    )


# -- 11, 14: downloads from the embedded origin ----------------------------------------------------


@dataclass(slots=True)
class _Downloads:
    sequential: Run[int]
    threads: Run[int]
    count: int
    cpu_per_request: float  # client CPU seconds per request, measured in the sequential phase


def _download(latency: float, count: int, repeats: int = 1) -> _Downloads:
    """Fetch ``count`` images sequentially, then on a thread pool, from a local origin.

    The origin runs in its own process so the client does not share a GIL with the server.
    With ``repeats`` > 1 both phases alternate that many times and the fastest run of each
    is kept: millisecond-long phases are at the mercy of whatever else the machine does.
    """
    import urllib3

    from fetchpool.origin import Origin

    workers = notebook_workers()
    with Origin(latency=latency, process=True) as origin, tempfile.TemporaryDirectory() as tmp:
        urls = [origin.image_url(n % 15) for n in range(count)]
        expected = {url: len(origin.image_bytes(n % 15)) for n, url in enumerate(urls)}
        http = urllib3.PoolManager(maxsize=workers, retries=False, timeout=30.0)

        def download_image(url: str) -> int:
            # The notebook's download_image: GET the body, write it to a file.
            body = http.request("GET", url).data
            if len(body) != expected[url]:
                raise RuntimeError(f"{url}: got {len(body)} bytes, expected {expected[url]}")
            (Path(tmp) / url.rsplit("/", 1)[-1]).write_bytes(body)
            return len(body)

        for url in urls[:15]:  # warm-up: the origin renders each image on first request
            http.request("GET", f"{url}?latency=0").data  # noqa: B018 - read the body
        best: _Downloads | None = None
        for _ in range(repeats):
            cpu = time.process_time()
            seq: Run[int] = run(download_image, urls, mode="sequential")
            list(seq)
            cpu = (time.process_time() - cpu) / count
            thr: Run[int] = run(download_image, urls, mode="threads", workers=workers)
            list(thr)
            if best is None or seq.wall < best.sequential.wall:
                best = _Downloads(seq, best.threads if best else thr, count, cpu)
            if thr.wall < best.threads.wall:
                best.threads = thr
        http.clear()
    assert best is not None
    return best


def _download_tasks(d: _Downloads) -> list[TaskRecord]:
    return _relabel(d.sequential.tasks, "sequential") + _relabel(
        d.threads.tasks, "threads", shift=d.sequential.wall + GAP
    )


@scenario(
    11,
    "download-images",
    "15 images: loop vs thread pool",
    "Downloading 15 images is faster on a thread pool than in a loop, because the time "
    "goes into waiting for the site.",
)
def download_images(scale: float) -> Result:
    latency = max(0.02, 0.2 * scale)
    d = _download(latency, 15)
    speedup = d.sequential.wall / d.threads.wall
    waves = -(-15 // notebook_workers())
    holds = speedup >= 1.5
    reason = (
        f"{latency * 1000:.0f} ms of latency per image: sequential {d.sequential.wall:.3f} s, "
        f"{notebook_workers()} threads {d.threads.wall:.3f} s ({speedup:.1f}x)"
    )
    return _result(
        "download-images",
        scale,
        [
            Figure("latency", "latency per request", latency),
            Figure(
                "sequential",
                "sequential loop",
                d.sequential.wall,
                expected=f"about {15 * latency:.2f} s (15 x latency)",
            ),
            Figure(
                "threads",
                f"thread pool ({notebook_workers()} threads)",
                d.threads.wall,
                expected=f"about {waves * latency:.2f} s ({waves} waves)",
            ),
            Figure("speedup", "speedup", speedup, unit="x", expected="well above 1x"),
        ],
        Verdict(holds, reason),
        _download_tasks(d),
    )


@scenario(
    14,
    "zero-latency-downloads",
    "downloads with zero latency",
    "When there is no waiting, threads help little or even make things slower (their "
    "overhead is all that is added).",
)
def zero_latency_downloads(scale: float) -> Result:
    count = max(150, int(300 * scale))
    d = _download(0.0, count, repeats=3)
    speedup = d.sequential.wall / d.threads.wall
    per_request = d.sequential.wall / count
    cpu_share = min(1.0, d.cpu_per_request / per_request) if per_request > 0 else 0.0
    holds = speedup < 1.3
    measured = (
        f"with no latency, {count} requests took {d.sequential.wall:.3f} s in a loop and "
        f"{d.threads.wall:.3f} s on threads ({speedup:.2f}x); the client spent "
        f"{d.cpu_per_request * 1000:.2f} ms of CPU per {per_request * 1000:.2f} ms request "
        f"({cpu_share:.0%})"
    )
    reason = measured + (
        ": little or nothing left to overlap" if holds else ": threads still overlapped work"
    )
    return _result(
        "zero-latency-downloads",
        scale,
        [
            Figure("count", "requests", count, unit=""),
            Figure("sequential", "sequential loop", d.sequential.wall),
            Figure("threads", f"thread pool ({notebook_workers()} threads)", d.threads.wall),
            Figure("speedup", "speedup", speedup, unit="x", expected="about 1x or below"),
            Figure("cpu_ms", "client CPU per request", d.cpu_per_request * 1000, unit="ms"),
            Figure("cpu_share", "CPU share of a request", cpu_share * 100, unit="%"),
        ],
        Verdict(holds, reason),
        _download_tasks(d),
    )


# -- 12: the logging example -----------------------------------------------------------------------


class _Capture(logging.Handler):
    """Keeps (time, thread name, message) of every record, on the lab's clock."""

    def __init__(self, watch: Stopwatch) -> None:
        super().__init__()
        self.watch = watch
        self.lines: list[tuple[float, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        at = record.created - time.time() + time.perf_counter() - self.watch.t0
        self.lines.append((at, record.threadName or "?", record.getMessage()))


def _logging_run(scale: float, join: bool, watch: Stopwatch) -> list[tuple[float, str, str]]:
    log = logging.getLogger(f"fetchpool.lab.notebook.{'join' if join else 'nojoin'}")
    log.propagate = False  # the lab shows the lines itself; never print them twice
    log.setLevel(logging.INFO)
    capture = _Capture(watch)
    log.addHandler(capture)
    label = "with join" if join else "without join"

    def thread_function(name: int) -> None:
        log.info("Thread %s: starting", name)
        time.sleep(2 * scale)
        log.info("Thread %s: finishing", name)

    try:
        log.info("Main    : before creating thread")
        x = threading.Thread(
            target=watch.timed(thread_function, label), args=(1,), name=f"Thread-1 ({label})"
        )
        log.info("Main    : before running thread")
        x.start()
        log.info("Main    : wait for the thread to finish")
        if join:
            x.join()
        log.info("Main    : all done")
        x.join()  # not in the notebook: collect the thread's last line before we go on
    finally:
        log.removeHandler(capture)
    return capture.lines


@scenario(
    12,
    "logging-thread",
    "logging from a thread, with and without join",
    "Without join(), main logs 'all done' before the thread has finished; with join() it "
    "waits for the thread.",
)
def logging_thread(scale: float) -> Result:
    watch = Stopwatch()
    without = _logging_run(scale, False, watch)
    with_join = _logging_run(scale, True, watch)

    def position(lines: list[tuple[float, str, str]], text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line[2])

    # Main's own span, from its first log line to "all done", on the picture next to the thread.
    main = [
        TaskRecord(
            100 + i, lines[0][0], _at(lines, "all done"), "MainThread", "MainThread", True, "main"
        )
        for i, lines in enumerate((without, with_join))
    ]
    early = position(without, "all done") < position(without, "finishing")
    late = position(with_join, "all done") > position(with_join, "finishing")
    log = ["--- without join ---"] + [_log_line(x) for x in without]
    log += ["--- with join ---"] + [_log_line(x) for x in with_join]
    reason = (
        f"without join, 'all done' was logged {'before' if early else 'after'} the thread "
        f"finished; with join, {'after' if late else 'before'}"
    )
    return _result(
        "logging-thread",
        scale,
        [
            Figure("nojoin_done", "'all done' without join", _at(without, "all done")),
            Figure("nojoin_finish", "thread finished (no join)", _at(without, "finishing")),
            Figure("join_done", "'all done' with join", _at(with_join, "all done")),
        ],
        Verdict(early and late, reason),
        [*watch.tasks, *main],
        order=[line[2].strip() for line in without],
        log=log,
    )


def _at(lines: list[tuple[float, str, str]], text: str) -> float:
    return next(at for at, _, message in lines if text in message)


def _log_line(line: tuple[float, str, str]) -> str:
    at, thread, message = line
    return f"{at:8.3f} s  [{thread}]  {message}"


# -- 13: CPU-bound work ----------------------------------------------------------------------------


def cpu_verdict(
    seq: float,
    threads: float,
    procs: float,
    cores: int,
    gil_enabled: bool | None,
    *,
    tasks: int | None = None,
) -> Verdict:
    """Judge the notebook's CPU claim from measured walls (seconds) of the same N tasks.

    The claim: threads do not speed up CPU-bound Python, processes do. On a GIL build
    (``gil_enabled`` True or None) it holds when threads gain under 1.3x and processes gain at
    least half of ``min(tasks, cores)`` (at least 1.3x); with one usable core processes cannot
    help, and only the thread part is judged. On a free-threaded build threads may help: then
    the claim does not hold here.
    """
    thread_gain = seq / threads if threads > 0 else 0.0
    proc_gain = seq / procs if procs > 0 else 0.0
    parallel = min(tasks, cores) if tasks else cores
    figures = f"threads {thread_gain:.2f}x, processes {proc_gain:.2f}x on {cores} cores"
    threads_help = thread_gain >= 1.3
    if gil_enabled is False:
        if threads_help:
            return Verdict(
                False, f"free-threaded build: threads ran Python in parallel ({figures})"
            )
        return Verdict(True, f"GIL disabled, yet threads gave no speedup ({figures})")
    if threads_help:
        return Verdict(False, f"threads sped up CPU work despite the GIL ({figures})")
    if parallel < 2:
        return Verdict(True, f"threads gave no speedup; one core, so processes cannot ({figures})")
    if proc_gain >= max(1.3, 0.5 * parallel):
        return Verdict(True, f"the GIL serialises threads; processes used the cores ({figures})")
    return Verdict(False, f"processes did not use the {parallel} cores ({figures})")


def _calibrate(seconds: float) -> int:
    """Iterations of :func:`cpu_work` that take about ``seconds`` here."""
    probe = 200_000
    start = time.perf_counter()
    cpu_work(probe)
    rate = probe / max(time.perf_counter() - start, 1e-6)
    return max(10_000, int(rate * seconds))


def _start_workers(pool: TaskPool[int], workers: int) -> None:
    """Run short tasks until every worker process has answered at least once.

    A process that is still booting takes no task, so one round may land on a single worker.
    """
    seen: set[int] = set()
    for _ in range(50):
        for _ in range(workers):
            pool.submit(warm_up, 0.05)
        while (done := pool.wait()) is not None:
            seen.add(done.result())
        if len(seen) >= workers:
            return


def _cpu_phase(mode: Any, workers: int, n: int, iterations: int) -> tuple[float, list[TaskRecord]]:
    """Wall time of ``n`` CPU tasks on a warmed-up pool (process start-up not included)."""
    with TaskPool[int](mode, workers) as pool:
        if mode == "processes":  # spawning is not the claim: start every worker first
            _start_workers(pool, workers)
        start = pool.now()
        for _ in range(n):
            pool.submit(cpu_work, iterations)
        tasks: list[TaskRecord] = []
        while (done := pool.wait()) is not None:
            done.result()
            tasks.append(done.task)
        wall = pool.now() - start
    return wall, [dataclasses.replace(t, start=t.start - start, end=t.end - start) for t in tasks]


@scenario(
    13,
    "cpu-bound",
    "CPU-bound tasks: sequential, threads, processes",
    "For CPU-bound work threads bring no speedup (they may even slow it down); use "
    "processes to run in parallel.",
)
def cpu_bound(scale: float) -> Result:
    cores = usable_cores()
    n = min(8, max(4, cores))
    # A floor on the task length: below ~0.2 s, process hand-off and a busy machine's noise
    # would be measured instead of the claim.
    task_seconds = max(0.2, 1.0 * scale)
    iterations = _calibrate(task_seconds)
    started = time.perf_counter()
    seq, seq_tasks = _cpu_phase("sequential", 1, n, iterations)
    thr, thr_tasks = _cpu_phase("threads", n, n, iterations)
    proc_started = time.perf_counter()
    procs, proc_tasks = _cpu_phase("processes", min(n, cores), n, iterations)
    proc_total = time.perf_counter() - proc_started
    gil = gil_enabled()
    verdict = cpu_verdict(seq, thr, procs, cores, gil, tasks=n)
    tasks = _relabel(seq_tasks, "sequential")
    tasks += _relabel(thr_tasks, "threads", shift=seq + GAP)
    tasks += _relabel(proc_tasks, "processes", shift=seq + thr + 2 * GAP)
    gil_text = "GIL build" if gil is None else ("GIL enabled" if gil else "GIL disabled")
    return _result(
        "cpu-bound",
        scale,
        [
            Figure(
                "sequential", f"{n} tasks sequential", seq, expected=f"about {n * task_seconds:g} s"
            ),
            Figure("threads", f"{n} threads", thr, expected="about the same as sequential"),
            Figure(
                "processes",
                f"{min(n, cores)} processes (warm)",
                procs,
                expected=f"about {seq / min(n, cores):.2f} s",
            ),
            Figure("process_total", "processes incl. start-up", proc_total),
            Figure("thread_gain", "thread speedup", seq / thr, unit="x", expected="about 1x"),
            Figure(
                "process_gain",
                "process speedup",
                seq / procs,
                unit="x",
                expected=f"about {min(n, cores)}x",
            ),
            Figure("cores", "usable cores", cores, unit=""),
        ],
        verdict,
        tasks,
        notes=[
            f"{sys.version.split()[0]}, {gil_text}",
            f"total {time.perf_counter() - started:.1f} s",
        ],
    )


# -- lookup and running ----------------------------------------------------------------------------


# Registration follows the source's order; keep the registry in the notebook's order.
_ordered = sorted(SCENARIOS.values(), key=lambda s: s.number)
SCENARIOS.clear()
SCENARIOS.update((s.name, s) for s in _ordered)


def resolve(names: Iterable[str]) -> list[Scenario]:
    """Scenarios by name or number, in the order given; ``KeyError`` names an unknown one."""
    by_number = {str(s.number): s for s in SCENARIOS.values()}
    chosen: list[Scenario] = []
    for name in names:
        scenario = SCENARIOS.get(name) or by_number.get(name)
        if scenario is None:
            raise KeyError(name)
        chosen.append(scenario)
    return chosen


def run_scenarios(
    scenarios: Iterable[Scenario],
    scale: float = 1.0,
    *,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run scenarios one after another (never concurrently: they measure the machine)."""
    if not 0 < scale <= 10:
        raise ValueError("scale must be > 0 and <= 10")
    results = []
    for scenario in scenarios:
        result = scenario.run(scale)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
