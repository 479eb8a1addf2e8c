"""What the dataset writers share: numbered shards, written as temp files, published when full.

A shard is written under a temp name in ``OUT/.fetchpool/tmp/`` (``fsutil.create_temp``; that
folder is emptied at the start of every run, so a killed run leaves nothing behind), fsynced,
then linked to its final name ``NNNNN<suffix>`` in OUT (``fsutil.publish``, which never replaces
anything). Just before the link, the shard's rows are staged in the journal
(:class:`fetchpool.stages.ShardLedger`): a run killed between the link and the journal's next
commit has the shard's rows rolled forward when the journal is next opened, so its samples are
never fetched again into a second shard. Records are returned to the caller only after the
link, so the journal never claims a sample a crash could lose. Numbering continues after the
highest shard already in OUT: a resumed run never overwrites one.

A shard also holds the rows of the items that failed (or were skipped) while it was open, as
img2dataset's shards do: each such record is given to :meth:`ShardedWriter.write` and returned
with the shard, staged and journaled with it, so every input row a run finishes is in exactly
one shard's metadata. Beside each shard, its companions (``NNNNN_stats.json``, and for a tar
the metadata ``NNNNN.parquet``) are written as temp files, fsynced and linked *before* the
shard's own name: a shard with a name always has them, and the journal removes those of a
shard a crash left without its name (:func:`fetchpool.state.paths.shard_companions`).
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, ClassVar

from fetchpool import fsutil
from fetchpool.errors import ConfigError, OutputError
from fetchpool.models import Record, Status
from fetchpool.outputs.table import meta_value, sample_extension, sample_key
from fetchpool.stages import ShardLedger
from fetchpool.state.paths import tmp_dir

__all__ = [
    "SHARD_DIGITS",
    "ShardedWriter",
    "meta_value",
    "next_shard_index",
    "remove_stale_parts",
    "sample_extension",
    "sample_key",
]

#: A companion file's writer: fills an open temp file.
Fill = Callable[[BinaryIO], None]

#: Digits in a shard name (``00042.tar``); more appear past 99999 shards, order is kept by
#: reading the number, not the name.
SHARD_DIGITS = 5
#: Names tried when a shard name is unexpectedly taken (planted file) before giving up.
_PUBLISH_TRIES = 1000


def next_shard_index(out: Path, suffix: str) -> int:
    """One past the highest ``NNNNN<suffix>`` already in ``out`` (0 when there is none)."""
    pattern = re.compile(rf"(\d{{{SHARD_DIGITS},}}){re.escape(suffix)}")
    highest = -1
    with os.scandir(out) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def remove_stale_parts(out: Path, suffix: str) -> None:
    """Delete shard temp files that fetchpool 0.1 runs, which kept them in OUT itself, left
    behind when killed (our own temp names only; today's are in ``.fetchpool/tmp/``).

    Safe because the run holds the output folder's lock: no other writer is using them.
    """
    pattern = re.compile(
        rf"{re.escape(fsutil.TEMP_PREFIX)}[0-9a-f]+{re.escape(suffix)}{fsutil.TEMP_SUFFIX}"
    )
    with os.scandir(out) as entries:
        for entry in entries:
            if pattern.fullmatch(entry.name) and stat.S_ISREG(
                entry.stat(follow_symlinks=False).st_mode
            ):
                fsutil.discard(entry.path)


class ShardedWriter(ABC):
    """Life cycle of a sharded output; subclasses say how samples go into one shard.

    Implements :class:`fetchpool.stages.Writer`. ``write`` returns the records of a shard
    only when that shard is published; ``close`` publishes the last, partial shard. A shard
    is published when it holds ``shard_size`` samples, or ``shard_size`` other rows (failed
    or skipped items, so memory stays bounded when nearly everything fails).
    """

    suffix: ClassVar[str]

    #: Shards are appended to in order: one writer thread only.
    concurrent = False
    #: Failed and skipped records are held with the open shard too (its metadata).
    holds_rows = True

    def __init__(
        self,
        out: Path,
        *,
        shard_size: int = 1000,
        ledger: ShardLedger | None = None,
        caption_column: str | None = None,
    ) -> None:
        if shard_size < 1:
            raise ConfigError("shard_size must be >= 1")
        self.out = Path(out)
        self.shard_size = shard_size
        self.caption_column = caption_column
        self._ledger = ledger
        self._tmp = tmp_dir(self.out)
        try:
            remove_stale_parts(self.out, self.suffix)
            self._next_index = next_shard_index(self.out, self.suffix)
        except OSError as exc:
            raise fsutil.translate_os_error(exc, f"cannot read {self.out}") from exc
        self._pending: list[Record] = []
        self._others: list[Record] = []  # failed / skipped rows of the open shard
        self._opened_at = time.time()
        self._handle: BinaryIO | None = None
        self._temp: str | None = None
        self._closed = False

    def sync(self) -> None:
        """Nothing to do: a shard's records are returned only after it is fsynced."""
        return

    def write(self, record: Record) -> list[Record]:
        """Add one finished record: a sample (OK, with its ``temp_path``) or a failed or
        skipped row; returns the records of a shard that just got published."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if record.status is not Status.OK or not record.temp_path:
            if record.status is Status.OK:
                raise ValueError("an OK record needs a temp_path")
            record.path = None
            self._others.append(record)
            if len(self._others) >= self.shard_size:
                self._handle or self._open_shard()
                return self._finish_shard()
            return []
        handle = self._handle or self._open_shard()
        try:
            self._add(handle, record)
        except OSError as exc:
            self._abort_shard()
            raise fsutil.translate_os_error(exc, "cannot write a shard") from exc
        except BaseException:
            self._abort_shard()
            raise
        self._pending.append(record)
        if len(self._pending) >= self.shard_size:
            return self._finish_shard()
        return []

    def close(self) -> list[Record]:
        """Publish the last shard if it holds anything; returns its records. Idempotent."""
        if self._closed:
            return []
        self._closed = True
        if not self._pending and not self._others:
            self._abort_shard()
            return []
        if self._handle is None:
            self._open_shard()
        return self._finish_shard()

    # -- for subclasses ----------------------------------------------------------------------

    def _start(self, handle: BinaryIO) -> None:  # noqa: B027 - optional hook
        """A new shard's temp file was just created."""

    @abstractmethod
    def _add(self, handle: BinaryIO, record: Record) -> None:
        """Put one sample into the open shard (or remember it until ``_seal``)."""

    @abstractmethod
    def _seal(self, handle: BinaryIO, records: list[Record]) -> None:
        """Write whatever completes the shard (trailer, footer); the handle stays open.
        ``records`` are all its rows in position order: samples and others."""

    def _companions(self, rows: list[Record], started: float) -> dict[str, Fill]:
        """Files published beside the shard, by suffix (``_stats.json``): how to fill each."""
        stats = _stats(rows, started, time.time())
        return {"_stats.json": lambda handle: handle.write(stats)}

    def _aborted(self, records: list[Record]) -> None:  # noqa: B027 - optional hook
        """The shard was dropped; its records were not published."""

    def _published(self, records: list[Record]) -> None:  # noqa: B027 - optional hook
        """The shard has its final name; ``records`` are durable."""

    # -- internals ---------------------------------------------------------------------------

    def _open_shard(self) -> BinaryIO:
        self._tmp.mkdir(exist_ok=True)  # the journal made it; a bare writer (tests) may not
        handle, temp = fsutil.create_temp(self._tmp, f"{self.suffix}{fsutil.TEMP_SUFFIX}")
        self._handle, self._temp = handle, temp
        try:
            self._start(handle)
        except BaseException:
            self._abort_shard()
            raise
        return handle

    def _finish_shard(self) -> list[Record]:
        handle, temp, samples = self._handle, self._temp, self._pending
        assert handle is not None and temp is not None
        rows = sorted(samples + self._others, key=lambda r: r.position)
        self._handle, self._temp, self._pending, self._others = None, None, [], []
        opened_at, self._opened_at = self._opened_at, time.time()
        companions: dict[str, str] = {}
        try:
            self._seal(handle, rows)
            fsutil.finish_temp(handle)
            for suffix, fill in self._companions(rows, opened_at).items():
                companions[suffix] = self._companion_temp(fill)
            self._publish(temp, rows, companions)
        except OSError as exc:
            self._drop(handle, temp, samples)
            raise fsutil.translate_os_error(exc, "cannot finish a shard") from exc
        except BaseException:
            self._drop(handle, temp, samples)
            raise
        finally:
            for companion in companions.values():
                fsutil.discard(companion)
        self._published(samples)
        return rows

    def _companion_temp(self, fill: Fill) -> str:
        handle, temp = fsutil.create_temp(self._tmp)
        try:
            fill(handle)
            fsutil.finish_temp(handle)
        except BaseException:
            fsutil.abandon(handle, temp)
            raise
        return temp

    def _publish(self, temp: str, records: list[Record], companions: dict[str, str]) -> None:
        """Stage the rows under the next free name, link the companions, then the shard
        (see the module docstring); a name taken meanwhile (planted) unstages, removes the
        companions linked so far and tries the next one."""
        size = os.stat(temp).st_size
        for _ in range(_PUBLISH_TRIES):
            name = f"{self._next_index:0{SHARD_DIGITS}d}{self.suffix}"
            self._next_index += 1
            final = str(self.out / name)
            stem = name.removesuffix(self.suffix)
            beside = {str(self.out / f"{stem}{s}"): path for s, path in companions.items()}
            if os.path.lexists(final) or any(os.path.lexists(p) for p in beside):
                continue
            for record in records:
                record.path = f"{name}#{sample_key(record)}" if record.ok else None
            if self._ledger is not None:
                self._ledger.stage(name, size, records)
            linked: list[tuple[str, str]] = []
            try:
                for final_companion, path in beside.items():
                    if not fsutil.publish(path, final_companion, sync_dir=False):
                        break
                    linked.append((final_companion, path))
                published = len(linked) == len(beside) and fsutil.publish(temp, final)
            except BaseException:
                # Failed before the link: unstage. After it (removing the temp name or
                # syncing the folder failed, an interrupt), the shard has its name: its
                # staged rows stay, and the next open of the journal settles them.
                if not os.path.lexists(final):
                    self._unstage(name, records, linked)
                raise
            if published:
                return
            self._unstage(name, records, linked)
        raise OutputError(f"cannot find a free shard name in {self.out}")

    def _unstage(self, name: str, records: list[Record], linked: list[tuple[str, str]]) -> None:
        # Our own companions of a shard that gets no name: back to their temp names, for the
        # next name to try (their bytes do not depend on the name).
        for final, temp in linked:
            try:
                os.rename(final, temp)
            except OSError:
                fsutil.discard(final)
        for record in records:
            record.path = None
        if self._ledger is not None:
            self._ledger.unstage(name)

    def _abort_shard(self) -> None:
        handle, temp, records = self._handle, self._temp, self._pending
        self._handle, self._temp, self._pending = None, None, []
        if handle is not None and temp is not None:
            self._drop(handle, temp, records)

    def _drop(self, handle: BinaryIO, temp: str, records: list[Record]) -> None:
        fsutil.abandon(handle, temp)
        self._aborted(records)


def _stats(rows: list[Record], started: float, ended: float) -> bytes:
    """``NNNNN_stats.json``: the shard's rows counted by status and error code."""
    status: dict[str, int] = {}
    errors: dict[str, int] = {}
    for row in rows:
        status[row.status.value] = status.get(row.status.value, 0) + 1
        if row.error_code is not None:
            errors[row.error_code.value] = errors.get(row.error_code.value, 0) + 1
    stats = {
        "count": len(rows),
        "successes": status.get(Status.OK.value, 0),
        "failed": status.get(Status.FAILED.value, 0),
        "skipped": status.get(Status.SKIPPED.value, 0),
        "status": dict(sorted(status.items())),
        "errors": dict(sorted(errors.items())),
        "bytes": sum(row.bytes for row in rows if row.ok),
        "start_time": started,
        "end_time": ended,
        "duration": max(0.0, ended - started),
    }
    return (json.dumps(stats, indent=1) + "\n").encode()
