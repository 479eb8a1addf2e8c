"""WebDataset output: samples in numbered tar shards ``OUT/00000.tar``, ``00001.tar``, ...

Each sample is two members sharing a key (the zero-padded input position, unique and
sortable): ``000000042.jpg`` (the image bytes) and ``000000042.json`` (url, position, image
facts and the input's other columns). Shards are plain POSIX tar written with :mod:`tarfile`,
with fixed owner, mode and mtime so the same samples give the same bytes; any WebDataset
reader (or ``tar``) reads them. A record's ``path`` is ``"00003.tar#000000042"``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from fetchpool import fsutil
from fetchpool.models import Record
from fetchpool.outputs._shards import ShardedWriter, meta_value, sample_extension, sample_key
from fetchpool.stages import ShardLedger

#: Member mtime: fixed, so a shard's bytes depend only on its samples.
_MTIME = 0


class WebDatasetWriter(ShardedWriter):
    """Writes records into tar shards of ``shard_size`` samples (see the module docstring).

    The sample's temp file is copied into the shard and discarded right away; the record is
    returned (durable) only once its shard is fsynced and has its final name.
    """

    suffix = ".tar"

    def __init__(
        self, out: Path, *, shard_size: int = 1000, ledger: ShardLedger | None = None
    ) -> None:
        super().__init__(out, shard_size=shard_size, ledger=ledger)
        self._tar: tarfile.TarFile | None = None

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


def sample_meta(record: Record) -> dict[str, Any]:
    """The ``.json`` member: the input's other columns, then our facts (ours win on a clash)."""
    meta: dict[str, Any] = {name: _jsonable(value) for name, value in record.meta.items()}
    meta.update(
        key=sample_key(record),
        position=record.position,
        url=record.url,
        final_url=record.final_url,
        width=record.width,
        height=record.height,
        orig_width=record.orig_width,
        orig_height=record.orig_height,
        image_format=record.image_format,
        bytes=record.bytes,
        sha256=record.sha256,
        content_type=record.content_type,
        http_status=record.http_status,
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
