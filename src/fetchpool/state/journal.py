"""The SQLite state journal: one row per input position, the source of truth for resume.

Threading: a Journal belongs to the thread that opened it (``check_same_thread=True``). The
engine calls it only from its run-loop thread, after the writer reports a record durable
(docs/architecture.md, "Order of durability").

Writes are buffered and committed in batches (every :data:`BATCH_ROWS` rows or
:data:`BATCH_SECONDS`, whichever comes first). A crash loses at most one batch of rows, whose
files are already on disk and are adopted as identical when the next run re-fetches them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fetchpool import fsutil
from fetchpool._version import __version__
from fetchpool.errors import DiskFullError, LockedError, OutputError, StateError
from fetchpool.models import Record, Status
from fetchpool.redact import redact_text
from fetchpool.state import schema
from fetchpool.state.paths import (
    PLAN_NAME,
    db_path,
    lock_path,
    shard_companions,
    state_dir,
    tmp_dir,
)
from fetchpool.storage import Store, is_remote

log = logging.getLogger("fetchpool")

BATCH_ROWS = 500
BATCH_SECONDS = 1.0
_URL = schema.NAMES.index("url")
_STATUS = schema.NAMES.index("status")
_ERROR_CODE = schema.NAMES.index("error_code")
_POSITION = schema.NAMES.index("position")
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


# --------------------------------------------------------------------------- folder checks


def check_output_folder(out: Path) -> None:
    """Raise :class:`OutputError` unless ``out`` is (or can become) a writable folder."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output folder {out} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {out} is not writable")
        return
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output folder {out}: {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output folder {out}: {parent} is not writable")


def _make_private_dir(path: Path) -> None:
    """Create ``path`` (one level) and insist it is a real folder, never a planted symlink."""
    try:
        path.mkdir(exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{path} exists and is not a folder (a symlink or a file?)")


def _empty_folder(folder: Path) -> None:
    """Remove leftovers of a killed run; never follows symlinks."""
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    Path(entry.path).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OutputError(f"cannot clean {folder}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------- the lock


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "unknown pid"


def acquire_lock(out: Path) -> int:
    """Take the exclusive, non-blocking run lock of ``out``; return its fd.

    The lock is tied to the open file description, so it is released by the kernel when the
    process dies however it dies: no stale locks after a crash.
    """
    path = lock_path(out)
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _lock_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockedError(
                f"output folder {out} is in use by another fetchpool run ({holder}); "
                "wait for it to finish or choose another folder"
            ) from None
        raise StateError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def release_lock(fd: int) -> None:
    """Clear the pid and release the lock (closing the fd releases the flock)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)


# --------------------------------------------------------------------------- connection


def _refuse_links(path: Path) -> None:
    """Refuse a journal (or its -wal/-shm/-journal file) that is not a regular file.

    SQLite follows symlinks: a ``state.db`` planted as a link to a file outside OUT would be
    turned into a database there (RELIABILITY.md property 1, case 32).
    """
    for candidate in (path, *(path.with_name(path.name + s) for s in _SQLITE_SIDE_FILES)):
        try:
            info = candidate.lstat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateError(f"cannot check {candidate}: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{candidate} is not a regular file (a symlink?); refusing to open it")


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """Open the journal database; corrupt or unreadable files raise :class:`StateError`.

    Opened for writing, a missing journal is first created whole under another name and then
    renamed into place (:func:`_create`), so no reader ever sees one without its tables.
    """
    _refuse_links(path)
    if not read_only and not path.exists():
        _create(path)
    try:
        if read_only:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        else:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        try:
            _configure(conn, read_only=read_only)
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise StateError(
            f"the journal {path} is unreadable ({exc}); move it away to start a fresh run"
        ) from exc
    return conn


def _configure(conn: sqlite3.Connection, *, read_only: bool) -> None:
    conn.execute("PRAGMA busy_timeout = 5000")
    if read_only:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > schema.SCHEMA_VERSION:
        raise StateError(
            f"the journal was written by a newer fetchpool (schema {version}); upgrade fetchpool"
        )
    conn.execute("PRAGMA journal_mode = WAL").fetchone()
    # NORMAL in WAL mode keeps the db consistent across power loss; a lost last batch is
    # re-fetched and adopted (files are made durable before their rows).
    conn.execute("PRAGMA synchronous = NORMAL")
    with conn:
        conn.execute("BEGIN")
        for statement in schema.DDL:
            conn.execute(statement)
        _add_missing_columns(conn)
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION}")


def _create(path: Path) -> None:
    """Create the journal with its schema under a temp name, then rename it to ``path``.

    A kill at any moment leaves either no journal or a complete, empty one (RELIABILITY.md
    case 45); a leftover temp journal is replaced by the next run, which holds the lock.
    """
    temp = path.with_name(f"{path.name}.new")
    for leftover in (temp, *(temp.with_name(temp.name + s) for s in _SQLITE_SIDE_FILES)):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    try:
        conn = sqlite3.connect(temp, isolation_level=None)
        try:
            _configure(conn, read_only=False)
        finally:
            conn.close()  # checkpoints the WAL into the file and removes it
        fd = os.open(temp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        fsutil.fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"cannot create the journal {path}: no space left") from exc
        raise StateError(f"cannot create the journal {path}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
            raise DiskFullError(f"cannot create the journal {path}: {exc}") from exc
        raise StateError(f"cannot create the journal {path}: {exc}") from exc


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Forward-migrate a journal written before a Record field (or a runs column) existed."""
    for table, columns in (
        ("records", schema.COLUMNS),
        ("staged", schema.COLUMNS),
        ("runs", schema.RUN_COLUMNS),
    ):
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, sql_type in columns.items():
            if name not in present:
                plain = sql_type.replace(" PRIMARY KEY", "").replace(" NOT NULL", "")
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {plain}")


# --------------------------------------------------------------------------- Journal


#: sqlite3 result code for "database or disk is full": a run-level disk-full, not corruption.
_SQLITE_FULL = 13


class Journal:
    """The run's journal over ``OUT/.fetchpool/state.db``. Use :meth:`open`; single-threaded."""

    def __init__(self, out: Path, conn: sqlite3.Connection, lock_fd: int, run_id: int) -> None:
        self.out = Path(out)
        self.tmp_dir = tmp_dir(self.out)
        self.run_id = run_id
        self._conn = conn
        self._lock_fd: int | None = lock_fd
        # Rows not yet committed, by position; reads consult them first.
        self._pending: dict[int, tuple[Any, ...]] = {}
        self._pending_ok_urls: dict[str, int] = {}
        self._last_commit = time.monotonic()
        row = conn.execute("SELECT MAX(position) FROM records").fetchone()
        #: Highest position an earlier run journaled: a position above it has no row yet
        #: unless this run wrote it, so a fresh run needs no lookups at all.
        self.max_position_at_open: int = -1 if row is None or row[0] is None else int(row[0])
        #: Called before every commit: the writer makes its publications durable first, so a
        #: committed "ok" row always names a file that survives a crash.
        self.before_commit: Callable[[], None] | None = None
        #: Positions whose rows are staged with a shard (:meth:`stage`) and not yet put, with
        #: the (status, error code) staged: a put of the same outcome retires the staged copy.
        self._staged: dict[int, tuple[Any, Any]] = {}

    @classmethod
    def open(
        cls,
        out: Path,
        *,
        argv: Sequence[str] | None = None,
        source: str | None = None,
        source_size: int | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Journal:
        """Prepare ``out`` for a run and open its journal.

        Checks the folder (:class:`OutputError`), creates ``.fetchpool/`` and ``tmp/``, takes
        the run lock (:class:`LockedError` names the holder's pid), empties ``tmp/``, opens
        or creates the database (:class:`StateError` if corrupt), settles the shards a killed
        run left staged (:func:`_settle_staged`) and records this run, with the name and size
        of its input when known.
        """
        out = Path(out)
        check_output_folder(out)
        try:
            # OUT itself may be a symlink the user chose; only our own folders must be real.
            out.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
        _make_private_dir(state_dir(out))
        lock_fd = acquire_lock(out)
        try:
            _make_private_dir(tmp_dir(out))
            _empty_folder(tmp_dir(out))
            conn = connect(db_path(out))
            try:
                _settle_staged(conn, out)
                argv_list = list(sys.argv if argv is None else argv)
                run_id = _start_run(conn, argv_list, source, source_size, settings)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            release_lock(lock_fd)
            raise
        return cls(out, conn, lock_fd, run_id)

    def earlier_source(self) -> str | None:
        """The input an earlier run of this folder read (its name), if it was recorded."""
        row = self._query_one(
            "SELECT source FROM runs WHERE id < ? AND source IS NOT NULL ORDER BY id DESC LIMIT 1",
            (self.run_id,),
        )
        return None if row is None else str(row[0])

    # -- reads ---------------------------------------------------------------------------

    def get(self, position: int) -> Record | None:
        """The record of ``position`` (including rows not yet committed), or None."""
        pending = self._pending.get(position)
        if pending is not None:
            return schema.from_row(pending)
        row = self._query_one(f"{schema.SELECT} WHERE position = ?", (position,))
        return None if row is None else schema.from_row(row)

    def find_ok_by_url(self, url: str) -> Record | None:
        """An OK record for exactly ``url`` (indexed), or None. Used to skip duplicates.

        Buffered rows are consulted first. A committed OK row that a still-buffered put has
        just overwritten with another status can still be found until the next flush.
        """
        position = self._pending_ok_urls.get(url)
        if position is not None:
            return self.get(position)
        # INDEXED BY as in find_ok_by_urls: without statistics the planner's choice between
        # this and the (status, error_code) index depends on the row's width (adding the
        # md5/sha512 columns tipped it to the scan of every OK row).
        row = self._query_one(
            f"{schema.SELECT} INDEXED BY records_ok_url WHERE url = ? AND status = 'ok' "
            "ORDER BY position LIMIT 1",
            (url,),
        )
        return None if row is None else schema.from_row(row)

    def get_many(self, positions: Sequence[int]) -> dict[int, Record]:
        """:meth:`get` for many positions in one query (the scheduler admits in batches)."""
        found = {p: schema.from_row(self._pending[p]) for p in positions if p in self._pending}
        wanted = [p for p in positions if p not in found and p <= self.max_position_at_open]
        for row in self._query_in(f"{schema.SELECT} WHERE position IN", wanted):
            record = schema.from_row(row)
            found[record.position] = record
        return found

    def find_ok_by_urls(self, urls: Sequence[str]) -> dict[str, Record]:
        """:meth:`find_ok_by_url` for many URLs in one query: url → its first OK record."""
        found: dict[str, Record] = {}
        for url in urls:
            position = self._pending_ok_urls.get(url)
            if position is not None:
                found[url] = schema.from_row(self._pending[position])
        wanted = list({u for u in urls if u not in found})
        # INDEXED BY: for an IN list SQLite's planner otherwise picks the (status, error_code)
        # index and scans every OK row once per batch, which made a run quadratic in its
        # length (20,000 items: 420,000 page reads). The partial index answers each URL alone.
        sql = f"{schema.SELECT} INDEXED BY records_ok_url WHERE status = 'ok' AND url IN"
        for row in self._query_in(sql, wanted, order="position DESC"):
            record = schema.from_row(row)
            found[record.url] = record  # descending: the first (lowest) position wins
        return found

    def _query_in(
        self, sql: str, values: Sequence[Any], *, order: str = "position"
    ) -> Iterator[tuple[Any, ...]]:
        # SQLite's default limit on bound variables is 999 on old builds: stay below it.
        for start in range(0, len(values), 500):
            chunk = values[start : start + 500]
            marks = ",".join("?" * len(chunk))
            try:
                rows = self._conn.execute(f"{sql} ({marks}) ORDER BY {order}", chunk).fetchall()
            except sqlite3.Error as exc:
                raise StateError(f"journal read failed: {exc}") from exc
            yield from rows

    def iter_records(
        self, status: Status | None = None, *, redact: bool = False
    ) -> Iterator[Record]:
        """Stream records ordered by position (optionally one status; URLs redacted)."""
        self.flush()
        for row in schema.iter_rows(self._conn, status):
            record = schema.from_row(row)
            yield schema.redact_record(record) if redact else record

    def counts(self) -> dict[str, int]:
        """Counts by status (every :class:`Status`, even at 0), by error code, and ``total``."""
        self.flush()
        result = {s.value: 0 for s in Status}
        total = 0
        for status, code, n in self._conn.execute(
            "SELECT status, error_code, count(*) FROM records GROUP BY status, error_code"
        ):
            result[status] = result.get(status, 0) + n
            if code is not None:
                result[code] = result.get(code, 0) + n
            total += n
        result["total"] = total
        return result

    def _query_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._conn.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"journal read failed: {exc}") from exc
        return row

    # -- writes --------------------------------------------------------------------------

    def put(self, record: Record) -> None:
        """Insert or replace the row of ``record.position`` (last write wins); buffered."""
        position = record.position
        previous = self._pending.get(position)
        if previous is not None and self._pending_ok_urls.get(previous[_URL]) == position:
            del self._pending_ok_urls[previous[_URL]]
        # A row tuple is a snapshot: later mutations of the caller's record do not leak in.
        self._pending[position] = schema.to_row(record)
        if record.ok:
            self._pending_ok_urls.setdefault(record.url, position)
        due = time.monotonic() - self._last_commit >= BATCH_SECONDS
        if len(self._pending) >= BATCH_ROWS or due:
            self.flush()

    def stage(self, shard: str, size: int, records: Sequence[Record]) -> None:
        """Commit the rows of ``shard`` (``size`` bytes, fsynced, not yet named) now.

        Called by a sharded writer just before it links the shard to its name; the rows reach
        ``records`` with the usual :meth:`put` afterwards. A run killed in between has its
        shard settled when the journal is next opened: rows rolled forward if the shard has
        its name, forgotten if not. Committed with ``synchronous = FULL``: a shard that
        survives a power loss has its rows too.
        """
        rows = [(shard, size, *schema.to_row(record)) for record in records]
        try:
            self._conn.execute("PRAGMA synchronous = FULL")
            try:
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.executemany(schema.STAGE, rows)
            finally:
                self._conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
                raise DiskFullError(f"cannot write the journal: {exc}") from exc
            raise StateError(f"cannot write the journal: {exc}") from exc
        for row in rows:
            self._staged[row[2 + _POSITION]] = (row[2 + _STATUS], row[2 + _ERROR_CODE])

    def unstage(self, shard: str) -> None:
        """Forget the staged rows of a shard that was not published after all."""
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                rows = self._conn.execute(
                    "SELECT position FROM staged WHERE shard = ?", (shard,)
                ).fetchall()
                self._conn.execute("DELETE FROM staged WHERE shard = ?", (shard,))
            for row in rows:
                self._staged.pop(row[0], None)
        except sqlite3.Error as exc:  # settled at the next open: the shard has no name
            log.warning("cannot unstage shard %s: %s", shard, exc)

    def flush(self) -> None:
        """Commit buffered rows now (and drop the staged copies of those that were staged)."""
        if not self._pending:
            self._last_commit = time.monotonic()
            return
        rows = list(self._pending.values())
        # A staged row's copy goes once its row is in ``records`` with the staged outcome; a
        # staged item that ends otherwise (its shard failed after it had its name) keeps its
        # staged copy, for the next open to settle against the shard on disk.
        staged = (
            [
                p
                for p, row in self._pending.items()
                if self._staged.get(p) == (row[_STATUS], row[_ERROR_CODE])
            ]
            if self._staged
            else []
        )
        if self.before_commit is not None:
            try:
                self.before_commit()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFullError(f"cannot make finished files durable: {exc}") from exc
                raise StateError(f"cannot make finished files durable: {exc}") from exc
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                _upsert(self._conn, rows)
                for start in range(0, len(staged), 500):
                    chunk = staged[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    sql = f"DELETE FROM staged WHERE position IN ({marks})"  # noqa: S608 - marks
                    self._conn.execute(sql, chunk)
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
                raise DiskFullError(f"cannot write the journal: {exc}") from exc
            raise StateError(f"cannot write the journal: {exc}") from exc
        self._pending.clear()
        self._pending_ok_urls.clear()
        for position in staged:
            del self._staged[position]
        self._last_commit = time.monotonic()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    def close(self) -> None:
        """Flush, mark the run finished, close the db and release the lock. Idempotent."""
        if self._lock_fd is None:
            return
        try:
            self.flush()
            with self._conn:
                self._conn.execute(
                    "UPDATE runs SET finished = ? WHERE id = ?", (time.time(), self.run_id)
                )
        finally:
            self._conn.close()
            fd, self._lock_fd = self._lock_fd, None
            release_lock(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def iter_journal(
    out: Path | str,
    *,
    status: Status | None = None,
    redact: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Record]:
    """Stream the committed records of ``out`` read-only, ordered by position.

    Takes no lock, so it works during a run (showing what is committed so far) and after
    it. Raises :class:`StateError` when ``out`` has no journal (on first iteration). A cluster
    run's destination (docs/distributed.md), local or an fsspec URL such as ``s3://bucket/ds``
    (with ``storage_options``), gives its parts' records merged, paths relative to it.
    """
    if is_remote(out) or (Path(out) / PLAN_NAME).is_file():
        from fetchpool.state.exported import iter_cluster_records

        yield from iter_cluster_records(Store(out, storage_options), status=status, redact=redact)
        return
    path = db_path(Path(out))
    if not path.is_file():
        raise StateError(f"no journal in {out} (expected {path}): nothing was run there")
    conn = connect(path, read_only=True)
    try:
        for row in schema.iter_rows(conn, status):
            record = schema.from_row(row)
            yield schema.redact_record(record) if redact else record
    finally:
        conn.close()


def _settle_staged(conn: sqlite3.Connection, out: Path) -> None:
    """Finish what a killed run left between staging a shard and putting its rows.

    A staged shard whose final name holds a regular file of the staged size was published:
    its rows go into ``records``. One without it was not: its rows are dropped, and its
    samples are fetched again into a new shard. Either way no sample is in two shards.
    """
    try:
        shards = conn.execute("SELECT shard, MIN(shard_size) FROM staged GROUP BY shard").fetchall()
        for shard, size in shards:
            try:
                info = (out / shard).lstat()
                published = stat.S_ISREG(info.st_mode) and info.st_size == size
            except OSError:
                published = False
            if not published:  # its companions were linked first: they go with it
                for companion in shard_companions(shard):
                    _remove_own_file(out / companion)
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                if published:
                    conn.execute(schema.ROLL_FORWARD, (shard,))
                conn.execute("DELETE FROM staged WHERE shard = ?", (shard,))
            log.info("shard %s of a killed run %s", shard, "kept" if published else "dropped")
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
            raise DiskFullError(f"cannot write the journal: {exc}") from exc
        raise StateError(f"cannot settle the staged shards of the journal: {exc}") from exc


def _remove_own_file(path: Path) -> None:
    """Remove a regular file we published (never a folder, never following a symlink)."""
    try:
        if stat.S_ISREG(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def _start_run(
    conn: sqlite3.Connection,
    argv: list[str],
    source: str | None,
    source_size: int | None,
    settings: Mapping[str, Any] | None = None,
) -> int:
    recorded = None if settings is None else schema.to_json(settings)
    try:
        with conn:
            cursor = conn.execute(
                "INSERT INTO runs (started, version, argv, pid, source, source_size, settings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    time.time(),
                    __version__,
                    # Masked: a run's argv may hold credentials (--proxy http://user:pw@host).
                    json.dumps([redact_text(arg) for arg in argv]),
                    os.getpid(),
                    source,
                    source_size,
                    recorded,
                ),
            )
    except sqlite3.Error as exc:
        raise StateError(f"cannot write the journal: {exc}") from exc
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _upsert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert or replace ``rows`` (distinct positions), UPSERT_ROWS per statement."""
    for start in range(0, len(rows), schema.UPSERT_ROWS):
        chunk = rows[start : start + schema.UPSERT_ROWS]
        conn.execute(schema.upsert_many(len(chunk)), [value for row in chunk for value in row])
