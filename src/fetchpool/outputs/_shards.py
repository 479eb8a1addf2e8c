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
"""

from __future__ import annotations

import json
import os
import re
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from fetchpool import fsutil
from fetchpool.errors import ConfigError, OutputError
from fetchpool.models import Record, Status
from fetchpool.stages import ShardLedger
from fetchpool.state.paths import tmp_dir

#: Digits in a shard name (``00042.tar``); more appear past 99999 shards, order is kept by
#: reading the number, not the name.
SHARD_DIGITS = 5
#: Names tried when a shard name is unexpectedly taken (planted file) before giving up.
_PUBLISH_TRIES = 1000
_EXTENSION = re.compile(r"[a-z0-9]{1,16}")


def sample_key(record: Record) -> str:
    """Unique, sortable key of a sample: its input position, zero-padded."""
    return f"{record.position:09d}"


def sample_extension(record: Record) -> str:
    """The record's extension without the dot, or ``bin`` when it is missing or odd."""
    ext = (record.extension or "").lstrip(".").lower()
    return ext if _EXTENSION.fullmatch(ext) else "bin"


def meta_value(value: Any) -> str | None:
    """An input column as text: strings unchanged, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


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
    only when that shard is published; ``close`` publishes the last, partial shard.
    """

    suffix: ClassVar[str]

    #: Shards are appended to in order: one writer thread only.
    concurrent = False

    def __init__(
        self, out: Path, *, shard_size: int = 1000, ledger: ShardLedger | None = None
    ) -> None:
        if shard_size < 1:
            raise ConfigError("shard_size must be >= 1")
        self.out = Path(out)
        self.shard_size = shard_size
        self._ledger = ledger
        self._tmp = tmp_dir(self.out)
        try:
            remove_stale_parts(self.out, self.suffix)
            self._next_index = next_shard_index(self.out, self.suffix)
        except OSError as exc:
            raise fsutil.translate_os_error(exc, f"cannot read {self.out}") from exc
        self._pending: list[Record] = []
        self._handle: BinaryIO | None = None
        self._temp: str | None = None
        self._closed = False

    def sync(self) -> None:
        """Nothing to do: a shard's records are returned only after it is fsynced."""
        return

    def write(self, record: Record) -> list[Record]:
        """Add one processed record; returns the records of a shard that just got published."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if record.status is not Status.OK or not record.temp_path:
            raise ValueError("a writer needs an OK record with a temp_path")
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
        if not self._pending:
            self._abort_shard()
            return []
        return self._finish_shard()

    # -- for subclasses ----------------------------------------------------------------------

    def _start(self, handle: BinaryIO) -> None:  # noqa: B027 - optional hook
        """A new shard's temp file was just created."""

    @abstractmethod
    def _add(self, handle: BinaryIO, record: Record) -> None:
        """Put one sample into the open shard (or remember it until ``_seal``)."""

    @abstractmethod
    def _seal(self, handle: BinaryIO, records: list[Record]) -> None:
        """Write whatever completes the shard (trailer, footer); the handle stays open."""

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
        handle, temp, records = self._handle, self._temp, self._pending
        assert handle is not None and temp is not None
        self._handle, self._temp, self._pending = None, None, []
        try:
            self._seal(handle, records)
            fsutil.finish_temp(handle)
            self._publish(temp, records)
        except OSError as exc:
            self._drop(handle, temp, records)
            raise fsutil.translate_os_error(exc, "cannot finish a shard") from exc
        except BaseException:
            self._drop(handle, temp, records)
            raise
        self._published(records)
        return records

    def _publish(self, temp: str, records: list[Record]) -> None:
        """Stage the rows under the next free name, then link the shard to it (see the module
        docstring); a name taken meanwhile (planted) unstages and tries the next one."""
        size = os.stat(temp).st_size
        for _ in range(_PUBLISH_TRIES):
            name = f"{self._next_index:0{SHARD_DIGITS}d}{self.suffix}"
            self._next_index += 1
            final = str(self.out / name)
            if os.path.lexists(final):
                continue
            for record in records:
                record.path = f"{name}#{sample_key(record)}"
            if self._ledger is not None:
                self._ledger.stage(name, size, records)
            try:
                published = fsutil.publish(temp, final)
            except BaseException:
                # Failed before the link: unstage. After it (removing the temp name or
                # syncing the folder failed, an interrupt), the shard has its name: its
                # staged rows stay, and the next open of the journal settles them.
                if not os.path.lexists(final):
                    self._unstage(name, records)
                raise
            if published:
                return
            self._unstage(name, records)
        raise OutputError(f"cannot find a free shard name in {self.out}")

    def _unstage(self, name: str, records: list[Record]) -> None:
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
