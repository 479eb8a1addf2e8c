"""RELIABILITY.md cases 39-46 (issue 10): durability of every format and engine under kills.

The CLI runs in a subprocess (``python -m fetchpool get ...``), in its own session and tagged
through its environment (:data:`durability_helpers.TAG_VAR`), against an origin served by this
test process, so ``kill -9``, signals to the pid or the process group, exit codes and leftover
children are the real ones.

* 39/43: a ``kill -9`` loop over every output format, both fetch engines and the CPU stage,
  with kills at start-up (before or while the journal is created) and mid-run; after each kill
  the manifest reads, every ``ok`` row has its output, no sample is in two shards, no temp
  file is outside ``.fetchpool/tmp`` and no child survives; the final rerun converges.
* 44: a different input into a used folder is refused before any request; the same input
  and a grown one resume.
* 45: a journal killed before its schema exists reads as empty, and the next run works.
* 41/43: SIGINT/SIGTERM, to the pid or the group, once or twice: the right exit code, no
  child left, nothing journaled as failed, the journal not behind the files, a clean resume.
* 46: children never outlive a ``kill -9`` of the parent.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from durability_helpers import (
    all_shard_keys,
    assert_has_output,
    check_after_kill,
    check_complete,
    cli_manifest_rows,
    describe,
    key_of,
    kill_tagged,
    manifest_rows,
    metadata_keys,
    output_format,
    run_get,
    shard_files,
    spawn_get,
    stray_temp_files,
    tagged_pids,
    url_path,
    wait_for,
    wait_no_tagged_processes,
    wait_tagged_processes,
    write_urls,
)
from engines import ENGINES, engine_args
from fetchpool import Origin, Status
from fetchpool.state.journal import iter_journal
from reliability_helpers import final_files, leftovers, sha

pytestmark = pytest.mark.slow

WDS = ("--format", "webdataset", "--shard-size", "25")
PARQUET = ("--format", "parquet", "--shard-size", "25")
FETCH_PROCESSES = ("--fetch-processes", "2")
RESIZE = ("--resize", "32", "--processes", "2")
MULTIPLEXED = engine_args("multiplexed")


@pytest.fixture
def tag() -> Iterator[str]:
    """A tag for this test's processes; whatever still carries it at the end is killed."""
    value = uuid.uuid4().hex
    yield value
    kill_tagged(value)


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


# ============================================================================ 39/43 kill -9 loop

KILL_VARIANTS: dict[str, tuple[str, ...]] = {
    "files": (),
    "webdataset": WDS,
    "parquet": PARQUET,
    "files-fetch-processes": FETCH_PROCESSES,
    "webdataset-fetch-processes": (*WDS, *FETCH_PROCESSES),
    "parquet-fetch-processes": (*PARQUET, *FETCH_PROCESSES),
    "files-resize": RESIZE,
    "webdataset-resize": (*WDS, *RESIZE),
    "files-multiplexed": MULTIPLEXED,  # publishing on finisher threads, through the gate
    "webdataset-multiplexed": (*WDS, *MULTIPLEXED),
}

#: Where each kill lands. "journal": as soon as ``state.db`` appears in a fresh OUT (before or
#: while its schema is committed); "early": 0-150 ms after Popen; "mid": after a random share
#: of the work left, counted in requests the origin has seen from this run; "late": right after
#: this run published outputs (a random number of files, or one shard), before or while their
#: rows are committed.
KILL_PLAN = ("journal", "early", "mid", "late", "early", "mid", "late", "early", "mid", "late")
KILL_ITEMS = 160


def _outputs(out: Path, fmt: str) -> int:
    """Final files (files format) or published shards in OUT."""
    if fmt == "files":
        return sum(not p.name.startswith(".fp-") for p in final_files(out))
    return len(shard_files(out))


def _run_killed(
    args: list[str],
    tag: str,
    log: Path,
    run: int,
    kind: str,
    *,
    out: Path,
    fmt: str,
    origin: Origin,
    remaining: int,
    rng: random.Random,
) -> int:
    """Start run ``run`` of ``fetchpool get args`` (stderr appended to ``log``), land the
    kill ``kind`` (see :func:`_land_kill`), and return the exit status once it has ended."""
    outputs_before = _outputs(out, fmt) if out.exists() else 0
    origin.reset_counters()
    with log.open("ab") as stderr:
        stderr.write(f"--- run {run} ({kind})\n".encode())
        stderr.flush()
        proc = spawn_get(args, tag, stderr=stderr)
    try:
        _land_kill(
            kind,
            proc,
            out=out,
            fmt=fmt,
            origin=origin,
            remaining=remaining,
            outputs_before=outputs_before,
            rng=rng,
        )
    finally:
        if proc.poll() is None:  # _land_kill raised
            proc.kill()
        proc.wait(timeout=60)
    return proc.returncode


def _land_kill(
    kind: str,
    proc: subprocess.Popen[bytes],
    *,
    out: Path,
    fmt: str,
    origin: Origin,
    remaining: int,
    outputs_before: int,
    rng: random.Random,
) -> None:
    """Wait for the moment ``kind`` names, then SIGKILL the parent pid (only)."""
    if kind == "journal":
        db = out / ".fetchpool" / "state.db"
        wait_for(db.exists, proc, 60, interval=0.0005)
    elif kind == "early":
        time.sleep(rng.uniform(0.0, 0.15))  # a random kill moment, not a synchronisation
    elif kind == "mid":
        threshold = rng.randint(1, max(1, remaining * 4 // 5))
        wait_for(lambda: len(origin.requests()) >= threshold, proc, 60)
    else:
        step = rng.randint(1, max(1, remaining * 3 // 4)) if fmt == "files" else 1
        wait_for(lambda: _outputs(out, fmt) >= outputs_before + step, proc, 60, interval=0.002)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", list(KILL_VARIANTS.values()), ids=list(KILL_VARIANTS))
def test_case_39_43_kill_9_loop_converges_for_every_format_and_engine(
    tmp_path: Path, tag: str, extra: tuple[str, ...]
) -> None:
    rng = random.Random(f"39 {' '.join(extra)}")
    fmt = output_format(extra)
    count = KILL_ITEMS
    with Origin(latency=0.05, jitter=0.02) as origin:
        src = write_urls(
            tmp_path / "urls.txt", [origin.image_url(n, small=True) for n in range(count)]
        )
        out = tmp_path / "out"
        args = [str(src), "-o", str(out), "--threads", "8", "--per-host", "8", *extra]
        log = tmp_path / "stderr.log"
        kills = partial = cli_checks = finished_early = 0
        landed: Counter[str] = Counter()
        remaining = count
        for run in range(3 * len(KILL_PLAN)):
            if kills == len(KILL_PLAN):
                break
            kind = KILL_PLAN[kills]
            code = _run_killed(
                args,
                tag,
                log,
                run,
                kind,
                out=out,
                fmt=fmt,
                origin=origin,
                remaining=remaining,
                rng=rng,
            )
            assert code in (0, -signal.SIGKILL), (
                f"run {run} ({kind}) exited {code} by itself:\n{_tail(log)}"
            )
            left = wait_no_tagged_processes(tag, 10.0)
            assert left == [], (
                f"processes outlived the kill -9 of run {run} ({kind}): {describe(left)}"
            )
            use_cli = (out / ".fetchpool" / "state.db").exists() and (
                cli_checks == 0 or kills == len(KILL_PLAN) - 1
            )
            ok, outputs = check_after_kill(out, fmt, use_cli=use_cli)
            cli_checks += use_cli
            remaining = count - ok
            if code == -signal.SIGKILL:
                kills += 1
                landed[kind] += 1
                partial += 0 < max(ok, outputs) < count
            else:
                finished_early += 1
                if finished_early >= 2:
                    # The runs got through before the kills: start over so kills land mid-run.
                    shutil.rmtree(out)
                    finished_early = 0
                    remaining = count
        assert kills == len(KILL_PLAN), f"only {kills} kills landed: {landed}"
        assert cli_checks >= 1, "fetchpool manifest was checked after at least one kill"
        final = run_get(args, tag, timeout=180)
        assert final.returncode == 0, final.stderr[-3000:]
        left = wait_no_tagged_processes(tag, 10.0)
        assert left == [], describe(left)
        check_complete(origin, out, fmt, count, resized="--resize" in extra)
        assert len(cli_manifest_rows(out)) == count
        print(f"kill -9 loop {extra}: {kills} kills {dict(landed)}, {partial} mid-run")
        assert partial >= 3, f"the kills must land while work is in progress ({partial})"


# ================================================= 39/43 kill -9 with failures: shard metadata

#: Rows 40-79 fail (404): shards of --shard-size 10 then hold failures beside samples, and
#: some hold only failures (a WebDataset one is its metadata ``NNNNN.parquet`` alone).
METADATA_ITEMS = 120
FAILING = range(40, 80)
METADATA_KILLS = ("early", "mid", "late", "mid", "late", "late")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", [engine_args(e) for e in ENGINES], ids=ENGINES)
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_case_39_43_after_kills_each_row_is_in_one_shards_metadata_with_matching_stats(
    tmp_path: Path, tag: str, fmt: str, engine: tuple[str, ...]
) -> None:
    rng = random.Random(f"39 metadata {fmt} {engine}")
    with Origin(latency=0.05, jitter=0.02) as origin:
        wanted = [
            origin.url(f"/status/404?n={n}") if n in FAILING else origin.image_url(n, small=True)
            for n in range(METADATA_ITEMS)
        ]
        src = write_urls(tmp_path / "urls.txt", wanted)
        out = tmp_path / "out"
        args = [str(src), "-o", str(out), "--threads", "8", "--per-host", "8"]
        args += ["--format", fmt, "--shard-size", "10", *engine]
        log = tmp_path / "stderr.log"
        kills = 0
        for run in range(3 * len(METADATA_KILLS)):
            if kills == len(METADATA_KILLS):
                break
            kind = METADATA_KILLS[kills]
            done = len(list(iter_journal(out))) if (out / ".fetchpool" / "state.db").exists() else 0
            code = _run_killed(
                args,
                tag,
                log,
                run,
                kind,
                out=out,
                fmt=fmt,
                origin=origin,
                remaining=METADATA_ITEMS - done,
                rng=rng,
            )
            assert code in (0, 1, -signal.SIGKILL), _tail(log)
            assert wait_no_tagged_processes(tag, 10.0) == []
            check_after_kill(out, fmt)  # rows once in the metadata, stats match, samples once
            if code == -signal.SIGKILL:
                kills += 1
            else:  # got through before the kill: start over so the kills land mid-run
                shutil.rmtree(out)
        assert kills == len(METADATA_KILLS)
        final = run_get(args, tag, timeout=180)
        assert final.returncode == 1, final.stderr[-3000:]  # the 404 rows failed
    rows = list(iter_journal(out))
    assert [r.position for r in rows] == list(range(METADATA_ITEMS))
    for row in rows:
        failing = row.position in FAILING
        assert (row.status is Status.FAILED) is failing and (row.status is Status.OK) is not failing
    check_after_kill(out, fmt)
    listed = metadata_keys(out)
    assert listed == Counter({key_of(p): 1 for p in range(METADATA_ITEMS)})
    assert sorted(all_shard_keys(out)) == [
        key_of(p) for p in range(METADATA_ITEMS) if p not in FAILING
    ]
    assert leftovers(out) == []


# ============================================================================ 44 another input


def _snapshot(out: Path) -> dict[str, str]:
    """Every final file of OUT (shards included) → its sha256."""
    return {p.relative_to(out).as_posix(): sha(p.read_bytes()) for p in final_files(out)}


@pytest.mark.parametrize("extra", [(), WDS], ids=["files", "webdataset"])
def test_case_44_a_different_input_into_the_same_folder_is_refused(
    tmp_path: Path, tag: str, extra: tuple[str, ...]
) -> None:
    fmt = output_format(extra)
    with Origin(latency=0.05, jitter=0.02) as origin:
        list_a = [origin.image_url(n, small=True) for n in range(10)]
        list_b = [origin.image_url(100 + n, small=True) for n in range(10)]
        added = [origin.image_url(50 + n, small=True) for n in range(5)]
        src_a = write_urls(tmp_path / "a.txt", list_a)
        src_b = write_urls(tmp_path / "b.txt", list_b)
        src_grown = write_urls(tmp_path / "a-grown.txt", list_a + added)
        out = tmp_path / "out"

        def get(src: Path) -> subprocess.CompletedProcess[str]:
            return run_get([str(src), "-o", str(out), "--threads", "4", *extra], tag)

        first = get(src_a)
        assert first.returncode == 0, first.stderr
        before = _snapshot(out)
        assert before

        origin.reset_counters()
        refused = get(src_b)
        assert refused.returncode == 2, (
            f"another input into a used folder must be refused with exit 2, got "
            f"{refused.returncode}: {refused.stderr[-2000:]!r}"
        )
        assert "fetchpool:" in refused.stderr and "input" in refused.stderr.lower(), refused.stderr
        b_paths = {url_path(u) for u in list_b}
        asked = [r.path for r in origin.requests() if url_path(r.path) in b_paths]
        assert asked == [], f"the refused input was fetched: {asked}"
        rows = cli_manifest_rows(out)
        assert [(r["position"], r["url"], r["status"]) for r in rows] == [
            (n, url, "ok") for n, url in enumerate(list_a)
        ]
        assert _snapshot(out) == before, "the folder holds A's outputs only, unchanged"

        origin.reset_counters()
        again = get(src_a)
        assert again.returncode == 0, again.stderr
        assert origin.requests() == [], "rerunning the same input fetches nothing"

        origin.reset_counters()
        grown = get(src_grown)
        assert grown.returncode == 0, grown.stderr
        assert sorted(r.path for r in origin.requests()) == sorted(url_path(u) for u in added)
        check_complete(origin, out, fmt, len(list_a) + len(added), resized=False)
        assert [r.url for r in iter_journal(out)] == list_a + added


# ============================================================================ 45 empty journal


def _journal_without_schema(db: Path, kind: str) -> None:
    if kind == "zero-bytes":
        db.write_bytes(b"")
        return
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("DROP TABLE t")
        conn.execute("PRAGMA user_version=0")
        conn.commit()
        conn.execute("VACUUM")
    assert db.stat().st_size > 0


@pytest.mark.parametrize("kind", ["zero-bytes", "no-tables"])
def test_case_45_a_journal_killed_before_its_schema_exists_reads_as_empty(
    tmp_path: Path, tag: str, kind: str
) -> None:
    out = tmp_path / "out"
    (out / ".fetchpool").mkdir(parents=True)
    _journal_without_schema(out / ".fetchpool" / "state.db", kind)

    assert list(iter_journal(out)) == []
    assert manifest_rows(out) == []
    assert cli_manifest_rows(out) == []

    with Origin(latency=0.05, jitter=0.02) as origin:
        src = write_urls(
            tmp_path / "urls.txt", [origin.image_url(n, small=True) for n in range(10)]
        )
        done = run_get([str(src), "-o", str(out)], tag)
        assert done.returncode == 0, done.stderr
        check_complete(origin, out, "files", 10, resized=False)


# ============================================================================ 41/43 signals


def _signal_cases() -> list[object]:
    def case(
        sig: signal.Signals, target: str, times: int, extra: tuple[str, ...], name: str
    ) -> Any:
        label = f"{name}-{sig.name}-{target}-{'once' if times == 1 else 'twice'}"
        return pytest.param(sig, target, times, extra, id=label)

    cases = [
        case(sig, target, times, (), "files")
        for sig in (signal.SIGINT, signal.SIGTERM)
        for target in ("pid", "group")
        for times in (1, 2)
    ]
    cases += [case(signal.SIGTERM, "group", t, FETCH_PROCESSES, "fetch-processes") for t in (1, 2)]
    cases += [case(signal.SIGINT, "group", t, RESIZE, "resize") for t in (1, 2)]
    cases += [case(signal.SIGINT, "pid", 1, MULTIPLEXED, "multiplexed")]
    cases += [case(signal.SIGTERM, "group", 2, MULTIPLEXED, "multiplexed")]
    cases += [case(signal.SIGTERM, "group", 1, WDS, "webdataset")]
    cases += [case(signal.SIGTERM, "group", 1, PARQUET, "parquet")]
    return cases


def _send(target: str, pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # a second signal after the group is gone
        if target == "pid":
            os.kill(pid, sig)
        else:
            os.killpg(pid, sig)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("sig", "target", "times", "extra"), _signal_cases())
def test_case_41_43_signals_stop_cleanly_and_the_rerun_resumes(
    tmp_path: Path,
    tag: str,
    sig: signal.Signals,
    target: str,
    times: int,
    extra: tuple[str, ...],
) -> None:
    count = 150
    fmt = output_format(extra)
    expected = {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    out = tmp_path / "out"
    slow = Origin(latency=0.2).start()
    try:
        port = slow.port
        src = write_urls(
            tmp_path / "urls.txt", [slow.image_url(n, small=True) for n in range(count)]
        )
        args = [str(src), "-o", str(out), "--threads", "4", "--per-host", "4", *extra]
        proc = spawn_get(args, tag, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        finished = False
        try:
            flowing = wait_for(lambda: len(slow.requests()) >= 8, proc, 60)
            if fmt == "files":  # and something is published (after the CPU stage, if any)
                flowing = flowing and wait_for(lambda: bool(final_files(out)), proc, 60)
            assert flowing and proc.poll() is None, "the run never got going"
            _send(target, proc.pid, sig)
            if times == 2:
                time.sleep(0.05)  # the second signal comes 50 ms after the first, by design
                _send(target, proc.pid, sig)
            try:
                _, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                state = "still running" if proc.poll() is None else "exited, pipes held open"
                still = describe(tagged_pids(tag))
                pytest.fail(f"not done 30 s after the signal ({state}); tagged processes: {still}")
            finished = True
        finally:
            if not finished:
                kill_tagged(tag)
                with contextlib.suppress(OSError):
                    proc.kill()
                proc.communicate(timeout=30)
    finally:
        slow.stop()

    assert proc.returncode == expected, (proc.returncode, stderr[-2000:])
    left = wait_no_tagged_processes(tag, 10.0)
    assert left == [], f"processes outlived the run: {describe(left)}"

    rows = list(iter_journal(out))
    not_ok = [(r.position, r.status.value, r.error_code, r.error_message) for r in rows if not r.ok]
    assert not_ok == [], f"an interrupted item is not a failed item: {not_ok[:5]}"
    assert len(rows) < count, "the run stopped part-way"
    if times == 1:
        assert rows, "a graceful stop saves the finished work"
    cache: dict[str, Counter[str]] = {}
    for record in rows:
        assert_has_output(out, fmt, record, cache)
    assert stray_temp_files(out) == []
    if fmt == "files" and "--fetch-processes" not in extra:
        journaled = {r.path for r in rows}
        behind = [
            p.name for p in final_files(out) if p.relative_to(out).as_posix() not in journaled
        ]
        assert behind == [], f"files without a journal row (the journal is behind): {behind}"
    if fmt != "files":
        keys = all_shard_keys(out)
        assert all(n == 1 for n in keys.values()), keys
    done_before = {url_path(r.url) for r in rows}

    # The rest against a fast origin on the same port: same URLs, same command, seconds not 7 s.
    with Origin(port=port) as fast:
        again = run_get(args, tag, timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        refetched = sorted({r.path for r in fast.requests()} & done_before)
        assert refetched == [], f"items ok before the rerun were fetched again: {refetched}"
        check_complete(fast, out, fmt, count, resized="--resize" in extra)
    assert wait_no_tagged_processes(tag, 10.0) == []
    assert all(r.status is Status.OK for r in iter_journal(out))


# ============================================================================ 46 orphans


@pytest.mark.timeout(180)
@pytest.mark.parametrize("extra", [RESIZE, FETCH_PROCESSES], ids=["resize", "fetch-processes"])
def test_case_46_children_never_outlive_a_kill_9_of_the_parent(
    tmp_path: Path, tag: str, extra: Sequence[str]
) -> None:
    with Origin(latency=0.2) as origin:
        src = write_urls(
            tmp_path / "urls.txt", [origin.image_url(n, small=True) for n in range(150)]
        )
        out = tmp_path / "out"
        log = tmp_path / "stderr.log"
        args = [str(src), "-o", str(out), "--threads", "4", "--per-host", "4", *extra]
        with log.open("wb") as stderr:
            proc = spawn_get(args, tag, stderr=stderr)
        try:
            flowing = wait_for(lambda: len(origin.requests()) >= 8, proc, 60)
            assert flowing and proc.poll() is None, f"the run never got going: {_tail(log)}"
            children = wait_tagged_processes(tag, 2, besides=proc.pid, timeout=60)
            assert len(children) >= 2, f"worker processes never appeared: {describe(children)}"
            assert proc.poll() is None, _tail(log)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        left = wait_no_tagged_processes(tag, 10.0)
        assert left == [], f"children outlived the kill -9 of their parent: {describe(left)}"
