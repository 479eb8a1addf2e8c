"""The SQLite journal: schema, buffering, resume, lock, tmp cleanup, folder checks."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from fetchpool.errors import LockedError, OutputError, StateError
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.state import BATCH_ROWS, Journal, db_path, iter_journal, lock_path, tmp_dir
from fetchpool.state.schema import COLUMNS, SELECT, TRANSIENT


def ok_record(position: int, url: str | None = None) -> Record:
    return Record(
        position=position,
        url=url or f"http://a.example/{position}.jpg",
        status=Status.OK,
        http_status=200,
        attempts=1,
        bytes=1234,
        sha256="ab" * 32,
        content_type="image/jpeg",
        final_url=f"http://cdn.example/{position}.jpg",
        path=f"{position}-abc.jpg",
        started=1.5,
        finished=2.5,
        worker="t-1",
        line=position + 1,
        meta={"caption": "ü", "n": position, "nested": {"a": [1, 2]}},
        redirects=["http://a.example/r"],
        width=10,
        height=20,
        orig_width=100,
        orig_height=200,
        image_format="JPEG",
        temp_path="/tmp/x",
        extension=".jpg",
        retry_after=3.0,
    )


def failed_record(position: int, code: ErrorCode) -> Record:
    return Record(position=position, url=f"http://a.example/{position}").fail(code, "boom")


def without_transient(record: Record) -> Record:
    record.temp_path = record.extension = None
    record.retry_after = None
    return record


def test_schema_covers_every_persisted_record_field() -> None:
    persisted = [f.name for f in fields(Record) if f.name not in TRANSIENT]
    assert list(COLUMNS) == persisted


def test_open_creates_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out, argv=["fetchpool", "get"]) as journal:
        assert db_path(out).is_file()
        assert tmp_dir(out).is_dir()
        assert journal.tmp_dir == tmp_dir(out)
        assert lock_path(out).read_text().strip() == str(os.getpid())
        mode = sqlite3.connect(db_path(out)).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    conn = sqlite3.connect(db_path(out))
    runs = conn.execute("SELECT started, finished, version, argv, pid FROM runs").fetchall()
    conn.close()
    assert len(runs) == 1
    started, finished, version, argv, pid = runs[0]
    assert finished >= started
    assert version
    assert argv == '["fetchpool", "get"]'
    assert pid == os.getpid()


def test_round_trip_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out) as journal:
        journal.put(ok_record(0))
        journal.put(failed_record(1, ErrorCode.HTTP_ERROR))
        # Visible before the batch is committed.
        assert journal.get(0) == without_transient(ok_record(0))
    with Journal.open(out) as journal:
        assert journal.get(0) == without_transient(ok_record(0))
        got = journal.get(1)
        assert got is not None
        assert got.status is Status.FAILED
        assert got.error_code is ErrorCode.HTTP_ERROR
        assert journal.get(2) is None
        runs = sqlite3.connect(db_path(out)).execute("SELECT count(*) FROM runs").fetchone()
        assert runs[0] == 2


def test_put_is_an_upsert_and_snapshots_the_record(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "out") as journal:
        record = failed_record(5, ErrorCode.READ_TIMEOUT)
        journal.put(record)
        record.error_message = "mutated after put"
        got = journal.get(5)
        assert got is not None
        assert got.error_message == "boom"
        journal.put(ok_record(5))
        journal.flush()
        journal.put(failed_record(5, ErrorCode.DISK_FULL))
        got = journal.get(5)
        assert got is not None
        assert got.error_code is ErrorCode.DISK_FULL
        assert journal.counts()["total"] == 1


def test_batching_commits_every_500_rows(tmp_path: Path) -> None:
    out = tmp_path / "out"
    journal = Journal.open(out)
    try:
        reader = sqlite3.connect(db_path(out))

        def committed() -> int:
            return int(reader.execute("SELECT count(*) FROM records").fetchone()[0])

        for n in range(BATCH_ROWS - 1):
            journal.put(failed_record(n, ErrorCode.CONNECT_ERROR))
        assert committed() == 0
        journal.put(failed_record(BATCH_ROWS - 1, ErrorCode.CONNECT_ERROR))
        assert committed() == BATCH_ROWS
        journal.put(failed_record(10_000, ErrorCode.CONNECT_ERROR))
        assert committed() == BATCH_ROWS
        journal.flush()
        assert committed() == BATCH_ROWS + 1
        reader.close()
    finally:
        journal.close()


def test_batching_commits_after_a_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    clock = [1000.0]
    monkeypatch.setattr("fetchpool.state.journal.time.monotonic", lambda: clock[0])
    with Journal.open(out) as journal:
        reader = sqlite3.connect(db_path(out))
        journal.put(failed_record(0, ErrorCode.CONNECT_ERROR))
        assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 0
        clock[0] += 1.01
        journal.put(failed_record(1, ErrorCode.CONNECT_ERROR))
        assert reader.execute("SELECT count(*) FROM records").fetchone()[0] == 2
        reader.close()


def test_find_ok_by_url(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "out") as journal:
        journal.put(failed_record(0, ErrorCode.HTTP_ERROR))
        journal.put(ok_record(1, url="http://a.example/same"))
        found = journal.find_ok_by_url("http://a.example/same")  # from the buffer
        assert found is not None
        assert found.position == 1
        journal.flush()
        found = journal.find_ok_by_url("http://a.example/same")  # from the db
        assert found is not None
        assert found.position == 1
        assert journal.find_ok_by_url("http://a.example/0") is None
        # The statement find_ok_by_url runs: INDEXED BY, since without statistics the planner
        # flips to the status index as rows get wider.
        plan = journal._conn.execute(
            f"EXPLAIN QUERY PLAN {SELECT} INDEXED BY records_ok_url WHERE url = ? "
            "AND status = 'ok' ORDER BY position LIMIT 1",
            ("x",),
        ).fetchall()
        assert "records_ok_url" in str(plan)
        # A buffered overwrite of an OK row drops it from the buffered URL index.
        journal.put(ok_record(7, url="http://a.example/seven"))
        journal.put(failed_record(7, ErrorCode.HTTP_ERROR))
        assert journal.find_ok_by_url("http://a.example/seven") is None


def _lookup_steps(journal: Journal, urls: list[str]) -> int:
    """SQLite VM steps spent by one batched URL lookup (a proxy for rows visited)."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    journal._conn.set_progress_handler(count, 100)
    try:
        journal.find_ok_by_urls(urls)
    finally:
        journal._conn.set_progress_handler(None, 0)
    return steps


def test_batched_url_lookup_does_not_scan_the_table(tmp_path: Path) -> None:
    """Admission looks up each batch's URLs by index: its cost must not grow with the journal
    (a plan that scanned every OK row per batch made whole runs quadratic)."""
    wanted = [f"http://absent.example/{n}" for n in range(200)]
    with Journal.open(tmp_path / "out") as journal:
        costs = []
        for size in (1_000, 20_000):
            for n in range(len(costs) and 1_000, size):
                journal.put(ok_record(n))
            journal.flush()
            costs.append(_lookup_steps(journal, wanted))
        assert costs[1] < costs[0] * 2 + 50, costs


def test_iter_records_streams_in_order_with_filters(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "out") as journal:
        for n in reversed(range(2500)):
            if n % 3 == 0:
                journal.put(failed_record(n, ErrorCode.HTTP_ERROR))
            else:
                journal.put(ok_record(n, url=f"http://u:secret@a.example/{n}"))
        positions = [r.position for r in journal.iter_records()]
        assert positions == list(range(2500))
        failed = [r.position for r in journal.iter_records(Status.FAILED)]
        assert failed == list(range(0, 2500, 3))
        first_ok = next(journal.iter_records(Status.OK))
        assert "secret" in first_ok.url  # stored as given: needed to re-fetch
        redacted = next(journal.iter_records(Status.OK, redact=True))
        assert redacted.url == "http://u:***@a.example/1"
        # Writing while iterating is allowed (keyset pagination, no long read).
        for record in journal.iter_records(Status.FAILED):
            record.status = Status.SKIPPED
            journal.put(record)
        assert journal.counts()["skipped"] == len(failed)


def test_counts(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "out") as journal:
        journal.put(ok_record(0))
        journal.put(ok_record(1))
        journal.put(failed_record(2, ErrorCode.HTTP_ERROR))
        journal.put(failed_record(3, ErrorCode.HTTP_ERROR))
        journal.put(failed_record(4, ErrorCode.INVALID_URL))
        skipped = failed_record(5, ErrorCode.DUPLICATE)
        skipped.status = Status.SKIPPED
        journal.put(skipped)
        assert journal.counts() == {
            "ok": 2,
            "failed": 3,
            "skipped": 1,
            "http_error": 2,
            "invalid_url": 1,
            "duplicate": 1,
            "total": 6,
        }


def test_second_open_is_refused_in_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out):
        with pytest.raises(LockedError) as info:
            Journal.open(out)
        message = str(info.value)
        assert str(out) in message
        assert f"pid {os.getpid()}" in message
    # Released on close: a new run can start.
    Journal.open(out).close()


def test_lock_refused_for_another_process(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fetchpool.errors import LockedError\n"
        "from fetchpool.state import Journal\n"
        "try:\n"
        "    Journal.open(Path(sys.argv[1]))\n"
        "except LockedError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    with Journal.open(out):
        done = subprocess.run(
            [sys.executable, "-c", code, str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 3, done.stderr
    assert f"pid {os.getpid()}" in done.stdout


def test_lock_released_when_holder_dies(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from fetchpool.state import Journal\n"
        "Journal.open(Path(sys.argv[1]))\n"
        "os._exit(9)\n"  # killed: no close()
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], timeout=60, check=False)
    assert done.returncode == 9
    Journal.open(out).close()


def test_tmp_is_emptied_on_open(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Journal.open(out).close()
    leftovers = tmp_dir(out)
    (leftovers / ".fp-dead.part").write_bytes(b"partial")
    (leftovers / "subdir").mkdir()
    (leftovers / "subdir" / "x").write_bytes(b"x")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (leftovers / "link").symlink_to(outside)
    with Journal.open(out):
        assert list(leftovers.iterdir()) == []
    assert (outside / "keep").read_bytes() == b"keep"


def test_tmp_not_emptied_by_a_refused_opener(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out):
        (tmp_dir(out) / ".fp-live.part").write_bytes(b"in flight")
        with pytest.raises(LockedError):
            Journal.open(out)
        assert (tmp_dir(out) / ".fp-live.part").exists()


def test_close_is_idempotent(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path / "out")
    journal.put(ok_record(0))
    journal.close()
    journal.close()
    assert journal.closed
    with Journal.open(tmp_path / "out") as again:
        assert again.get(0) is not None


def test_output_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(OutputError, match="not a folder"):
        Journal.open(out)


def test_output_parent_missing(tmp_path: Path) -> None:
    out = tmp_path / "missing" / "out"
    with pytest.raises(OutputError, match="does not exist"):
        Journal.open(out)
    assert not out.parent.exists()


def test_output_not_writable_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs even as root (which ignores permission bits): the check relies on os.access.
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(OutputError, match="not writable"):
        Journal.open(out)
    assert not (out / ".fetchpool").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_output_not_writable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            Journal.open(out)
    finally:
        out.chmod(0o700)


def test_planted_symlink_as_state_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / ".fetchpool").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="not a folder"):
        Journal.open(out)
    assert list(elsewhere.iterdir()) == []


def test_corrupt_db_is_a_state_error_and_releases_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Journal.open(out).close()
    for suffix in ("-wal", "-shm"):
        Path(f"{db_path(out)}{suffix}").unlink(missing_ok=True)
    db_path(out).write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(StateError, match="unreadable"):
        Journal.open(out)
    # The failed open did not keep the lock.
    db_path(out).unlink()
    Journal.open(out).close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Journal.open(out).close()
    conn = sqlite3.connect(db_path(out))
    conn.execute("PRAGMA user_version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="newer"):
        Journal.open(out)


def test_old_journal_gains_new_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    Journal.open(out).close()
    conn = sqlite3.connect(db_path(out))
    conn.execute("ALTER TABLE records DROP COLUMN image_format")
    conn.commit()
    conn.close()
    with Journal.open(out) as journal:
        journal.put(ok_record(0))
        got = journal.get(0)
        assert got is not None
        assert got.image_format == "JPEG"


def test_old_journal_reads_without_its_new_columns(tmp_path: Path) -> None:
    """``manifest`` opens a journal read-only: a column an older fetchpool did not write
    (``exif``) reads as None instead of failing the export."""
    out = tmp_path / "out"
    with Journal.open(out) as journal:
        journal.put(ok_record(0))
    conn = sqlite3.connect(db_path(out))
    conn.execute("ALTER TABLE records DROP COLUMN exif")
    conn.commit()
    conn.close()
    (record,) = iter_journal(out)
    assert record.position == 0 and record.image_format == "JPEG" and record.exif is None


def test_journal_is_single_threaded(tmp_path: Path) -> None:
    import threading

    errors: list[BaseException] = []
    with Journal.open(tmp_path / "out") as journal:
        journal.put(ok_record(0))
        journal.flush()

        def other() -> None:
            try:
                journal.get(0)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert errors
    assert isinstance(errors[0], sqlite3.ProgrammingError | StateError)


def test_puts_are_fast_enough(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "out") as journal:
        start = time.perf_counter()
        for n in range(20_000):
            journal.put(ok_record(n))
        journal.flush()
        elapsed = time.perf_counter() - start
        assert journal.counts()["ok"] == 20_000
    assert elapsed < 20  # generous: ~20k rows/s on a slow CI disk is plenty


def test_iter_journal_reads_without_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(StateError, match="no journal"):
        list(iter_journal(out))
    with Journal.open(out) as journal:
        journal.put(ok_record(1, url="http://u:pw@a.example/1"))
        journal.put(failed_record(0, ErrorCode.HTTP_ERROR))
        journal.flush()
        # During the run: committed rows are visible, no LockedError.
        assert [r.position for r in iter_journal(out)] == [0, 1]
    assert [r.position for r in iter_journal(out, status=Status.OK)] == [1]
    (redacted,) = iter_journal(out, status=Status.OK, redact=True)
    assert redacted.url == "http://u:***@a.example/1"


def test_symlinked_output_folder_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with Journal.open(link) as journal:
        journal.put(ok_record(0))
    assert db_path(real).is_file()


# ---------------------------------------------------------------- case 45: atomic creation


def test_a_new_journal_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    """The schema is committed under a temp name and renamed: no reader sees a journal
    without its tables, and a creation killed half-way leaves only the temp name behind."""
    out = tmp_path / "out"
    with Journal.open(out) as journal:
        journal.put(ok_record(0))
    assert not (out / ".fetchpool" / "state.db.new").exists()
    assert [r.position for r in iter_journal(out)] == [0]
    # A leftover temp journal (a creation killed before its rename) is simply replaced.
    out2 = tmp_path / "out2"
    (out2 / ".fetchpool").mkdir(parents=True)
    (out2 / ".fetchpool" / "state.db.new").write_bytes(b"half a database")
    with Journal.open(out2) as journal:
        journal.put(ok_record(1))
    assert [r.position for r in iter_journal(out2)] == [1]
    assert not (out2 / ".fetchpool" / "state.db.new").exists()


@pytest.mark.parametrize("kind", ["empty file", "no tables"])
def test_a_journal_without_its_schema_reads_as_no_records(tmp_path: Path, kind: str) -> None:
    """What a run killed before its schema was committed left (older fetchpool): readers say
    "no records yet" and the next run creates the tables (RELIABILITY.md case 45)."""
    out = tmp_path / "out"
    (out / ".fetchpool").mkdir(parents=True)
    path = db_path(out)
    if kind == "empty file":
        path.write_bytes(b"")
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE scratch (x)")
        conn.execute("DROP TABLE scratch")
        conn.commit()
        conn.close()
    assert list(iter_journal(out)) == []
    from fetchpool.state.manifest import export_manifest

    buffer = io.StringIO()
    export_manifest([out], buffer, fmt="jsonl")
    assert buffer.getvalue() == ""
    with Journal.open(out) as journal:
        journal.put(ok_record(0))
    assert [r.position for r in iter_journal(out)] == [0]


def test_a_schema_1_journal_gains_the_staged_table_and_input_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / ".fetchpool").mkdir(parents=True)
    conn = sqlite3.connect(db_path(out))
    conn.execute(f"CREATE TABLE records ({', '.join(f'{n} {t}' for n, t in COLUMNS.items())})")
    conn.execute(
        "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, "
        "finished REAL, version TEXT NOT NULL, argv TEXT NOT NULL, pid INTEGER NOT NULL)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with Journal.open(out, source="/data/a.txt", source_size=10) as journal:
        assert journal.earlier_source() is None
    with Journal.open(out, source="/data/b.txt", source_size=12) as journal:
        assert journal.earlier_source() == "/data/a.txt"
    conn = sqlite3.connect(db_path(out))
    assert conn.execute("SELECT count(*) FROM staged").fetchone() == (0,)
    conn.close()


def test_a_schema_2_journal_gains_the_digest_exif_and_settings_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out) as journal:
        journal.put(ok_record(0))
    conn = sqlite3.connect(db_path(out))
    for table in ("records", "staged"):  # as a schema-2 journal has them
        for name in ("md5", "sha512", "exif"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
    conn.execute("ALTER TABLE runs DROP COLUMN settings")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    with Journal.open(out, settings={"hash": "md5"}) as journal:
        record = ok_record(1)
        record.md5 = "0" * 32
        journal.put(record)
    conn = sqlite3.connect(db_path(out))
    assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    (settings,) = conn.execute("SELECT settings FROM runs ORDER BY id DESC").fetchone()
    conn.close()
    assert json.loads(settings) == {"hash": "md5"}
    assert [(r.position, r.md5) for r in iter_journal(out)] == [(0, None), (1, "0" * 32)]


# ---------------------------------------------------------------- shards staged with their rows


def _shard_rows(out: Path, shard: str, positions: list[int]) -> list[Record]:
    rows = []
    for position in positions:
        record = ok_record(position)
        record.path = f"{shard}#{position:09d}"
        rows.append(without_transient(record))
    return rows


def _kill(journal: Journal) -> None:
    """What SIGKILL leaves: nothing flushed, the lock released by the kernel."""
    journal._pending.clear()
    journal._conn.close()
    assert journal._lock_fd is not None
    os.close(journal._lock_fd)
    journal._lock_fd = None


def test_a_published_shard_whose_rows_were_not_committed_is_rolled_forward(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    journal = Journal.open(out)
    rows = _shard_rows(out, "00000.tar", [0, 1, 2])
    (out / "00000.tar").write_bytes(b"x" * 30)
    journal.stage("00000.tar", 30, rows)
    for record in rows:
        journal.put(record)  # buffered: lost with the kill
    _kill(journal)
    assert list(iter_journal(out)) == []
    with Journal.open(out) as again:
        assert [r.path for r in again.iter_records()] == [r.path for r in rows]
        assert again.get(1) == rows[1]
    conn = sqlite3.connect(db_path(out))
    assert conn.execute("SELECT count(*) FROM staged").fetchone() == (0,)
    conn.close()


@pytest.mark.parametrize("on_disk", ["missing", "other size", "a symlink"])
def test_a_staged_shard_that_never_got_its_name_is_forgotten(tmp_path: Path, on_disk: str) -> None:
    out = tmp_path / "out"
    journal = Journal.open(out)
    journal.stage("00003.parquet", 40, _shard_rows(out, "00003.parquet", [5, 6]))
    if on_disk == "other size":
        (out / "00003.parquet").write_bytes(b"y" * 41)
    elif on_disk == "a symlink":
        (tmp_path / "elsewhere").write_bytes(b"z" * 40)
        (out / "00003.parquet").symlink_to(tmp_path / "elsewhere")
    _kill(journal)
    with Journal.open(out) as again:
        assert list(again.iter_records()) == []


def test_rows_put_after_staging_clear_the_staged_copy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Journal.open(out) as journal:
        rows = _shard_rows(out, "00000.tar", [0, 1])
        journal.stage("00000.tar", 10, rows)
        for record in rows:
            journal.put(record)
        journal.flush()
        conn = sqlite3.connect(db_path(out))
        assert conn.execute("SELECT count(*) FROM staged").fetchone() == (0,)
        journal.stage("00001.tar", 10, _shard_rows(out, "00001.tar", [2]))
        journal.unstage("00001.tar")
        assert conn.execute("SELECT count(*) FROM staged").fetchone() == (0,)
        conn.close()
