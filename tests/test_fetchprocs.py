"""Fetch worker plumbing: results batched over a real pipe, each delivered exactly once."""

from __future__ import annotations

import multiprocessing
import threading

from fetchpool.engine.backends.processes import _Outbox
from fetchpool.models import Record, TaskRecord


def test_outbox_delivers_every_result_once_in_batches() -> None:
    parent, child = multiprocessing.Pipe()
    outbox = _Outbox(child)
    threads, per_thread = 16, 200
    start = threading.Barrier(threads)

    def produce(worker: int) -> None:
        start.wait()
        for n in range(per_thread):
            task_id = worker * per_thread + n
            record = Record(position=task_id, url=f"http://a.test/{task_id}")
            outbox.put((task_id, record, TaskRecord(task_id, 0.0, 0.0, "", "")))

    producers = [threading.Thread(target=produce, args=(w,)) for w in range(threads)]
    received: list[int] = []
    messages = 0

    def consume() -> None:
        nonlocal messages
        while len(received) < threads * per_thread:
            batch = parent.recv()
            messages += 1
            received.extend(task_id for task_id, record, _ in batch if record.position == task_id)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    consumer.join(timeout=30)
    assert sorted(received) == list(range(threads * per_thread))
    assert 1 <= messages <= threads * per_thread  # batched under contention, never lost


def test_outbox_sends_at_once_when_idle() -> None:
    parent, child = multiprocessing.Pipe()
    outbox = _Outbox(child)
    outbox.put((7, Record(position=7, url="http://a.test/7"), TaskRecord(7, 0.0, 0.0, "", "")))
    assert parent.poll(5)  # no timer, no batch to fill: a quiet run's result travels alone
    [(task_id, record, _)] = parent.recv()
    assert task_id == 7 and record.url == "http://a.test/7"
