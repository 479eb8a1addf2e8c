"""Parquet output: one row per sample in numbered shards ``OUT/00000.parquet``, ...

Columns: ``key`` (zero-padded position), ``position``, ``url``, ``image`` (the bytes), ``ext``,
``width``, ``height``, ``orig_width``, ``orig_height``, ``sha256``, ``content_type``, then the
input's other columns as strings (JSON for anything but a string), in first-seen order. An
input column whose name clashes with ours is stored as ``meta_<name>``.

Sample temp files wait in the temp folder until their shard is written, so memory holds one
row group at a time (``ROW_GROUP_ROWS`` / ``ROW_GROUP_BYTES``), never a whole shard of images.
pyarrow is optional: ``pip install 'fetchpool[parquet]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

from fetchpool import fsutil
from fetchpool.errors import ConfigError
from fetchpool.models import Record
from fetchpool.outputs._shards import ShardedWriter, meta_value, sample_extension, sample_key
from fetchpool.stages import ShardLedger

#: A row group is written when it holds this many rows or bytes of images, whichever first:
#: small enough to bound memory, large enough for efficient scans.
ROW_GROUP_ROWS = 256
ROW_GROUP_BYTES = 64 * 1024 * 1024

_INSTALL_HINT = "parquet output needs pyarrow: pip install 'fetchpool[parquet]'"


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError(_INSTALL_HINT) from exc
    return pa, pq


class ParquetWriter(ShardedWriter):
    """Writes records into Parquet shards of ``shard_size`` rows (see the module docstring).

    Records are returned (durable) only once their shard is fsynced and has its final name;
    their temp files are removed then.
    """

    suffix = ".parquet"

    def __init__(
        self, out: Path, *, shard_size: int = 1000, ledger: ShardLedger | None = None
    ) -> None:
        self._pa, self._pq = _pyarrow()  # fail before any download when pyarrow is missing
        super().__init__(out, shard_size=shard_size, ledger=ledger)

    def _add(self, handle: BinaryIO, record: Record) -> None:
        pass  # rows are built at _seal, from the temp files, one row group at a time

    def _seal(self, handle: BinaryIO, records: list[Record]) -> None:
        meta_columns = _meta_columns(records)
        schema = self._schema(meta_columns)
        compression = {name: "zstd" for name in schema.names} | {"image": "none"}
        writer = self._pq.ParquetWriter(handle, schema, compression=compression)
        try:
            for batch in _row_groups(records):
                writer.write_table(self._table(schema, batch, meta_columns))
        finally:
            writer.close()  # writes the footer; leaves our handle open

    def _published(self, records: list[Record]) -> None:
        _discard_temps(records)

    def _aborted(self, records: list[Record]) -> None:
        _discard_temps(records)

    def _schema(self, meta_columns: dict[str, str]) -> Any:
        pa = self._pa
        fields = [
            ("key", pa.string()),
            ("position", pa.int64()),
            ("url", pa.string()),
            ("image", pa.binary()),
            ("ext", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("orig_width", pa.int32()),
            ("orig_height", pa.int32()),
            ("sha256", pa.string()),
            ("content_type", pa.string()),
        ]
        fields += [(column, pa.string()) for column in meta_columns.values()]
        return pa.schema(fields)

    def _table(self, schema: Any, records: list[Record], meta_columns: dict[str, str]) -> Any:
        columns: dict[str, list[Any]] = {
            "key": [sample_key(r) for r in records],
            "position": [r.position for r in records],
            "url": [r.url for r in records],
            "image": [Path(r.temp_path or "").read_bytes() for r in records],
            "ext": [sample_extension(r) for r in records],
            "width": [r.width for r in records],
            "height": [r.height for r in records],
            "orig_width": [r.orig_width for r in records],
            "orig_height": [r.orig_height for r in records],
            "sha256": [r.sha256 for r in records],
            "content_type": [r.content_type for r in records],
        }
        for name, column in meta_columns.items():
            columns[column] = [meta_value(r.meta.get(name)) for r in records]
        return self._pa.table(columns, schema=schema)


_FIXED = frozenset(
    {"key", "position", "url", "image", "ext", "width", "height", "orig_width", "orig_height"}
    | {"sha256", "content_type"}
)


def _meta_columns(records: list[Record]) -> dict[str, str]:
    """Input column name → Parquet column name, in first-seen order."""
    columns: dict[str, str] = {}
    taken = set(_FIXED)
    for record in records:
        for name in record.meta:
            if name in columns:
                continue
            column = f"meta_{name}" if name in _FIXED else str(name)
            if column in taken:
                continue  # meta_<x> clashing with an input column literally named so
            columns[name] = column
            taken.add(column)
    return columns


def _row_groups(records: list[Record]) -> list[list[Record]]:
    groups: list[list[Record]] = [[]]
    size = 0
    for record in records:
        if groups[-1] and (len(groups[-1]) >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(record)
        size += record.bytes
    return groups


def _discard_temps(records: list[Record]) -> None:
    for record in records:
        fsutil.discard(record.temp_path)
        record.temp_path = None
