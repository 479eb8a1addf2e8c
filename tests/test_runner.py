"""The generic runner: TaskPool and run(), in every mode.

Helpers are module level because process mode pickles them into spawned workers.
Timing bounds are deliberately generous: they separate "concurrent" from "sequential",
not fast from slow.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetchpool.engine import Done, TaskPool, run
from fetchpool.engine.runner import Mode, RemoteTraceback

MODES: list[Mode] = ["threads", "processes", "sequential"]


class Boom(Exception):
    """A picklable task failure."""


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def double(x: int) -> int:
    return 2 * x


def fail_on_three(x: int) -> int:
    if x == 3:
        raise Boom(f"item {x}")
    return x


class Counted:
    """Wraps an iterator and counts how many items were taken from it."""

    def __init__(self, n: int) -> None:
        self.taken = 0
        self._n = n

    def __iter__(self) -> Iterator[int]:
        for i in range(self._n):
            self.taken += 1
            yield i


# -- run(): ordering ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ordered_yields_input_order(mode: Mode) -> None:
    sleeps = [0.25, 0.15, 0.05, 0.0]  # later tasks finish first when run concurrently
    assert list(run(nap, sleeps, mode=mode, workers=4)) == sleeps


@pytest.mark.parametrize("mode", MODES)
def test_results_and_records(mode: Mode) -> None:
    r = run(double, range(20), mode=mode, workers=2)
    assert list(r) == [2 * i for i in range(20)]
    assert sorted(t.index for t in r.tasks) == list(range(20))
    assert all(t.ok and 0 <= t.start <= t.end <= r.wall + 0.01 for t in r.tasks)
    expected_prefix = {"threads": "thread-", "processes": "pid-", "sequential": "main"}[mode]
    assert all(t.worker.startswith(expected_prefix) for t in r.tasks)
    assert len({t.worker for t in r.tasks}) <= 2


def test_unordered_yields_completion_order_threads() -> None:
    sleeps = [0.5, 0.4, 0.3, 0.2, 0.1]
    r = run(nap, sleeps, mode="threads", workers=5, ordered=False)
    assert list(r) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert r.wall < 0.5 * sum(sleeps)
    assert r.gain > 2


def finish_after(args: tuple[str, int]) -> int:
    """Finish 0.3 s after task ``value - 1`` has (marker files): the completion order is set
    by the tasks, not by when each spawned worker happened to start."""
    folder, value = args
    if value > 1:
        while not os.path.exists(os.path.join(folder, str(value - 1))):
            time.sleep(0.01)
        time.sleep(0.3)
    with open(os.path.join(folder, str(value)), "w"):
        pass
    return value


def test_unordered_yields_completion_order_processes(tmp_path: Path) -> None:
    # Spawned workers start at different moments (seconds apart on a loaded machine), so
    # durations measured from each task's start would not fix the order: markers do.
    values = [5, 4, 3, 2, 1]
    r = run(finish_after, [(str(tmp_path), v) for v in values], mode="processes", workers=5,
            ordered=False)  # fmt: skip
    assert list(r) == sorted(values)


def test_unordered_sequential_is_submission_order() -> None:
    sleeps = [0.05, 0.04, 0.03]
    r = run(nap, sleeps, mode="sequential", ordered=False)
    assert list(r) == sleeps
    assert r.wall >= 0.9 * sum(sleeps)
    assert r.gain == pytest.approx(1.0, abs=0.15)


# -- run(): errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_ordered_exception_raised_at_its_turn(mode: Mode) -> None:
    got: list[int] = []
    with pytest.raises(Boom, match="item 3"):
        for value in run(fail_on_three, range(10), mode=mode, workers=3):
            got.append(value)
    assert got == [0, 1, 2]


def test_process_error_carries_remote_traceback() -> None:
    with pytest.raises(Boom) as info:
        list(run(fail_on_three, [3], mode="processes", workers=1))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on_three" in str(info.value.__cause__)


# -- run(): bounded window ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ordered", [True, False])
def test_million_item_generator_is_never_read_ahead(mode: Mode, ordered: bool) -> None:
    source = Counted(1_000_000)
    window = 6
    r = run(double, source, mode=mode, workers=3, ordered=ordered, window=window)
    for yielded, _ in enumerate(r, start=1):
        assert source.taken - yielded <= window
        assert r.ahead <= window
        if yielded == 300:
            break
    assert source.taken <= 300 + window
    assert yielded == 300


def test_ordered_reorder_buffer_counts_against_window() -> None:
    # Task 0 is slow; the others finish quickly and wait in the reorder buffer. The input may
    # not run further ahead than the window while task 0 holds everything up.
    source = Counted(1000)

    def slow_first(x: int) -> int:
        time.sleep(0.3 if x == 0 else 0.0)
        return x

    r = run(slow_first, source, mode="threads", workers=4, window=5)
    first = next(iter(r))
    assert first == 0
    assert source.taken <= 6
    r.close()


def test_keep_tasks_false_keeps_memory_flat() -> None:
    def peak(n: int) -> int:
        tracemalloc.start()
        r = run(double, range(n), mode="sequential", keep_tasks=False)
        total = sum(1 for _ in r)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert total == n and r.tasks == [] and r.busy > 0
        return top

    small, large = peak(2_000), peak(40_000)
    # 20x the items: the peak may wobble, but must not grow with the input.
    assert large < 2 * small + 64 * 1024


# -- run(): shutdown and timing ------------------------------------------------------------------


def test_break_shuts_pool_down_without_leaking_threads() -> None:
    before = threading.active_count()
    r = run(nap, [0.05] * 200, mode="threads", workers=8)
    for i, _ in enumerate(r):
        if i == 2:
            break
    # The for loop's generator closed the run: pool shut down, queued work cancelled.
    assert threading.active_count() == before
    assert len(r.tasks) < 200
    wall = r.wall
    time.sleep(0.02)
    assert r.wall == wall  # fixed once closed


def test_close_after_next_shuts_down() -> None:
    before = threading.active_count()
    with run(nap, [0.01] * 100, workers=4) as r:
        assert next(r) == 0.01
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(r)


def test_threads_overlap_sleeps() -> None:
    sleeps = [0.2] * 8
    r = run(nap, sleeps, mode="threads", workers=8)
    assert list(r) == sleeps
    assert r.wall < 0.5 * sum(sleeps)
    assert r.busy >= 0.9 * sum(sleeps)


def test_processes_time_execution_not_queueing() -> None:
    # One worker, three tasks: each record spans its own sleep, back to back, not the queue.
    r = run(nap, [0.2, 0.2, 0.2], mode="processes", workers=1)
    assert list(r) == [0.2, 0.2, 0.2]
    tasks = sorted(r.tasks, key=lambda t: t.start)
    for task in tasks:
        assert 0.18 <= task.end - task.start < 0.5
    for a, b in itertools.pairwise(tasks):
        assert b.start >= a.end - 0.01
    assert len({t.worker for t in tasks}) == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        run(double, [1], window=0)
    with pytest.raises(ValueError, match="workers"):
        TaskPool(workers=0)
    with pytest.raises(ValueError, match="mode"):
        TaskPool("fibers")  # type: ignore[arg-type]


# -- TaskPool --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pool_wait_delivers_everything(mode: Mode) -> None:
    with TaskPool[int](mode, 3) as pool:
        ids = [pool.submit(fail_on_three, i, label=f"item-{i}") for i in range(6)]
        assert ids == list(range(6))
        dones: list[Done[int]] = []
        while (done := pool.wait(timeout=30)) is not None:
            dones.append(done)
        assert pool.in_flight == 0
    assert sorted(d.task_id for d in dones) == ids
    for d in dones:
        assert d.label == f"item-{d.task_id}" == d.task.label
        assert d.task.index == d.task_id
        assert d.ok == (d.task_id != 3) == d.task.ok
        if d.ok:
            assert d.result() == d.task_id
        else:
            assert isinstance(d.error, Boom)
            with pytest.raises(Boom):
                d.result()


def test_pool_submit_never_blocks_in_sequential_mode() -> None:
    pool: TaskPool[float] = TaskPool("sequential")
    t = time.perf_counter()
    for _ in range(5):
        pool.submit(nap, 0.05)
    assert time.perf_counter() - t < 0.04
    assert pool.in_flight == 5
    done = pool.wait()
    assert done is not None and done.task.worker == "main"
    assert done.task.thread == threading.current_thread().name
    pool.shutdown(cancel=True)
    assert pool.in_flight == 0
    assert pool.wait() is None


@pytest.mark.parametrize("mode", MODES)
def test_pool_on_done_callback(mode: Mode) -> None:
    seen: list[Done[int]] = []
    lock = threading.Lock()

    def on_done(done: Done[int]) -> None:
        with lock:
            seen.append(done)

    pool: TaskPool[int] = TaskPool(mode, 2, on_done=on_done)
    for i in range(5):
        pool.submit(double, i)
    if mode == "threads":
        with pytest.raises(RuntimeError):
            pool.wait()
    pool.shutdown()  # cancel=False: sequential mode runs the queued tasks here
    assert sorted(d.value for d in seen if d.value is not None) == [0, 2, 4, 6, 8]
    assert pool.in_flight == 0


def test_pool_shutdown_cancel_drops_queued_tasks() -> None:
    pool: TaskPool[float] = TaskPool("threads", 1)
    for _ in range(20):
        pool.submit(nap, 0.05)
    t = time.perf_counter()
    pool.shutdown(cancel=True)
    assert time.perf_counter() - t < 0.5  # only the running task was waited for
    assert pool.in_flight <= 1
    with pytest.raises(RuntimeError):
        pool.submit(nap, 0)


def test_pool_wait_timeout_and_injected_clock() -> None:
    ticks = iter(float(i) for i in range(1000))
    pool: TaskPool[float] = TaskPool("threads", 1, clock=lambda: next(ticks))
    pool.submit(nap, 0.3)
    assert pool.wait(timeout=0.01) is None
    done = pool.wait(timeout=5)
    assert done is not None
    # The fake clock ticked once at creation, then once at start and at end of the task.
    assert done.task.end - done.task.start == 1.0
    pool.shutdown()
