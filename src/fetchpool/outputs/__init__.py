"""Writers that publish processed records: plain files, WebDataset tar shards, Parquet shards.

Every writer implements :class:`fetchpool.stages.Writer` and returns a record only once its
output is durable. Writers are imported lazily: Parquet needs the optional pyarrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fetchpool.config import OutputConfig
from fetchpool.stages import ShardLedger, Writer

__all__ = ["make_writer"]


def make_writer(
    out: Path,
    config: OutputConfig,
    *,
    ledger: ShardLedger | None = None,
    digests: Sequence[str] = (),
) -> Writer:
    """The writer for ``config.format`` publishing into ``out``; a sharded one stages each
    shard's rows in ``ledger`` (the run's journal) before naming the shard. ``digests``
    (``md5``, ``sha512``: those the fetcher computes) become dataset columns.

    Raises :class:`fetchpool.errors.ConfigError` when the format needs a missing extra.
    """
    if config.format == "webdataset":
        from fetchpool.outputs.webdataset import WebDatasetWriter

        return WebDatasetWriter(
            out,
            shard_size=config.samples_per_shard,
            ledger=ledger,
            caption_column=config.caption_column,
            digests=digests,
        )
    if config.format == "parquet":
        from fetchpool.outputs.parquet import ParquetWriter

        return ParquetWriter(
            out,
            shard_size=config.samples_per_shard,
            ledger=ledger,
            caption_column=config.caption_column,
            digests=digests,
        )
    from fetchpool.outputs.files import FilesWriter

    return FilesWriter(
        out,
        sidecar=config.sidecar,
        caption_column=config.caption_column,
        folder_size=config.folder_size,
    )
