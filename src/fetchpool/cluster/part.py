"""One part of a cluster run, as a Dask task: an ordinary fetchpool run of the part's items.

Runs in a Dask worker. Where the part works depends on the destination:

* a folder on a local disk (``--cluster local:N`` writing to this machine): in place, in
  ``DEST/part-K``, with its own journal;
* object storage (``s3://…``) or a network filesystem (NFS, Lustre, a FUSE bucket mount):
  on the worker's local scratch (``<dask temporary-directory or TMPDIR>/fetchpool-scratch``),
  where SQLite's locking holds; the finished part is then *published*: what a killed
  publish left is removed, every output file is uploaded whole, then the part's records,
  then its ``.done`` marker. A reader of the destination never sees a partial file, and a part
  with its marker is never published again.

Either way a task rescheduled after its worker died resumes from what was durable, exactly as
a rerun does on one machine (on scratch: when it lands on the same machine; elsewhere the part
starts over, which costs time, never a duplicate). The part writes its own ``.done`` marker
last, so a driver killed at any moment resubmits only the parts without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import tempfile
import threading
from functools import partial
from pathlib import Path
from typing import Any

from fetchpool import fsutil
from fetchpool.cluster import plan as plans
from fetchpool.config import Options
from fetchpool.engine.pipeline import Pipeline
from fetchpool.models import Report, Status
from fetchpool.state.journal import iter_journal
from fetchpool.state.paths import STATE_DIR, part_input_name, part_name, part_records_name
from fetchpool.storage import Store

#: How often a running part looks whether the driver asked the run to stop, and sends the
#: driver its progress.
STOP_POLL_SECONDS = 0.5


def run_part(
    dest: str,
    index: int,
    options: Options,
    stop_event: str | None = None,
    progress_topic: str | None = None,
) -> Report:
    """Run part ``index`` of the cluster run in ``dest``; returns its report."""
    _allow_children()
    store = Store(dest, options.storage_options)
    done = plans.read_done(store, index)
    if done is not None:  # finished and published by an earlier attempt: nothing to redo
        return report_of_done(done, Path(dest))
    plan = plans.load(store)
    in_place = not store.remote and not fsutil.on_network_filesystem(store.path)
    work = store.path / part_name(index) if in_place else scratch_folder(store, plan, index)
    pipeline = Pipeline(work, options)
    watcher = _watch(pipeline, index, stop_event, progress_topic)
    try:
        report = pipeline.run_items(
            lambda: plans.read_part(store, index),
            source_name=store.display(part_input_name(index)),
            source_size=store.size(part_input_name(index)),
        )
    finally:
        watcher.set()
    if report.fatal or report.interrupted:
        return report  # the next attempt or run resumes it (its journal is kept)
    if not in_place:
        publish(store, work, index)
    plans.write_done(store, index, summary_of(report))
    if not in_place:  # published: the scratch copy has served
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(work.parent)  # the run's scratch folder, once its last part is gone
    return report


def scratch_folder(store: Store, plan: plans.Plan | None, index: int) -> Path:
    """Part ``index``'s working folder on this machine's local scratch, the same for every
    attempt of the same part of the same run (so a rescheduled attempt here resumes)."""
    import dask

    root = dask.config.get("temporary-directory", None) or tempfile.gettempdir()
    run = f"{store.url}\n{plan.fingerprint if plan else ''}\n{plan.parts if plan else ''}"
    key = hashlib.sha256(run.encode()).hexdigest()[:16]
    folder = Path(root) / "fetchpool-scratch" / f"run-{key}" / part_name(index)
    for _ in range(3):  # another part may remove the run's folder in between (when empty)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            break
        except FileNotFoundError:
            continue
    return folder


def publish(store: Store, work: Path, index: int) -> None:
    """Publish finished part ``index`` from ``work`` into ``store`` (see the module doc)."""
    prefix = part_name(index)
    store.remove_tree(prefix)  # what a killed publish of this part left
    files = [
        (found, f"{prefix}/{found.relative_to(work).as_posix()}")
        for found in sorted(work.rglob("*"))
        if found.is_file() and STATE_DIR not in found.relative_to(work).parts
    ]
    store.put_files(files)
    from fetchpool.state.exported import export_records

    with tempfile.TemporaryDirectory(dir=work / STATE_DIR) as folder:
        local = Path(folder) / "records.jsonl.gz"
        with local.open("wb") as target:
            export_records(work, target)
        store.put_file(local, part_records_name(index))


def summary_of(part: Report) -> dict[str, Any]:
    """What a ``.done`` marker keeps of a finished part's report."""
    return {
        "items": part.items,
        "counts": {str(status): n for status, n in part.counts.items()},
        "errors": {str(code): n for code, n in part.errors.items()},
        "failed": part.failed,
        "bytes": part.bytes,
    }


def report_of_done(done: dict[str, Any], out: Path) -> Report:
    """A finished part's report as its ``.done`` marker keeps it (every item resumed)."""
    report = Report(out=out, source=partial(iter_journal, out))
    for status, n in done.get("counts", {}).items():
        report.counts[Status(status)] = n
    for code, n in done.get("errors", {}).items():
        report.errors[code] = n
        report.resumed_errors[code] = n
    report.items = report.resumed = int(done.get("items", 0))
    report.resumed_failed = int(done.get("failed", 0))
    return report


def _allow_children() -> None:
    """Dask's nanny starts workers as daemonic processes, which multiprocessing forbids to
    start children; fetchpool's fetch and CPU-stage workers must start all the same. They
    never outlive this process however it ends (:mod:`fetchpool.lifeline`)."""
    process = multiprocessing.current_process()
    if process.daemon:
        # The public setter refuses a started process; the flag is only read by start().
        process._config["daemon"] = False  # type: ignore[attr-defined]


def _watch(
    pipeline: Pipeline, index: int, stop_event: str | None, progress_topic: str | None
) -> threading.Event:
    """Stop ``pipeline`` (gracefully) when the driver sets the Dask event ``stop_event``,
    and send the driver the part's progress under ``progress_topic`` meanwhile."""
    done = threading.Event()
    if stop_event is None and progress_topic is None:
        return done
    from distributed import Event, get_client, get_worker

    # Bound to this worker's client here, in the task's thread: an Event used from another
    # thread without one is "not properly initialized" (and the stop would never be seen).
    event = Event(stop_event, client=get_client()) if stop_event else None  # type: ignore[no-untyped-call]
    worker = get_worker() if progress_topic else None

    def send_progress() -> None:
        if worker is not None and progress_topic is not None:
            report = pipeline.report
            progress = [index, report.items, report.failed, report.bytes]
            with contextlib.suppress(Exception):  # progress is best effort
                worker.log_event(progress_topic, progress)

    def watch() -> None:
        while not done.is_set():
            try:
                if event is not None and event.wait(STOP_POLL_SECONDS):  # type: ignore[no-untyped-call]
                    if not done.is_set():  # set after the part ended: the run is over
                        pipeline.stop()
                    return
                if event is None:
                    done.wait(STOP_POLL_SECONDS)
            except Exception:  # noqa: BLE001 - the scheduler gone: the worker is going too
                return
            send_progress()

    threading.Thread(target=watch, name="fetchpool-part-watch", daemon=True).start()
    return done
