"""Parquet output: one row per input item in numbered shards ``OUT/00000.parquet``, ...

Columns (:mod:`fetchpool.outputs.table`): ``key`` (zero-padded position), ``position``,
``image`` (a struct ``{bytes, path}``: the storage of a ``datasets`` ``Image`` feature, named
so in the schema's ``huggingface`` metadata, so ``datasets.load_dataset("parquet", ...)``
gives PIL images), ``ext``, ``status``, ``error_code``, ``error_message``, the sample fields
(url, final_url, width, height, orig_width, orig_height, image_format, bytes, sha256,
content_type, http_status), ``caption`` (with ``--caption-column``), then the input's other
columns with their types (a clashing name becomes ``meta_<name>``). As in img2dataset, a shard
also holds the rows of the items that failed while it was open: ``image`` is null there and
``status`` is ``failed`` or ``skipped``; keep ``status == "ok"`` for training.

Sample temp files wait in the temp folder until their shard is written, so memory holds one
row group at a time (``ROW_GROUP_ROWS`` / ``ROW_GROUP_BYTES``), never a whole shard of images.
pyarrow is optional: ``pip install 'fetchpool[parquet]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from fetchpool import fsutil
from fetchpool.models import Record
from fetchpool.outputs._shards import ShardedWriter
from fetchpool.outputs.table import IMAGE_COLUMN, TablePlan
from fetchpool.stages import ShardLedger

#: A row group is written when it holds this many rows or bytes of images, whichever first:
#: small enough to bound memory, large enough for efficient scans.
ROW_GROUP_ROWS = 256
ROW_GROUP_BYTES = 64 * 1024 * 1024


class ParquetWriter(ShardedWriter):
    """Writes records into Parquet shards of ``shard_size`` samples (see the module docstring).

    Records are returned (durable) only once their shard is fsynced and has its final name;
    their temp files are removed then.
    """

    suffix = ".parquet"

    def __init__(
        self,
        out: Path,
        *,
        shard_size: int = 1000,
        ledger: ShardLedger | None = None,
        caption_column: str | None = None,
        digests: Sequence[str] = (),
    ) -> None:
        # Fails before any download when pyarrow is missing.
        self._plan = TablePlan(out, image=True, caption=caption_column, digests=digests)
        super().__init__(out, shard_size=shard_size, ledger=ledger, caption_column=caption_column)

    def _add(self, handle: BinaryIO, record: Record) -> None:
        pass  # rows are built at _seal, from the temp files, one row group at a time

    def _seal(self, handle: BinaryIO, records: list[Record]) -> None:
        _, pq = self._plan.modules
        groups = _row_groups(records)
        first = self._plan.table(groups[0], _read_image)  # pins the run's schema
        schema = self._plan.schema
        compression = {name: "zstd" for name in schema.names} | {IMAGE_COLUMN: "none"}
        writer = pq.ParquetWriter(handle, schema, compression=compression)
        try:
            writer.write_table(first)
            for batch in groups[1:]:
                writer.write_table(self._plan.table(batch, _read_image))
        finally:
            writer.close()  # writes the footer; leaves our handle open

    def _published(self, records: list[Record]) -> None:
        _discard_temps(records)

    def _aborted(self, records: list[Record]) -> None:
        _discard_temps(records)


def _read_image(record: Record) -> bytes | None:
    return Path(record.temp_path).read_bytes() if record.ok and record.temp_path else None


def _row_groups(records: list[Record]) -> list[list[Record]]:
    groups: list[list[Record]] = [[]]
    size = 0
    for record in records:
        if groups[-1] and (len(groups[-1]) >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(record)
        size += record.bytes if record.ok else 0
    return groups


def _discard_temps(records: list[Record]) -> None:
    for record in records:
        fsutil.discard(record.temp_path)
        record.temp_path = None
