"""Safe file primitives shared by every stage that touches the output folder. Bottom layer.

RELIABILITY.md property 1 and 4: nothing outside OUT is created or followed, and no partial
file ever has a final name. Temp files are created with ``O_EXCL | O_NOFOLLOW`` so a planted
symlink is never written through; publishing links the temp file to its final name, which fails
instead of replacing anything already there (a planted symlink included).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
from pathlib import Path
from typing import BinaryIO

from fetchpool.errors import DiskFullError, OutputError

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

TEMP_PREFIX = ".fp-"
TEMP_SUFFIX = ".part"


#: Write buffer of temp files: bodies arrive in chunks this size or larger anyway; an explicit
#: size also spares the isatty() ioctl that the default buffering asks for on every open.
_BUFFER = 64 * 1024


# Temp names: a random per-process part (drawn once) and a counter. A name planted in
# advance can only make a create retry (O_EXCL); drawing random bytes per file cost a
# getrandom() call, i.e. one more GIL hand-off per item under many threads.
_NAMES = itertools.count()
_name_prefix = ""


def _temp_name(directory: Path | str, suffix: str) -> str:
    global _name_prefix  # noqa: PLW0603 - the process's name source
    if not _name_prefix:  # two threads racing here draw two prefixes: still unique names
        _name_prefix = os.urandom(6).hex()
    return os.path.join(directory, f"{TEMP_PREFIX}{_name_prefix}{next(_NAMES):x}{suffix}")


def _new_name_prefix() -> None:
    # A forked child must not reuse its parent's names (it would only retry, but needlessly);
    # a name found taken also draws a new random part, so planted names cannot follow it.
    global _name_prefix  # noqa: PLW0603
    _name_prefix = ""


os.register_at_fork(after_in_child=_new_name_prefix)


def create_temp_fd(directory: Path | str, suffix: str = TEMP_SUFFIX) -> tuple[int, str]:
    """Create a new, empty temp file in ``directory``; return its descriptor (write-only) and
    its path. For writers of whole chunks: no Python file object, so no ``fstat``/``lseek``
    per file (see :func:`write_all`)."""
    for _ in range(16):
        path = _temp_name(directory, suffix)
        try:
            fd = os.open(path, _CREATE_FLAGS | _CLOEXEC, 0o644)
        except FileExistsError:
            _new_name_prefix()  # someone guessed the names: draw a new random part
            continue
        except OSError as exc:
            raise translate_os_error(exc, f"cannot create a temp file in {directory}") from exc
        return fd, path
    raise OutputError(f"cannot create a unique temp file in {directory}")


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def create_temp(directory: Path | str, suffix: str = TEMP_SUFFIX) -> tuple[BinaryIO, str]:
    """Create a new, empty temp file in ``directory``; return it open for writing and its path.

    The name is unpredictable from outside, and a name planted in advance can only make this
    call retry.
    """
    fd, path = create_temp_fd(directory, suffix)
    return os.fdopen(fd, "wb", buffering=_BUFFER), path


def finish_temp(handle: BinaryIO, *, sync: bool = True) -> None:
    """Flush a temp file, fsync it (unless ``sync`` is False), then close it.

    Stages that only hand a temp file on (fetch, the CPU stage) pass ``sync=False``: the writer
    that gives it a final name fsyncs it first (:func:`sync_file`), in parallel threads, and a
    shard writer never needs the sample's own temp file on disk at all.
    """
    try:
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
    finally:
        handle.close()


def sync_file(path: str) -> None:
    """fsync a finished file by name (never following a symlink planted there)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def abandon(handle: BinaryIO, path: str) -> None:
    """Give up a temp file after an error: close it (the flush of its buffer may fail again,
    e.g. on a full disk, and must not hide the first error), then remove it."""
    with contextlib.suppress(OSError):
        handle.close()
    discard(path)


def discard(path: str | None) -> None:
    """Remove a temp file if it exists; never follows anything, never raises."""
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def fsync_dir(directory: Path | str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp_path: str, final_path: str, *, sync_dir: bool = True) -> bool:
    """Give a complete temp file its final name without ever replacing an existing entry.

    Returns False (and leaves both untouched) when ``final_path`` already exists, be it a file,
    a folder or a symlink planted there. The directory is fsynced so the name survives a crash,
    unless ``sync_dir`` is False: then the caller fsyncs it (once for many files) before it
    records the publication anywhere.
    """
    try:
        os.link(temp_path, final_path, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise translate_os_error(exc, f"cannot publish {final_path}") from exc
        # Filesystems without hard links: check, then rename (a narrow window, documented).
        if os.path.lexists(final_path):
            return False
        os.rename(temp_path, final_path)
    else:
        os.unlink(temp_path)
    if sync_dir:
        fsync_dir(os.path.dirname(final_path) or ".")
    return True


def translate_os_error(exc: OSError, context: str) -> OutputError:
    """Map an OSError to the run-level error it means (disk full stops the run)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"{context}: no space left on device")
    return OutputError(f"{context}: {exc.strerror or exc}")


#: Filesystem types where SQLite's locking and WAL cannot be trusted (sqlite.org/wal.html:
#: "WAL does not work over a network filesystem"): a journal never lives on one.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "lustre", "gpfs",
        "ceph", "glusterfs", "beegfs", "orangefs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse",
        "fuse.rclone", "fuse.juicefs", "fuse.glusterfs", "fuse.mountpoint-s3", "davfs",
    }
)  # fmt: skip


def filesystem_type(path: Path | str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem holding ``path`` (its deepest existing ancestor), from
    ``/proc/self/mountinfo``; None where that cannot be read (not Linux)."""
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best, best_type = "", None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount = fields[4].replace("\\040", " ")
                fstype = line.split(" - ", 1)[1].split()[0]
                inside = target == Path(mount) or Path(mount) in target.parents
                if inside and len(mount) >= len(best):
                    best, best_type = mount, fstype
    except OSError:
        return None
    return best_type


def on_network_filesystem(path: Path | str) -> bool:
    """Whether ``path`` is on NFS, SMB, Lustre, a FUSE bucket mount… (see above)."""
    fstype = filesystem_type(path)
    return fstype is not None and fstype in NETWORK_FILESYSTEMS
