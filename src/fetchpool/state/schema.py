"""The journal's table layout and the Record <-> row mapping, shared by journal and manifest."""

from __future__ import annotations

import functools
import json
import operator
import sqlite3
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

from fetchpool.errors import StateError
from fetchpool.models import ErrorCode, Record, Status
from fetchpool.redact import redact_url, redact_urls

#: 2: the ``staged`` table (shards and their rows made durable together) and the input's
#: name and size in ``runs``. 3: the ``md5``, ``sha512`` and ``exif`` columns and the run's
#: ``settings``: an older fetchpool, which would write rows without them, refuses the journal.
SCHEMA_VERSION = 3

#: Record fields never persisted: they only live while an item is in flight.
TRANSIENT = frozenset({"temp_path", "extension", "retry_after", "temp_synced", "moved_to"})

#: Persisted columns and their SQLite types, in Record field order. Checked against
#: models.Record at import so a new Record field cannot be silently dropped.
COLUMNS: dict[str, str] = {
    "position": "INTEGER PRIMARY KEY",
    "url": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "error_code": "TEXT",
    "error_message": "TEXT",
    "http_status": "INTEGER",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "bytes": "INTEGER NOT NULL DEFAULT 0",
    "sha256": "TEXT",
    "content_type": "TEXT",
    "final_url": "TEXT",
    "path": "TEXT",
    "started": "REAL",
    "finished": "REAL",
    "worker": "TEXT",
    "line": "INTEGER",
    "meta": "TEXT",  # JSON object
    "redirects": "TEXT",  # JSON array
    "width": "INTEGER",
    "height": "INTEGER",
    "orig_width": "INTEGER",
    "orig_height": "INTEGER",
    "image_format": "TEXT",
    "fetched_bytes": "INTEGER",
    "fetched_sha256": "TEXT",
    "md5": "TEXT",
    "sha512": "TEXT",
    "exif": "TEXT",  # JSON object text, as written (not decoded on read)
}

JSON_COLUMNS = frozenset({"meta", "redirects"})
NAMES = tuple(COLUMNS)
SELECT = f"SELECT {', '.join(NAMES)} FROM records"  # noqa: S608 - fixed column names
_ROW_MARKS = f"({', '.join('?' for _ in NAMES)})"
_ON_CONFLICT = "ON CONFLICT(position) DO UPDATE SET " + ", ".join(
    f"{n} = excluded.{n}" for n in NAMES if n != "position"
)
#: Rows per multi-row upsert: as many as keep the bound values under the 999 of old builds.
UPSERT_ROWS = 999 // len(NAMES)


@functools.lru_cache(maxsize=UPSERT_ROWS)
def upsert_many(rows: int) -> str:
    """One INSERT ... ON CONFLICT statement for ``rows`` rows (positions must be distinct).

    A statement per batch, not per row: the sqlite3 module hands the GIL over around every
    statement step, and under hundreds of fetch threads each hand-over makes the run loop
    wait its turn again (measured: 500 single-row steps per commit kept it waiting ~40 ms).
    """
    return (
        f"INSERT INTO records ({', '.join(NAMES)}) "  # noqa: S608 - fixed column names
        f"VALUES {', '.join(_ROW_MARKS for _ in range(rows))} {_ON_CONFLICT}"
    )


#: Columns of ``runs`` added after schema 1, added to older journals when they are opened.
RUN_COLUMNS: dict[str, str] = {"source": "TEXT", "source_size": "INTEGER", "settings": "TEXT"}

#: Stages one row of a shard (see the ``staged`` table): shard name, shard size, row.
STAGE = (
    f"INSERT OR REPLACE INTO staged (shard, shard_size, {', '.join(NAMES)}) "  # noqa: S608
    f"VALUES (?, ?, {', '.join('?' for _ in NAMES)})"
)
#: Moves the staged rows of one published shard into ``records``.
ROLL_FORWARD = (
    f"INSERT INTO records ({', '.join(NAMES)}) "  # noqa: S608 - fixed column names
    f"SELECT {', '.join(NAMES)} FROM staged WHERE shard = ? {_ON_CONFLICT}"
)

DDL = (
    f"CREATE TABLE IF NOT EXISTS records ({', '.join(f'{n} {t}' for n, t in COLUMNS.items())})",
    # Rows of a shard about to be published, committed before the shard gets its name: after a
    # crash, a shard that has its name gets its rows (rolled forward) and one that has not is
    # forgotten (its rows are fetched again), so no sample is ever in two shards.
    f"CREATE TABLE IF NOT EXISTS staged (shard TEXT NOT NULL, shard_size INTEGER NOT NULL, "
    f"{', '.join(f'{n} {t}' for n, t in COLUMNS.items())})",
    # Partial index: only OK rows are looked up by URL (duplicate / already-done checks).
    "CREATE INDEX IF NOT EXISTS records_ok_url ON records(url) WHERE status = 'ok'",
    "CREATE INDEX IF NOT EXISTS records_status ON records(status, error_code)",
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started REAL NOT NULL,
        finished REAL,
        version TEXT NOT NULL,
        argv TEXT NOT NULL,
        pid INTEGER NOT NULL,
        source TEXT,
        source_size INTEGER,
        settings TEXT
    )""",
)

PAGE = 1000


def _check_columns() -> None:
    persisted = [f.name for f in fields(Record) if f.name not in TRANSIENT]
    if persisted != list(COLUMNS):
        raise RuntimeError(f"journal columns {list(COLUMNS)} do not match Record {persisted}")


_check_columns()


def _json_default(value: Any) -> str:
    # Parquet / user meta may hold dates, decimals or bytes: keep them readable.
    if isinstance(value, bytes | bytearray):
        return value.hex()
    return str(value)


def to_json(value: Any) -> str:
    """Compact JSON for the meta / redirects columns."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)


_VALUES = operator.attrgetter(*NAMES)
_STATUS, _ERROR_CODE, _META, _REDIRECTS = (
    NAMES.index(name) for name in ("status", "error_code", "meta", "redirects")
)


def to_row(record: Record) -> tuple[Any, ...]:
    """The record as a tuple in :data:`NAMES` order.

    Runs once per item on the run loop's thread, so it avoids per-column work: one
    ``attrgetter`` call, then the two enums and the two JSON columns (empty ones without
    calling the encoder, which is most rows).
    """
    row = list(_VALUES(record))
    row[_STATUS] = record.status.value
    code = record.error_code
    row[_ERROR_CODE] = None if code is None else code.value
    row[_META] = to_json(record.meta) if record.meta else "{}"
    row[_REDIRECTS] = to_json(record.redirects) if record.redirects else "[]"
    return tuple(row)


def redact_record(record: Record) -> Record:
    """Mask credentials in the record's URLs (in place) and return it."""
    record.url = redact_url(record.url)
    if record.final_url is not None:
        record.final_url = redact_url(record.final_url)
    record.redirects = redact_urls(record.redirects)
    return record


def from_row(row: tuple[Any, ...]) -> Record:
    """Rebuild a Record from a row in :data:`NAMES` order."""
    values = dict(zip(NAMES, row, strict=True))
    try:
        values["status"] = Status(values["status"])
        if values["error_code"] is not None:
            values["error_code"] = ErrorCode(values["error_code"])
        values["meta"] = json.loads(values["meta"]) if values["meta"] else {}
        values["redirects"] = json.loads(values["redirects"]) if values["redirects"] else []
    except ValueError as exc:
        raise StateError(f"journal row {values['position']} is unreadable: {exc}") from exc
    return Record(**values)


def has_records(conn: sqlite3.Connection) -> bool:
    """Whether the journal has its tables: one killed while it was being created (by an
    older fetchpool, which did not create it atomically) or an empty file has none yet."""
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'records'"
    ).fetchone()
    return row is not None


def _select(conn: sqlite3.Connection) -> str:
    """:data:`SELECT`, with NULL for columns a journal written by an older fetchpool lacks
    (readers open it read-only, so it cannot gain them as a run's journal does)."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(records)")}
    if present.issuperset(NAMES):
        return SELECT
    columns = (name if name in present else f"NULL AS {name}" for name in NAMES)
    return f"SELECT {', '.join(columns)} FROM records"  # noqa: S608 - fixed column names


def iter_rows(
    conn: sqlite3.Connection, status: Status | None, *, page: int = PAGE
) -> Iterator[tuple[Any, ...]]:
    """Rows ordered by position, fetched page by page (keyset pagination).

    Each page is its own short query, so no read transaction stays open between pages:
    callers may write to the journal while iterating, and the WAL can be checkpointed.
    A journal without tables yet reads as no records.
    """
    if not has_records(conn):
        return
    where = "position > ?" + (" AND status = ?" if status is not None else "")
    sql = f"{_select(conn)} WHERE {where} ORDER BY position LIMIT ?"
    last = -1
    while True:
        args: tuple[Any, ...] = (last, status.value, page) if status else (last, page)
        rows = conn.execute(sql, args).fetchall()
        yield from rows
        if len(rows) < page:
            return
        last = rows[-1][0]
