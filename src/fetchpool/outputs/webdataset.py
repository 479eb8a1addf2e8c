"""WebDataset output: samples in numbered tar shards ``OUT/00000.tar``, ``00001.tar``, ...

Each sample is members sharing a key (the zero-padded input position, unique and sortable,
without a dot: WebDataset readers split a member's name at the first dot of its base name):
``000000042.jpg`` (the image bytes), ``000000042.txt`` (the caption, with
``--caption-column``; empty when the row has none, as img2dataset writes it) and
``000000042.json`` (url, position, image facts and the input's other columns, with their JSON
types). Shards are plain POSIX tar written with :mod:`tarfile`, with fixed owner, mode and
mtime so the same samples give the same bytes; any WebDataset reader (or ``tar``) reads them.
A record's ``path`` is ``"00003.tar#000000042"``.

Beside ``00003.tar``: ``00003_stats.json`` and, when pyarrow is installed, ``00003.parquet``,
the shard's metadata: one row per input item finished while the shard was open, failures
included (``status``, ``error_code``, ``error_message``), as img2dataset writes it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from fetchpool import fsutil
from fetchpool.errors import ConfigError
from fetchpool.models import DOWNLOAD_DIGESTS, Record
from fetchpool.outputs._shards import Fill, ShardedWriter
from fetchpool.outputs.table import (
    SAMPLE_FIELDS,
    TablePlan,
    caption_text,
    meta_value,
    sample_extension,
    sample_key,
)
from fetchpool.stages import ShardLedger

log = logging.getLogger("fetchpool")

#: Member mtime: fixed, so a shard's bytes depend only on its samples.
_MTIME = 0


class WebDatasetWriter(ShardedWriter):
    """Writes records into tar shards of ``shard_size`` samples (see the module docstring).

    The sample's temp file is copied into the shard and discarded right away; the record is
    returned (durable) only once its shard is fsynced and has its final name.
    """

    suffix = ".tar"
    sampleless_suffix = ".parquet"

    def __init__(
        self,
        out: Path,
        *,
        shard_size: int = 1000,
        ledger: ShardLedger | None = None,
        caption_column: str | None = None,
        digests: Sequence[str] = (),
    ) -> None:
        super().__init__(out, shard_size=shard_size, ledger=ledger, caption_column=caption_column)
        self._tar: tarfile.TarFile | None = None
        try:
            self._plan: TablePlan | None = TablePlan(
                out, image=False, caption=caption_column, digests=digests
            )
        except ConfigError:
            log.info("pyarrow is not installed: no NNNNN.parquet metadata beside the shards")
            self._plan = None

    def _start(self, handle: BinaryIO) -> None:
        # Closed by _seal (or dropped with its temp file by _aborted).
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=handle, mode="w", format=tarfile.PAX_FORMAT
        )

    def _add(self, handle: BinaryIO, record: Record) -> None:
        assert self._tar is not None and record.temp_path is not None
        key = sample_key(record)
        with open(record.temp_path, "rb") as body:
            size = os.fstat(body.fileno()).st_size
            self._tar.addfile(_member(f"{key}.{sample_extension(record)}", size), body)
        if self.caption_column is not None:
            caption = caption_text(record, self.caption_column).encode()
            self._tar.addfile(_member(f"{key}.txt", len(caption)), io.BytesIO(caption))
        data = json.dumps(sample_meta(record), ensure_ascii=False, sort_keys=True).encode()
        self._tar.addfile(_member(f"{key}.json", len(data)), io.BytesIO(data))
        fsutil.discard(record.temp_path)  # its bytes are in the shard now
        record.temp_path = None

    def _seal(self, handle: BinaryIO, records: list[Record]) -> None:
        tar, self._tar = self._tar, None
        assert tar is not None
        tar.close()  # writes the end-of-archive blocks; leaves our handle open

    def _aborted(self, records: list[Record]) -> None:
        self._tar = None

    def _companions(self, rows: list[Record], started: float) -> dict[str, Fill]:
        companions = super()._companions(rows, started)
        plan = self._plan
        if plan is not None:
            table = plan.table(rows, lambda record: None)
            companions[".parquet"] = lambda handle: _write_parquet(plan, table, handle)
        return companions


def _write_parquet(plan: TablePlan, table: Any, handle: BinaryIO) -> None:
    _, pq = plan.modules
    with pq.ParquetWriter(handle, plan.schema, compression="zstd") as writer:
        writer.write_table(table)


def sample_meta(record: Record) -> dict[str, Any]:
    """The ``.json`` member: the input's other columns, then our facts (ours win on a clash)."""
    meta: dict[str, Any] = {name: _jsonable(value) for name, value in record.meta.items()}
    meta.update(key=sample_key(record), position=record.position)
    meta.update(
        (name, getattr(record, name))
        for name, _ in SAMPLE_FIELDS
        # md5 / sha512 only when computed (--hash): an input column of that name stays
        if name not in DOWNLOAD_DIGESTS or getattr(record, name) is not None
    )
    return meta


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return meta_value(value)


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info
