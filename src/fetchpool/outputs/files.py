"""The files writer: one file per item, published under a safe, deterministic name.

Publishing never replaces anything (``fsutil.publish`` links, it does not rename over): a
name already taken is either our own identical file from an earlier run whose journal row
was lost (adopted), or something else, in which case ``NAME-2.ext``, ``NAME-3.ext``... are
tried. A symlink planted at a final name is neither followed nor replaced.

With ``folder_size`` (``--shard-size`` with ``--format files``), item ``position`` goes into
the numbered subfolder ``OUT/{position // folder_size:05d}/``, as img2dataset's files output
does: a subfolder holds the items of ``folder_size`` consecutive input rows (fewer files when
some fail), and a re-run puts an item where the first run did. ``record.path`` then names the
subfolder (``00003/cat-3f2a9c01d4e7.jpg``). Sidecars (``NAME.json``) and captions
(``NAME.txt``, with ``caption_column``) are written beside each file, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import threading
from enum import Enum
from pathlib import Path
from typing import Any

from fetchpool import fsutil
from fetchpool.errors import DiskFullError, OutputError
from fetchpool.models import ErrorCode, Record
from fetchpool.outputs.naming import file_name, with_counter
from fetchpool.outputs.table import caption_text
from fetchpool.redact import redact_url
from fetchpool.state import schema
from fetchpool.state.paths import tmp_dir

#: How many ``-N`` variants are tried before the item fails with IO_ERROR.
MAX_VARIANTS = 100
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1024 * 1024


def _file_digest(path: str) -> tuple[int, str] | None:
    """(size, sha256) of a regular file, never following a symlink; None if not one."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None  # a symlink (ELOOP), a folder, gone...
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        return info.st_size, digest.hexdigest()


def _same_file(existing: str, temp: str) -> bool:
    """True when ``existing`` is a regular file with exactly the bytes of ``temp``."""
    try:
        info = os.lstat(existing)
        if not stat.S_ISREG(info.st_mode) or info.st_size != Path(temp).stat().st_size:
            return False
    except OSError:
        return False
    theirs = _file_digest(existing)
    return theirs is not None and theirs == _file_digest(temp)


class FilesWriter:
    """:class:`fetchpool.stages.Writer` that publishes each body as a file in ``out``.

    Every returned record has its final name; the folder is fsynced by :meth:`sync`, which the
    journal calls before it commits (one directory fsync per commit, not one per file). Safe
    to call from many threads at once: each write touches only its own names.
    """

    concurrent = True
    #: Failed and skipped records are journaled at once (no shard to hold them).
    holds_rows = False

    def __init__(
        self,
        out: Path,
        *,
        sidecar: bool = False,
        caption_column: str | None = None,
        folder_size: int | None = None,
    ) -> None:
        self.out = Path(out)
        self.sidecar = sidecar
        self.caption_column = caption_column
        self.folder_size = folder_size
        self._tmp = tmp_dir(self.out)
        self._lock = threading.Lock()
        self._dirty: set[str] = set()  # subfolders with names not yet fsynced

    def sync(self) -> None:
        """fsync the subfolders written to, then OUT, so every name published so far
        survives a crash.

        OUT unconditionally: files may also have been published by fetch worker processes,
        which this object cannot see, and an fsync of an unchanged folder costs next to
        nothing. Their subfolders are known because the run loop passes every published
        record through :meth:`write` before journaling it.
        """
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for folder in sorted(dirty):
            fsutil.fsync_dir(self.out / folder)
        fsutil.fsync_dir(self.out)

    def write(self, record: Record) -> list[Record]:
        """Publish ``record.temp_path``; set ``record.path`` (relative to ``out``).

        Records without a temp file (failures, skips) pass through untouched. A per-item
        filesystem error fails the item with IO_ERROR; a full disk raises DiskFullError.
        """
        temp = record.temp_path
        if temp is None:
            self._mark(record.path)  # published by a fetch worker process
            return [record]
        try:
            folder = self._folder(record.position)
            name = self._publish(
                temp, file_name(record.url, record.extension), folder, synced=record.temp_synced
            )
            if name is not None:
                record.temp_path = None  # linked to its name, or adopted and discarded
            if name is None:
                record.fail(
                    ErrorCode.IO_ERROR,
                    f"no free file name after {MAX_VARIANTS} tries for {redact_url(record.url)}",
                )
            else:
                record.path = f"{folder}/{name}" if folder else name
                self._mark(record.path)
                if self.sidecar:
                    self._write_beside(record.path, ".json", _sidecar_bytes(record))
                if self.caption_column is not None:
                    caption = caption_text(record, self.caption_column).encode()
                    self._write_beside(record.path, ".txt", caption)
        except OSError as exc:
            self._fail(record, fsutil.translate_os_error(exc, "cannot publish a file"))
        except DiskFullError:
            raise
        except OutputError as exc:
            self._fail(record, exc)
        finally:
            fsutil.discard(record.temp_path)
            record.temp_path = None
        return [record]

    def close(self) -> list[Record]:
        """Nothing is buffered: every write is durable when it returns."""
        return []

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _fail(record: Record, exc: OutputError) -> None:
        if isinstance(exc, DiskFullError):
            raise exc
        record.path = None
        record.fail(ErrorCode.IO_ERROR, str(exc))

    def _folder(self, position: int) -> str:
        """The item's subfolder (made if needed; never a symlink), or "" without folders."""
        if self.folder_size is None:
            return ""
        folder = f"{position // self.folder_size:05d}"
        path = self.out / folder
        try:
            path.mkdir(exist_ok=True)
            info = path.lstat()
        except OSError as exc:
            raise fsutil.translate_os_error(exc, f"cannot create {path}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise OutputError(f"{path} exists and is not a folder (a symlink or a file?)")
        return folder

    def _mark(self, path: str | None) -> None:
        folder = path.rpartition("/")[0] if path else ""
        if folder:
            with self._lock:
                self._dirty.add(folder)

    def _publish(
        self, temp: str, name: str, folder: str = "", *, synced: bool = False
    ) -> str | None:
        """Give ``temp`` the first free (or identical) variant of ``name``; return it."""
        if not synced:
            fsutil.sync_file(temp)  # its bytes are on disk before it has a final name
        where = self.out / folder if folder else self.out
        for counter in range(1, MAX_VARIANTS + 1):
            candidate = name if counter == 1 else with_counter(name, counter)
            final = str(where / candidate)
            if fsutil.publish(temp, final, sync_dir=False):
                return candidate
            if _same_file(final, temp):
                # A re-run whose journal row was lost: the file is already ours.
                fsutil.discard(temp)
                return candidate
        return None

    def _write_beside(self, path: str, suffix: str, data: bytes) -> None:
        """Write ``KEY<suffix>`` next to the file at ``path`` (relative to OUT), atomically:
        ``KEY.json`` (the sidecar) or ``KEY.txt`` (the caption)."""
        key = path.rpartition(".")[0] or path
        self._tmp.mkdir(parents=False, exist_ok=True)
        handle, temp = fsutil.create_temp(self._tmp, suffix=suffix)
        try:
            try:
                handle.write(data)
            finally:
                fsutil.finish_temp(handle)
            # An existing one (from the run that first published this file) is kept.
            fsutil.publish(temp, str(self.out / f"{key}{suffix}"), sync_dir=False)
        finally:
            fsutil.discard(temp)


def _sidecar_bytes(record: Record) -> bytes:
    """The record as the manifest shows its row: the journal's columns (transient fields
    such as ``temp_path`` and ``temp_synced`` left out), enums as their values, URLs
    redacted."""
    shown = schema.redact_record(dataclasses.replace(record))  # a copy: ``record`` goes on
    fields: dict[str, Any] = {name: _plain(getattr(shown, name)) for name in schema.NAMES}
    return (json.dumps(fields, ensure_ascii=False, indent=1, default=str) + "\n").encode()


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value
