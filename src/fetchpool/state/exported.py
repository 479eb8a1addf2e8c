"""A journal's records as a file, for a part published to object storage; a cluster run's
records, merged.

The journal (SQLite) stays on the worker's local disk, where SQLite's locking holds; what is
published beside the part's outputs is this export: gzip'd JSON lines, a header naming the
columns, then one row per record in position order, the journal's own row form (unredacted, so
the records read back are the journal's). Readers map columns by name, so a file written by
a release with more or fewer columns still reads.
"""

from __future__ import annotations

import contextlib
import gzip
import heapq
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fetchpool.errors import StateError
from fetchpool.models import Record, Status
from fetchpool.state import schema
from fetchpool.state.journal import iter_journal
from fetchpool.state.paths import PLAN_NAME, db_path, part_name, part_records_name
from fetchpool.storage import Store

FORMAT = "fetchpool-records"
VERSION = 1


def export_records(out: Path, target: IO[bytes]) -> int:
    """Write every record of the journal in ``out`` to ``target``; the number written."""
    count = 0
    with (
        gzip.GzipFile(fileobj=target, mode="wb", compresslevel=6, mtime=0) as zipped,
        io.TextIOWrapper(zipped, encoding="utf-8", newline="\n") as text,
    ):
        header = {"format": FORMAT, "version": VERSION, "columns": list(schema.NAMES)}
        text.write(json.dumps(header) + "\n")
        for record in iter_journal(out):
            text.write(schema.to_json(list(schema.to_row(record))) + "\n")
            count += 1
    return count


def read_records(source: IO[bytes], name: str, *, status: Status | None = None) -> Iterator[Record]:
    """The records of an export, in position order (``status`` keeps only that status)."""
    with (
        gzip.GzipFile(fileobj=source, mode="rb") as zipped,
        io.TextIOWrapper(zipped, encoding="utf-8") as text,
    ):
        try:
            header: dict[str, Any] = json.loads(text.readline() or "{}")
        except ValueError:
            header = {}
        if header.get("format") != FORMAT:
            raise StateError(f"{name} is not a fetchpool records file")
        columns: list[str] = header["columns"]
        for number, line in enumerate(text, start=2):
            try:
                values = dict(zip(columns, json.loads(line), strict=True))
            except ValueError as exc:
                raise StateError(f"{name}, line {number}: unreadable ({exc})") from exc
            # meta and redirects stay JSON text, as in the journal's rows: from_row reads them
            row = tuple(values.get(n) for n in schema.NAMES)
            record = schema.from_row(row)
            if status is None or record.status is status:
                yield record


#: Read buffer per part when merging exports from object storage: the merge holds one open
#: stream per part, so this bounds its memory (1,000 parts: ~256 MB).
MERGE_BLOCK_BYTES = 256 * 1024


def iter_cluster_records(
    store: Store, *, status: Status | None = None, redact: bool = False
) -> Iterator[Record]:
    """The records of a cluster run's destination, merged in position order.

    Each part is read from its journal when it ran in place (a local destination), else from
    its published export; a part with neither has no records yet. Paths are made relative to
    the destination (``part-00003/cat-3f2a9c01d4e7.jpg``).
    """
    raw = store.read_bytes(PLAN_NAME)
    if raw is None:
        raise StateError(f"no cluster run in {store} (expected {store.display(PLAN_NAME)})")
    try:
        parts = int(json.loads(raw)["parts"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{store.display(PLAN_NAME)} is unreadable ({exc})") from exc
    with contextlib.ExitStack() as stack:
        streams: list[Iterator[Record]] = []
        for index in range(parts):
            records: Iterator[Record]
            folder = None if store.remote else store.path / part_name(index)
            if folder is not None and db_path(folder).is_file():
                records = iter_journal(folder, status=status, redact=redact)
            elif store.exists(part_records_name(index)):
                name = store.display(part_records_name(index))
                stream = stack.enter_context(
                    store.open_read(part_records_name(index), block_size=MERGE_BLOCK_BYTES)
                )
                records = read_records(stream, name, status=status)
                if redact:
                    records = map(schema.redact_record, records)
            else:
                continue
            streams.append(in_folder(records, part_name(index)))
        yield from heapq.merge(*streams, key=lambda record: record.position)


def in_folder(records: Iterator[Record], folder: str) -> Iterator[Record]:
    """The records with each output path prefixed by ``folder/``."""
    for record in records:
        if record.path:
            record.path = f"{folder}/{record.path}"
        yield record
