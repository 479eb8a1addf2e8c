"""RELIABILITY.md adversarial cases 36-42: local environment, crashes and load.

The kill -9 loop (cases 39/40) and the signal matrix are in ``test_durability.py``, run for
every output format and fetch engine (case 43).

The CLI runs in a subprocess (``python -m fetchpool get ...``) against an origin served by
this test process, so ``kill -9``, signals, ``ulimit -n`` and exit codes are the real ones.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fetchpool import ErrorCode, Origin, Status, download
from fetchpool.state.journal import iter_journal
from reliability_helpers import (
    LOOPBACK,
    cli,
    cli_env,
    final_files,
    leftovers,
    mounted_tmpfs,
    on_engine,
    records,
    require_loopback_address,
    sha,
    skip_processes,
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _on_every_engine(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case runs on every engine (``engine``: conftest, over ENGINES): ``download()``
    and ``fetchpool get`` in this module get ``--engine``."""
    on_engine(sys.modules[__name__], engine, monkeypatch)


def write_urls(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(f"{u}\n" for u in urls))
    return path


def run_cli(*args: str, timeout: float = 120, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(), check=False,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def journal(out: Path) -> list:  # type: ignore[type-arg]
    return list(iter_journal(out))


def assert_done_implies_file(out: Path) -> int:
    """Case 40's invariant: every ``ok`` row names a file with exactly the journaled bytes."""
    ok = 0
    for record in iter_journal(out):
        if record.status is Status.OK and record.error_code is None:
            assert record.path, record
            data = (out / record.path).read_bytes()
            assert len(data) == record.bytes and sha(data) == record.sha256, record
            ok += 1
    return ok


# ============================================================================ 36 disk full


def _payload_urls(origin: Origin, count: int, size: int) -> list[str]:
    return [origin.url(f"/bytes/{size + i}") for i in range(count)]


def _check_disk_full(origin: Origin, out: Path, report: object, urls: list[str]) -> None:
    fatal = (report.fatal or "").lower()  # type: ignore[attr-defined]
    assert "space" in fatal or "disk" in fatal, fatal
    assert report.exit_code == 2  # type: ignore[attr-defined]
    got = records(report)
    # The item(s) that hit the full disk (one per busy thread at most) are unfinished, not
    # failed and not journaled: they did nothing wrong, so the next run simply fetches them.
    assert 1 <= report.unfinished <= 2, report  # type: ignore[attr-defined]
    assert ErrorCode.DISK_FULL not in report.errors  # type: ignore[attr-defined]
    assert {r.error_code for r in got} == {None}, Counter(r.error_code for r in got)
    ok = [r for r in got if r.ok]
    assert ok, "earlier files were written before the disk filled up"
    assert len(got) < len(urls), "the run stopped early"
    for record in ok:  # earlier files intact
        size = int(record.url.rsplit("/", 1)[1])
        assert (out / (record.path or "")).read_bytes() == origin.payload_bytes(size)
    assert len(final_files(out)) == len(ok)
    assert leftovers(out) == []


def test_case_36_disk_full_on_a_small_tmpfs(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with mounted_tmpfs(out, "size=3m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here; see the injected variant below")
        urls = _payload_urls(origin, 30, 300_000)
        report = download(urls, out, threads=2, **LOOPBACK)
        _check_disk_full(origin, out, report, urls)


def _inject_enospc(monkeypatch: pytest.MonkeyPatch, on_call: int) -> None:
    """The disk fills while the ``on_call``-th temp file is written (its first write fails)."""
    from fetchpool import fsutil

    real_create, real_write = fsutil.create_temp_fd, fsutil.write_all
    state: dict[str, int | None] = {"files": 0, "doomed": None}

    def create_temp_fd(directory: object, *args: object) -> tuple[int, str]:
        fd, path = real_create(directory, *args)  # type: ignore[arg-type]
        state["files"] = (state["files"] or 0) + 1
        if state["files"] == on_call:
            state["doomed"] = fd
        return fd, path

    def write_all(fd: int, data: bytes) -> None:
        if fd == state["doomed"]:
            state["doomed"] = None
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(fsutil, "create_temp_fd", create_temp_fd)
    monkeypatch.setattr(fsutil, "write_all", write_all)


def test_case_36_disk_full_injected(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    skip_processes(engine, "the temp file layer (fsutil)")
    _inject_enospc(monkeypatch, on_call=4)
    out = tmp_path / "out"
    urls = _payload_urls(origin, 30, 50_000)
    report = download(urls, out, threads=1, **LOOPBACK)
    _check_disk_full(origin, out, report, urls)
    # Space is back: the same command resumes and finishes everything.
    monkeypatch.undo()
    again = download(urls, out, threads=4, **LOOPBACK)
    assert again.exit_code == 0 and again.resumed == 3
    assert assert_done_implies_file(out) == len(urls)


def test_case_36_plain_rerun_after_disk_full_retries_the_item(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    skip_processes(engine, "the temp file layer (fsutil)")
    _inject_enospc(monkeypatch, on_call=2)
    out = tmp_path / "out"
    urls = _payload_urls(origin, 5, 50_000)
    assert download(urls, out, threads=1, **LOOPBACK).exit_code == 2
    monkeypatch.undo()
    again = download(urls, out, threads=1, **LOOPBACK)
    assert again.exit_code == 0, again.errors
    assert assert_done_implies_file(out) == len(urls)


# ============================================================================ 37 bad output dir


def _bad_outputs(tmp_path: Path) -> list[tuple[str, Path]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return [
        ("is a file", a_file),
        ("missing parent", tmp_path / "no" / "such" / "parent" / "out"),
        ("inside a file", a_file / "out"),
    ]


def test_case_37_unusable_output_fails_fast_before_any_request(
    origin: Origin, tmp_path: Path
) -> None:
    src = write_urls(tmp_path / "urls.txt", [origin.image_url(n) for n in range(3)])
    cases = _bad_outputs(tmp_path)
    readonly = tmp_path / "ro"
    with mounted_tmpfs(readonly, "ro,size=1m") as mounted:
        if mounted:
            cases += [("read-only", readonly), ("read-only parent", readonly / "out")]
        for label, out in cases:
            began = time.monotonic()
            done = run_cli("get", str(src), "-o", str(out), "--allow-private-networks", "-q")
            assert done.returncode == 2, (label, done.stdout, done.stderr)
            assert "fetchpool:" in done.stderr and str(out.name) in done.stderr, label
            assert time.monotonic() - began < 20, label
    assert origin.requests() == [], "no download may start with an unusable output folder"
    assert (tmp_path / "a-file").read_text() == "not a folder"
    assert not (tmp_path / "no").exists()


# ============================================================================ 38 fsync error


def test_case_38_fsync_io_error_never_marks_the_item_done(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    skip_processes(engine, "os.fsync")
    real_fsync = os.fsync
    broken = {"left": 1}

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if broken["left"] and "/.fetchpool/tmp/.fp-" in target:
            broken["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    urls = [origin.image_url(n) for n in range(4)]
    report = download(urls, out, threads=1, **LOOPBACK)
    got = records(report)
    failed = [r for r in got if not r.ok]
    assert len(failed) == 1 and failed[0].error_code is ErrorCode.IO_ERROR, got
    assert failed[0].path is None and "Input/output error" in (failed[0].error_message or "")
    assert report.exit_code == 1 and report.fatal is None
    assert len(final_files(out)) == 3 and leftovers(out) == []
    assert assert_done_implies_file(out) == 3
    monkeypatch.setattr(os, "fsync", real_fsync)
    origin.reset_counters()
    again = download(urls, out, retry_failed=True, **LOOPBACK)
    assert again.exit_code == 0 and again.resumed == 3
    assert [r.path for r in origin.requests()] == [f"/img/{failed[0].position}.jpg"]
    assert assert_done_implies_file(out) == 4


# ============================================================================ 39/40 kill -9


def _check_final_state(origin: Origin, out: Path, count: int) -> None:
    rows = journal(out)
    assert len(rows) == count and all(r.status is Status.OK for r in rows), Counter(
        (r.status, r.error_code) for r in rows
    )
    files = final_files(out)
    assert len(files) == count, "every file present exactly once"
    by_name = {p.name: p for p in files}
    for row in rows:
        assert row.path in by_name
        n = int(row.url.rsplit("/", 1)[1].split(".")[0])
        assert sha(by_name[row.path].read_bytes()) == sha(origin.image_bytes(n, small=True))
    assert not any("-2." in name for name in by_name), "no duplicate variants"
    assert leftovers(out) == []


# The kill -9 loop itself (cases 39, 40, 43) runs for every output format, both fetch engines
# and the CPU stage in tests/test_durability.py, with the checks above after every kill.


# ============================================================================ 41 signals, lock


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_case_41_signal_stops_gracefully_and_the_next_run_resumes(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    count = 120
    with Origin(latency=0.2) as origin:
        src = write_urls(
            tmp_path / "urls.txt", [origin.image_url(n, small=True) for n in range(count)]
        )
        out = tmp_path / "out"
        args = cli("get", str(src), "-o", str(out), "--allow-private-networks", "-q",
                   "--threads", "4", "--per-host", "4")  # fmt: skip
        proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while len(origin.requests()) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            # A second run on the same OUT while this one holds it: refused at once.
            second = run_cli(*args[3:], timeout=60)
            assert second.returncode == 2, second.stderr
            assert "locked" in second.stderr or "in use" in second.stderr
            assert f"pid {proc.pid}" in second.stderr
            proc.send_signal(sig)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == code, stderr
        rows = journal(out)
        assert 0 < len(rows) < count, "stopped part-way, finished work saved"
        assert all(r.status is Status.OK for r in rows)
        assert leftovers(out) == [] or all(".fetchpool/tmp" in p for p in leftovers(out))
        done_before = {r.url for r in rows}
        origin.reset_counters()
        again = run_cli(*args[3:], timeout=120)
        assert again.returncode == 0, again.stderr
        fetched_again = {origin.url(r.path) for r in origin.requests()}
        assert not (fetched_again & done_before), "finished items are not fetched again"
        _check_final_state(origin, out, count)


# ============================================================================ 42 load


def _max_overlap(times: list[float], hold: float) -> int:
    """Most requests in flight at once, counting each as busy for ``hold`` seconds."""
    events = sorted([(t, 1) for t in times] + [(t + hold, -1) for t in times])
    busy = peak = 0
    for _, step in events:
        busy += step
        peak = max(peak, busy)
    return peak


def test_case_42_many_hosts_one_slow_low_ulimit_all_terminal(tmp_path: Path) -> None:
    hosts = 20
    per_host = 4
    fast_latency, slow_latency = 0.05, 0.6
    require_loopback_address("127.0.0.21")
    origins = [
        Origin(host=f"127.0.0.{2 + i}", latency=slow_latency if i == 0 else fast_latency)
        for i in range(hosts)
    ]
    for origin in origins:
        origin.start()
    try:
        slow = origins[0]
        urls = []
        for i in range(5000):
            if i % 100 == 0:  # 50 slow URLs, spread through the input
                urls.append(slow.url(f"/bytes/{64 + i}"))
            else:
                urls.append(origins[1 + i % (hosts - 1)].url(f"/bytes/{64 + i}"))
        src = write_urls(tmp_path / "urls.txt", urls)
        out = tmp_path / "out"
        began = time.monotonic()
        command = cli("get", str(src), "-o", str(out), "--allow-private-networks", "-q",
                      "--threads", "64", "--per-host", str(per_host))  # fmt: skip
        done = subprocess.run(
            ["sh", "-c", 'ulimit -n 256 && exec "$@"', "sh", *command],
            env=cli_env(), capture_output=True, text=True, timeout=170, check=False,
        )  # fmt: skip
        elapsed = time.monotonic() - began
        assert done.returncode == 0, done.stderr[-2000:]
        rows = journal(out)
        assert len(rows) == len(urls) and all(r.status is Status.OK for r in rows)
        for origin in origins:
            times = [r.time for r in origin.requests("/bytes/")]
            hold = (slow_latency if origin is slow else fast_latency) * 0.8
            assert _max_overlap(times, hold) <= per_host, origin
        assert len(slow.requests("/bytes/")) == 50
        assert elapsed < 160
    finally:
        for origin in origins:
            origin.stop()


def test_case_42_fetch_concurrency_fits_in_ulimit_n(engine: str) -> None:
    if engine != "threads":
        pytest.skip("a unit test of client.fd_budget, which every engine sizes itself by")
    from fetchpool.fetch.client import FD_RESERVE, fd_budget

    for soft in (64, 100, 256, 1024, 65536):
        for threads in (1, 32, 256, 4096):
            concurrent, idle = fd_budget(threads, soft)
            assert 1 <= concurrent <= threads and idle >= 1
            if soft >= FD_RESERVE + 3 * threads:
                assert concurrent == threads  # a roomy limit never slows a run down
            if soft >= FD_RESERVE + 3:
                # sockets + temp files of running fetches + idle pooled sockets fit
                assert FD_RESERVE + 2 * concurrent + idle <= soft
