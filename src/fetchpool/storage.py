"""Where a cluster run's results and inputs live: a local folder or an fsspec URL.

A :class:`Store` is a folder-like place addressed by relative names (``part-00003/0001.tar``,
``.fetchpool/plan.json``), local or remote (``s3://bucket/ds``, ``gs://…``, ``memory://…``).
It offers only what publishing whole files needs: read, write whole, upload a finished local
file, list, remove. A file appears whole or not at all: locally it is written to a temp name
in its folder, fsynced and renamed; in an object store a single PUT is atomic already.

fsspec and the protocol's package (s3fs, gcsfs, adlfs…) are imported only for a URL, with an
install hint when missing. S3-compatible stores are reached as their users configure them:
the standard AWS environment (``AWS_ENDPOINT_URL``, credentials, region), fsspec's own
configuration, and ``storage_options`` (``--storage-option KEY=VALUE``) for the rest.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO

from fetchpool import fsutil
from fetchpool.errors import ConfigError, OutputError

#: The fsspec package of each common protocol, for install hints.
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hdfs": "pyarrow",
}
_LOCAL_PROTOCOLS = frozenset({"file", "local"})


def is_remote(target: object) -> bool:
    """Whether ``target`` names a place by URL (``s3://…``) rather than a local path."""
    if not isinstance(target, str):
        return False
    protocol, sep, _ = target.partition("://")
    return (
        bool(sep)
        and protocol.isascii()
        and protocol.replace("+", "").isalnum()
        and (protocol.lower() not in _LOCAL_PROTOCOLS)
    )


def local_path(target: str | os.PathLike[str]) -> Path:
    """A local target as a Path (``file:///x`` as ``/x``)."""
    text = os.fspath(target)
    return Path(text.removeprefix("file://")) if text.startswith("file://") else Path(text)


def _install_hint(url: str) -> str:
    protocol = url.partition("://")[0].lower()
    package = _PACKAGES.get(protocol)
    if package == "s3fs":
        return f"{url}: object storage needs s3fs: pip install 'fetchpool[s3]'"
    if package:
        return f"{url}: {protocol}:// needs fsspec and {package}: pip install {package}"
    return f"{url}: URLs as destinations or inputs need fsspec: pip install 'fetchpool[s3]'"


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a clear error when it cannot be had."""
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise ConfigError(_install_hint(url)) from exc
    protocol = url.partition("://")[0].lower()
    if protocol not in fsspec.available_protocols():
        raise ConfigError(f"{url}: unknown storage protocol {protocol!r}")
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise ConfigError(_install_hint(url)) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{url}: bad --storage-option ({exc})") from exc
    return fs, str(path).rstrip("/")


def open_input(
    url: str, storage_options: Mapping[str, Any] | None = None, *, compression: str | None = None
) -> IO[bytes]:
    """Open a remote input file for streaming binary reads (the caller closes it);
    ``compression="gzip"`` decompresses as it reads."""
    fs, path = filesystem(url, storage_options)
    try:
        stream = fs.open(path, "rb", compression=compression)
    except FileNotFoundError:
        raise FileNotFoundError(url) from None
    if compression:
        return stream  # type: ignore[no-any-return]
    # fsspec's own files take no size in readline(); a buffered reader does, as files do.
    return io.BufferedReader(stream, 1024 * 1024)


def input_size(url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Size of a remote file; FileNotFoundError / IsADirectoryError as for a local one."""
    fs, path = filesystem(url, storage_options)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(url)
    return int(info.get("size") or 0)


class Store:
    """A destination folder, local or remote, addressed by relative ``/``-separated names."""

    def __init__(
        self, target: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.remote = is_remote(target)
        self.url = os.fspath(target)
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._root = ""
        if self.remote:
            self._fs, self._root = filesystem(self.url, self.storage_options)
        else:
            self.path = local_path(target)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def _remote(self, name: str) -> str:
        return f"{self._root}/{name}" if name else self._root

    def display(self, name: str) -> str:
        """``name`` as the user would write it: ``s3://bucket/ds/part-00003``."""
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    # ------------------------------------------------------------------ reading

    def exists(self, name: str) -> bool:
        if self.remote:
            return bool(self._fs.exists(self._remote(name)))
        return (self.path / name).exists()

    def read_bytes(self, name: str) -> bytes | None:
        """The whole file ``name``, or None when there is none."""
        try:
            if self.remote:
                data: bytes = self._fs.cat_file(self._remote(name))
                return data
            return (self.path / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def size(self, name: str) -> int | None:
        """Size of file ``name`` in bytes; None when there is none."""
        try:
            if self.remote:
                return int(self._fs.size(self._remote(name)))
            return (self.path / name).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open_read(self, name: str, *, block_size: int | None = None) -> IO[bytes]:
        """Open file ``name`` for streaming reads; ``block_size`` bounds a remote read-ahead."""
        if self.remote:
            extra = {} if block_size is None else {"block_size": block_size}
            return self._fs.open(self._remote(name), "rb", **extra)  # type: ignore[no-any-return]
        return (self.path / name).open("rb")

    def walk_files(self, name: str) -> Iterator[str]:
        """Relative names of every file under folder ``name`` (none when it is missing)."""
        if self.remote:
            base = self._remote(name)
            if not self._fs.exists(base):
                return
            for found in sorted(self._fs.find(base)):
                yield f"{name}/{str(found)[len(base) :].lstrip('/')}"
            return
        folder = self.path / name
        if folder.is_dir():
            for found in sorted(folder.rglob("*")):
                if found.is_file():
                    yield found.relative_to(self.path).as_posix()

    # ------------------------------------------------------------------ writing

    def mkdir(self) -> None:
        """Make the destination usable: a local folder is created, a bucket must exist."""
        if self.remote:
            bucket = self._root.split("/", 1)[0]
            try:
                self._fs.ls(bucket, detail=False)
            except FileNotFoundError:
                raise OutputError(f"{self.url}: the bucket {bucket!r} does not exist") from None
            except PermissionError as exc:
                raise OutputError(f"{self.url}: access denied ({exc})") from None
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fsutil.translate_os_error(exc, f"cannot create {self.path}") from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` whole: a reader sees the old content or the new, never a part."""
        if self.remote:
            self._fs.pipe_file(self._remote(name), data)
            return
        self._write_local(name, lambda handle: handle.write(data))

    def put_file(self, local: str | os.PathLike[str], name: str) -> None:
        """Publish the finished local file ``local`` as ``name`` (the local file stays)."""
        if self.remote:
            self._fs.put_file(os.fspath(local), self._remote(name))
            return

        def copy(handle: BinaryIO) -> None:
            with open(local, "rb") as source:
                shutil.copyfileobj(source, handle, 1024 * 1024)

        self._write_local(name, copy)

    def _write_local(self, name: str, fill: Callable[[BinaryIO], object]) -> None:
        """Local ``name`` written whole: a temp file in its folder, filled, fsynced, renamed."""
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = fsutil.create_temp(target.parent, ".part")
        try:
            with handle:
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        finally:
            fsutil.discard(temp)
        fsutil.fsync_dir(target.parent)

    def put_files(self, files: list[tuple[Path, str]]) -> None:
        """Publish many finished local files, ``(local, name)`` each: in an object store
        uploaded concurrently (fsspec's batched ``put``), each object appearing whole."""
        if self.remote and files:
            self._fs.put(
                [os.fspath(local) for local, _ in files],
                [self._remote(name) for _, name in files],
            )
            return
        for local, name in files:
            self.put_file(local, name)

    def remove_tree(self, name: str) -> None:
        """Remove folder ``name`` and everything in it (nothing when it is missing)."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                if self._fs.exists(self._remote(name)):
                    self._fs.rm(self._remote(name), recursive=True)
            return
        shutil.rmtree(self.path / name, ignore_errors=True)
