"""Export the journal as a manifest (jsonl, csv or parquet), streaming, credentials redacted.

The database is opened read-only and the run lock is **not** taken, so the manifest of a
running job can be exported (it shows what was committed so far).
"""

from __future__ import annotations

import csv
import heapq
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

from fetchpool import fsutil
from fetchpool.errors import ConfigError, StateError
from fetchpool.models import Record, Status
from fetchpool.state import schema
from fetchpool.state.exported import in_folder
from fetchpool.state.journal import iter_journal
from fetchpool.state.paths import PLAN_NAME, db_path
from fetchpool.storage import is_remote

ManifestFormat = Literal["jsonl", "csv", "parquet"]
FORMATS: tuple[str, ...] = ("jsonl", "csv", "parquet")
PARQUET_BATCH = 10_000
_PARQUET_HINT = "writing parquet needs pyarrow: pip install 'fetchpool[parquet]'"


def _dicts(records: Iterator[Record]) -> Iterator[dict[str, Any]]:
    """Manifest rows as plain dicts (enums as their values)."""
    for record in records:
        yield {name: _plain(getattr(record, name)) for name in schema.NAMES}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


# --------------------------------------------------------------------------- writers


def _write_jsonl(rows: Iterator[dict[str, Any]], dest: TextIO) -> int:
    count = 0
    for row in rows:
        dest.write(schema.to_json(row))
        dest.write("\n")
        count += 1
    return count


def _write_csv(rows: Iterator[dict[str, Any]], dest: TextIO) -> int:
    writer = csv.writer(dest, lineterminator="\n")
    writer.writerow(schema.NAMES)
    count = 0
    for row in rows:
        writer.writerow(
            schema.to_json(row[n]) if n in schema.JSON_COLUMNS else row[n] for n in schema.NAMES
        )
        count += 1
    return count


def _parquet_schema(pa: Any) -> Any:
    types = {
        "INTEGER": pa.int64(),
        "REAL": pa.float64(),
        "TEXT": pa.string(),
    }
    columns = []
    for name, sql_type in schema.COLUMNS.items():
        arrow_type = types[sql_type.split()[0]]
        if name == "redirects":
            arrow_type = pa.list_(pa.string())
        columns.append(pa.field(name, arrow_type))
    return pa.schema(columns)


def _write_parquet(rows: Iterator[dict[str, Any]], dest: BinaryIO) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(_PARQUET_HINT) from None
    arrow_schema = _parquet_schema(pa)
    count = 0
    batch: list[dict[str, Any]] = []
    with pq.ParquetWriter(dest, arrow_schema) as writer:
        for row in rows:
            # meta varies from row to row: a JSON string keeps the schema fixed.
            row["meta"] = schema.to_json(row["meta"])
            batch.append(row)
            if len(batch) >= PARQUET_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=arrow_schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=arrow_schema))
            count += len(batch)
    return count


# --------------------------------------------------------------------------- destinations


def _write(rows: Iterator[dict[str, Any]], fmt: str, dest: BinaryIO | TextIO) -> int:
    if fmt == "parquet":
        if isinstance(dest, io.TextIOBase):
            buffer = getattr(dest, "buffer", None)
            if buffer is None:
                raise ConfigError("a parquet manifest needs a binary destination")
            dest.flush()
            return _write_parquet(rows, buffer)
        return _write_parquet(rows, dest)  # type: ignore[arg-type]
    if isinstance(dest, io.TextIOBase):
        return _write_text(rows, fmt, dest)
    text = io.TextIOWrapper(dest, encoding="utf-8", newline="")  # type: ignore[type-var]
    try:
        return _write_text(rows, fmt, text)
    finally:
        text.flush()
        text.detach()  # leave the caller's stream open


def _write_text(rows: Iterator[dict[str, Any]], fmt: str, dest: TextIO) -> int:
    return _write_jsonl(rows, dest) if fmt == "jsonl" else _write_csv(rows, dest)


def _write_path(rows: Iterator[dict[str, Any]], fmt: str, dest: Path) -> int:
    """Write to a sibling temp file, then rename: a reader never sees a half manifest."""
    handle, temp = fsutil.create_temp(dest.parent or Path(), suffix=".manifest")
    with ExitStack() as cleanup:
        cleanup.callback(fsutil.discard, temp)
        with handle:
            count = _write(rows, fmt, handle)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temp).replace(dest)
        cleanup.pop_all()
    return count


def export_manifest(
    out: Path | str | Sequence[Path | str],
    dest: BinaryIO | TextIO | Path,
    *,
    fmt: ManifestFormat | str = "jsonl",
    status: Status | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write the journal of ``out`` to ``dest`` as jsonl, csv or parquet; return rows written.

    Streams in position order with bounded memory; URLs are redacted. ``status`` keeps only
    that status. ``dest`` may be a path (written atomically) or an open stream (left open).
    ``out`` may be several output folders, e.g. one per input shard (``--shard K/N``): their
    records are merged by position, and each ``path`` is prefixed with its folder's name.
    A cluster run's destination, a local folder or an fsspec URL (``s3://bucket/ds``, with
    ``storage_options``), gives its parts' records, each ``path`` relative to it.
    Raises :class:`StateError` when a folder has no readable journal.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown manifest format {fmt!r} (use one of: {', '.join(FORMATS)})")
    given = [out] if isinstance(out, str | os.PathLike) else list(out)
    streams = []
    for folder in given:
        local = None if is_remote(folder) else Path(folder)
        if local is not None and not db_path(local).is_file() and not (local / PLAN_NAME).is_file():
            raise StateError(
                f"no journal in {folder} (expected {db_path(local)}): nothing was run there"
            )
        records = iter_journal(folder, status=status, redact=True, storage_options=storage_options)
        if len(given) > 1:
            records = in_folder(records, Path(os.fspath(folder).rstrip("/")).name)
        streams.append(records)
    merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_position)
    rows = _dicts(merged)
    if isinstance(dest, str | os.PathLike):
        return _write_path(rows, fmt, Path(dest))
    return _write(rows, fmt, dest)


def _position(record: Record) -> int:
    return record.position
