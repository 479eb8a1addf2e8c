"""Stopping a run, and the failure windows of publishing a shard: regression tests for the
review of the durability work (issue 10). Library level, real origin and process pools."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from fetchpool import Origin, Status, download, fsutil
from fetchpool.config import Options
from fetchpool.engine.loop import RunLoop
from fetchpool.engine.pipeline import Pipeline
from fetchpool.errors import OutputError
from fetchpool.events import Event, ItemFinished

LOOPBACK = {"allow_private_networks": True}


def tar_keys(out: Path) -> Counter[str]:
    seen: Counter[str] = Counter()
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            seen.update({m.name.split(".")[0] for m in tar.getmembers()})
    return seen


@pytest.mark.parametrize("fault", ["eio", "interrupt"])
def test_a_failure_after_the_shard_got_its_name_never_duplicates_its_samples(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The link succeeded, then the folder's fsync failed (or Ctrl-C landed): the shard's
    staged rows must stay, so the next run settles them instead of fetching the samples into
    a second shard."""
    real_publish = fsutil.publish
    calls = {"n": 0}

    def publish_then_fail(temp: str, final: str, *, sync_dir: bool = True) -> bool:
        linked = real_publish(temp, final, sync_dir=False)
        calls["n"] += final.endswith(".tar")  # the shard itself (its companions come first)
        if calls["n"] == 1 and final.endswith(".tar"):
            if fault == "eio":
                raise OutputError("cannot publish: Input/output error")
            raise KeyboardInterrupt
        return linked

    out = tmp_path / "out"
    urls = [origin.image_url(i) for i in range(8)]
    options = {"format": "webdataset", "shard_size": 4, "threads": 1, **LOOPBACK}
    monkeypatch.setattr(fsutil, "publish", publish_then_fail)
    try:
        download(urls, out, **options)
    except KeyboardInterrupt:
        assert fault == "interrupt"
    monkeypatch.setattr(fsutil, "publish", real_publish)
    again = download(urls, out, **options)
    assert again.exit_code == 0
    keys = tar_keys(out)
    assert sorted(keys) == [f"{i:09d}" for i in range(8)]
    assert set(keys.values()) == {1}, "no sample in two shards"
    assert [r.status for r in again.records()] == [Status.OK] * 8


def test_a_refused_input_leaves_no_row_even_past_the_first_batch(
    origin: Origin, tmp_path: Path
) -> None:
    """Admission stops at the refusal: later batches (positions the folder never had, where
    no prior can differ) must not journal bad lines or duplicates that would then block the
    legitimate input."""
    out = tmp_path / "out"
    first = [origin.image_url(i) for i in range(10)]
    assert download(first, out, **LOOPBACK).exit_code == 0
    other = [origin.image_url(100 + i) for i in range(300)]
    other[256] = "not a url"
    other[270] = first[0]  # a duplicate of a file already there
    refused = download(other, out, **LOOPBACK)
    assert refused.fatal_kind == "input_mismatch"
    assert [r.position for r in refused.records()] == list(range(10))
    grown = download([*first, origin.image_url(50)], out, **LOOPBACK)
    assert grown.exit_code == 0 and grown.resumed == 10


def test_a_graceful_stop_waits_without_spinning(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry due while the run settles after a stop must not turn the wait into a busy
    loop (it held the GIL against the fetch threads): the loop wakes about once a second."""
    calls = {"n": 0, "counting": False}
    real_wait = RunLoop._wait_for_events

    def counting(self: RunLoop, *args: object, **kwargs: object) -> None:
        calls["n"] += calls["counting"]
        real_wait(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RunLoop, "_wait_for_events", counting)
    urls = [origin.url("/status/503?retry_after=1")]
    urls += [origin.image_url(i) + "?latency=2" for i in range(3)]
    options = Options.from_kwargs(threads=8, backoff_base=0.05, backoff_max=0.1, **LOOPBACK)
    run = Pipeline(tmp_path / "out", options)

    def stop() -> None:
        calls["counting"] = True
        run.stop()

    timer = threading.Timer(0.5, stop)
    timer.start()
    report = run.run(urls)
    timer.join()
    assert report.ok == 3 and report.interrupted
    assert calls["n"] < 50, calls


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_a_hurried_stop_with_the_cpu_stage_returns_cleanly(tmp_path: Path, fmt: str) -> None:
    """Fetch threads are not waited for when hurried: a result arriving after the CPU stage
    closed is dropped as unfinished, not submitted to the closed stage (which raised)."""
    with Origin(latency=0.2, jitter=0.4) as origin:
        urls = [origin.image_url(i, small=True) for i in range(300)]
        options = Options.from_kwargs(threads=48, per_host=48, resize=32, processes=2,
                                      format=fmt, shard_size=50, **LOOPBACK)  # fmt: skip
        started = threading.Event()
        runs: list[Pipeline] = []

        class HurryAfterTheFirstItem:
            def on_event(self, event: Event) -> None:
                if isinstance(event, ItemFinished) and not started.is_set():
                    started.set()
                    threading.Timer(0.3, lambda: runs[0].stop(hurry=True)).start()

        runs.append(Pipeline(tmp_path / "out", options, observers=[HurryAfterTheFirstItem()]))
        report = runs[0].run(urls)
    assert report.interrupted and report.fatal is None
    assert report.unfinished > 0, "fetches abandoned in flight are counted"
    rows = list(report.records())
    assert rows and all(r.status is Status.OK for r in rows)
    assert report.ok == len(rows) - report.resumed


def test_worker_processes_left_running_do_not_hang_interpreter_exit(tmp_path: Path) -> None:
    """Workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join) would
    wait forever for a pool whose shutdown() never ran: fetchpool kills them at exit."""
    script = (
        "import threading\n"
        "from functools import partial\n"
        "from fetchpool.config import FetchConfig\n"
        "from fetchpool.engine.backends.processes import ProcessFetchPool, WorkerSpec\n"
        "from fetchpool.engine.backends.shared import http_fetcher\n"
        "from fetchpool.models import Job\n"
        "if __name__ == '__main__':\n"
        "    answered = threading.Event()\n"
        "    fetcher = partial(http_fetcher, FetchConfig())\n"
        f"    spec = WorkerSpec(FetchConfig(), {str(tmp_path)!r}, fetcher)\n"
        "    pool = ProcessFetchPool(spec, 1, lambda done: answered.set())\n"
        # A job the guard refuses at once: its answer proves the worker is up (and ignoring
        # SIGTERM) before this process exits without shutdown().
        "    pool.submit(Job(0, 'http://127.0.0.1:9/x'))\n"
        "    pool.flush()\n"
        "    assert answered.wait(60)\n"
        "    print('started', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0 and "started" in done.stdout, done.stderr
