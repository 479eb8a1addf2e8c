"""One part of a cluster run, as a Dask task: an ordinary fetchpool run of the part's items.

Runs in a Dask worker. The part's output folder (``DEST/part-K``) has its own journal, so a
task that is rescheduled after its worker died resumes from what was durable, exactly as a
rerun does on one machine; its shards are settled the same way (docs/outputs.md).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from fetchpool.cluster import plan as plans
from fetchpool.config import Options
from fetchpool.engine.pipeline import Pipeline, Report

#: How often a running part looks whether the driver asked the run to stop.
STOP_POLL_SECONDS = 0.5


def run_part(dest: str, index: int, options: Options, stop_event: str | None = None) -> Report:
    """Run part ``index`` of the cluster run in ``dest``; returns its report."""
    _allow_children()
    folder = Path(dest)
    pipeline = Pipeline(plans.part_folder(folder, index), options)
    watcher = _watch_stop(pipeline, stop_event) if stop_event else None
    try:
        source = plans.part_file(folder, index)
        return pipeline.run_items(
            lambda: plans.read_part(folder, index),
            source_name=str(source),
            source_size=source.stat().st_size,
        )
    finally:
        if watcher is not None:
            watcher.set()


def _allow_children() -> None:
    """Dask's nanny starts workers as daemonic processes, which multiprocessing forbids to
    start children; fetchpool's fetch and CPU-stage workers must start all the same. They
    never outlive this process however it ends (:mod:`fetchpool.lifeline`)."""
    process = multiprocessing.current_process()
    if process.daemon:
        # The public setter refuses a started process; the flag is only read by start().
        process._config["daemon"] = False  # type: ignore[attr-defined]


def _watch_stop(pipeline: Pipeline, name: str) -> threading.Event:
    """Stop ``pipeline`` (gracefully) when the driver sets the Dask event ``name``."""
    from distributed import Event, get_client

    # Bound to this worker's client here, in the task's thread: an Event used from another
    # thread without one is "not properly initialized" (and the stop would never be seen).
    event = Event(name, client=get_client())  # type: ignore[no-untyped-call]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                if event.wait(STOP_POLL_SECONDS):  # type: ignore[no-untyped-call]
                    pipeline.stop()
                    return
            except Exception:  # noqa: BLE001 - the scheduler gone: the worker is going too
                return

    threading.Thread(target=watch, name="fetchpool-part-stop", daemon=True).start()
    return done
