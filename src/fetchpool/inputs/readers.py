"""Streaming input readers: txt, csv, tsv, jsonl/ndjson, parquet, stdin, and iterables.

Every reader is a generator over a bounded buffer, so memory stays flat whatever the input
size: one record (a txt or jsonl line, a csv/tsv row with its quoted line breaks) is capped at
:data:`MAX_LINE_BYTES`; parquet is read batch by batch. One bad record never stops a run: it
becomes a :class:`~fetchpool.models.BadInput`. Only a problem with the input as a whole
(missing file, unknown format, no URL column, binary data) raises
:class:`~fetchpool.errors.InputError`, and :func:`check_input` finds those before any work.

CSV rows are bounded by the record feed, not by :func:`csv.field_size_limit` (128 KiB by
default, which real captions exceed): the first CSV/TSV reader raises that process-wide limit
to :data:`MAX_LINE_BYTES` if it is lower, and never lowers it.

Messages are read by command-line users and by library users alike: they name the option
(``--url-column``) and the keyword (``url_column=``).

``position`` is the 0-based index among data items (blank lines, comments and the header do
not count) and is the item's identity in the journal; ``line`` is the 1-based physical line
(the row for parquet) for messages. Sharding keeps global positions so shards can be merged.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shlex
import stat
import sys
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, cast

from fetchpool import storage
from fetchpool.errors import ConfigError, InputError
from fetchpool.inputs.urls import MAX_URL_LENGTH, InvalidURLError, validate_url
from fetchpool.models import BadInput, ErrorCode, InputItem, Job

#: Longest input record kept (a txt/jsonl line, a csv/tsv row): a longer one is skipped
#: without being held, and becomes a ``bad_input`` item.
MAX_LINE_BYTES = 1024 * 1024
#: ``BadInput.raw`` is capped so a giant bad line does not bloat the journal.
MAX_RAW_CHARS = MAX_URL_LENGTH
PARQUET_HINT = "reading parquet needs pyarrow: pip install 'fetchpool[parquet]'"
FORMATS = ("txt", "csv", "tsv", "jsonl", "parquet")
_ALIASES = {"ndjson": "jsonl", "text": "txt"}
_EXTENSIONS = {
    ".txt": "txt",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
_PARQUET_BATCH = 8192
_COUNT_CHUNK = 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_LABELS = {"txt": "a text list", "csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines"}
_SHOWN_COLUMNS = 20
_SHOWN_NAME = 40

Source = str | os.PathLike[str] | Iterable[str | Mapping[str, Any]]


class _Lines(Protocol):
    """What the readers need of a byte stream."""

    def readline(self, size: int = -1, /) -> bytes: ...


class _Row(NamedTuple):
    """One data item before it gets its position: a URL with meta, or a bad item."""

    line: int | None
    value: str  # the URL, or the raw text of a bad item
    meta: Mapping[str, Any]
    error: tuple[ErrorCode, str] | None = None


@dataclass(frozen=True, slots=True)
class _Spec:
    format: str
    path: Path | None  # None: stdin, or a URL
    gz: bool
    url: str | None = None  # an fsspec URL (s3://bucket/urls.parquet)
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def stdin(self) -> bool:
        return self.path is None and self.url is None

    @property
    def name(self) -> str:
        return self.url or ("<stdin>" if self.path is None else str(self.path))


def _bound() -> str:
    """The record bound, for messages: ``1 MiB (1048576 bytes)``."""
    mib, rest = divmod(MAX_LINE_BYTES, 1024 * 1024)
    return f"{mib} MiB ({MAX_LINE_BYTES} bytes)" if mib and not rest else f"{MAX_LINE_BYTES} bytes"


# --------------------------------------------------------------------------- format


def _normalize_format(fmt: str) -> str:
    name = fmt.strip().lower().lstrip(".")
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise InputError(
            f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)} "
            "with --input-format (format= in Python)"
        )
    return name


def _resolve(
    source: str | os.PathLike[str],
    fmt: str | None,
    storage_options: Mapping[str, Any] | None = None,
) -> _Spec:
    if isinstance(source, str) and source == "-":
        return _Spec(_normalize_format(fmt or "txt"), None, gz=False)
    url = source if isinstance(source, str) and storage.is_remote(source) else None
    path = Path(url.rsplit("/", 1)[-1]) if url is not None else Path(source)
    name = path.name.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    if fmt is not None:
        spec = _Spec(_normalize_format(fmt), path, gz)
    else:
        ext = Path(base).suffix
        if ext not in _EXTENSIONS:
            raise InputError(
                f"cannot tell the format of {url or path} from its name; choose one of "
                f"{', '.join(FORMATS)} with --input-format (format= in Python)"
            )
        spec = _Spec(_EXTENSIONS[ext], path, gz)
    if url is not None:
        spec = _Spec(spec.format, None, spec.gz, url, storage_options)
    if spec.gz and spec.format == "parquet":
        raise InputError(
            f"{spec.name}: a gzip-compressed parquet file cannot be read: gunzip it first "
            "(parquet is compressed inside already)"
        )
    return spec


def _check_file(spec: _Spec) -> None:
    if spec.url is not None:
        try:
            storage.input_size(spec.url, spec.storage_options)
        except FileNotFoundError:
            raise InputError(f"input file not found: {spec.url}") from None
        except IsADirectoryError:
            raise InputError(f"input {spec.url} is a folder; give a file") from None
        except OSError as exc:
            raise InputError(f"cannot read input file {spec.url}: {exc}") from None
        return
    assert spec.path is not None
    path = spec.path
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(
            f"input {path} is not a regular file; give a file, or - to read standard input"
        )


# --------------------------------------------------------------------------- bytes


class _Replay:
    """Standard input, with what :func:`check_input` read kept for the reader.

    Stdin cannot seek: while a check records, every byte it reads is kept, and the reader
    gets those bytes first, then the rest of the stream. Kept bytes are dropped as soon as
    the reader has them, so at most the check's few lines are ever held.
    """

    def __init__(self, raw: _Lines) -> None:
        self._raw = raw
        self._kept = bytearray()  # read from raw by a check, not yet handed to a reader
        self._pos = 0  # while recording: how far the check has read into _kept
        self._recording = False

    def record(self) -> _Replay:
        self._recording, self._pos = True, 0
        return self

    def rewind(self) -> None:
        self._recording, self._pos = False, 0

    def readline(self, size: int = -1, /) -> bytes:
        out = b""
        if self._pos < len(self._kept):
            stop = len(self._kept) if size < 0 else min(len(self._kept), self._pos + size)
            newline = self._kept.find(b"\n", self._pos, stop)
            if newline != -1:
                stop = newline + 1
            out = bytes(self._kept[self._pos : stop])
            if self._recording:
                self._pos = stop
            else:
                del self._kept[:stop]
            if newline != -1 or len(out) == size:
                return out
        more = self._raw.readline(size - len(out) if size >= 0 else -1)
        if self._recording:
            self._kept += more
            self._pos = len(self._kept)
        return out + more


_stdin_lock = threading.Lock()
#: The replay of the current ``sys.stdin`` object, as ``[(stdin, replay)]`` (or empty).
_stdin_replay: list[tuple[object, _Replay]] = []


def _stdin() -> _Replay:
    """The replayable binary stream of the current ``sys.stdin`` (one per stdin object)."""
    with _stdin_lock:
        stdin: Any = sys.stdin
        if _stdin_replay and _stdin_replay[0][0] is stdin:
            return _stdin_replay[0][1]
        raw = getattr(stdin, "buffer", None)
        if raw is None:  # a test double without .buffer: text, or already bytes
            is_text = isinstance(stdin, io.TextIOBase)
            raw = io.BytesIO(stdin.read().encode("utf-8")) if is_text else stdin
        replay = _Replay(raw)
        _stdin_replay[:] = [(stdin, replay)]
        return replay


def _open_binary(spec: _Spec) -> IO[bytes]:
    """Open a file for binary reading (the caller closes it)."""
    if spec.url is not None:
        try:
            return storage.open_input(
                spec.url, spec.storage_options, compression="gzip" if spec.gz else None
            )
        except FileNotFoundError:
            raise InputError(f"input file not found: {spec.url}") from None
        except OSError as exc:
            raise InputError(f"cannot read input file {spec.url}: {exc}") from None
    assert spec.path is not None
    try:
        if spec.gz:
            return cast(IO[bytes], gzip.open(spec.path, "rb"))
        return spec.path.open("rb")
    except FileNotFoundError:
        raise InputError(f"input file not found: {spec.path}") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {spec.path}: {exc.strerror or exc}") from None


def _physical_lines(
    stream: _Lines, name: str, *, skip_rest: bool = True
) -> Iterator[tuple[int, bytes, bool]]:
    """Yield ``(line number, bytes without the line ending, truncated?)``, bounded memory.

    The rest of an over-long line is skipped, or, without ``skip_rest``, the lines end there
    (a check that must not read on).
    """
    number = 0
    try:
        while True:
            chunk = stream.readline(MAX_LINE_BYTES + 1)
            if not chunk:
                return
            number += 1
            truncated = False
            if len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n"):
                truncated = True
                chunk = chunk[:MAX_LINE_BYTES]
                # Skip the rest of the over-long line without holding it.
                while skip_rest:
                    rest = stream.readline(MAX_LINE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
            if number == 1 and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
            yield number, chunk.rstrip(b"\r\n"), truncated
            if truncated and not skip_rest:
                return
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        if number == 0:
            raise InputError(f"{name}: cannot decompress it: {exc} (is it gzip data?)") from None
        raise InputError(f"{name}: corrupt compressed data after line {number}: {exc}") from None
    except OSError as exc:
        raise InputError(f"{name}: read error after line {number}: {exc}") from None


def _raw(text: str) -> str:
    return text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + "..."


def _bad(line: int | None, raw: str, code: ErrorCode, message: str) -> _Row:
    return _Row(line, _raw(raw), {}, (code, message))


def _too_long(line: int, data: bytes) -> _Row:
    return _bad(
        line,
        data[: MAX_RAW_CHARS * 4].decode("utf-8", "replace"),
        ErrorCode.BAD_INPUT,
        f"line {line} is longer than {_bound()}, the limit for one input record",
    )


def _decode(line: int, data: bytes) -> str | _Row:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _bad(
            line,
            data.decode("utf-8", "replace"),
            ErrorCode.BAD_INPUT,
            f"invalid UTF-8 at byte {exc.start} of line {line}",
        )


# --------------------------------------------------------------------------- messages


def _show(column: str) -> str:
    return repr(column) if len(column) <= _SHOWN_NAME else repr(column[:_SHOWN_NAME]) + "..."


def _guess(column: str, columns: list[str]) -> str | None:
    """The column the user probably meant: the same name in another case or without spaces,
    else (for the default ``url``) the only column with "url" in its name."""
    folded = column.strip().casefold()
    same = [c for c in columns if c.casefold() == folded]
    if same:
        return same[0]
    if folded == "url":
        urlish = [c for c in columns if "url" in c.casefold()]
        if len(urlish) == 1:
            return urlish[0]
    return None


def _no_column(
    name: str,
    column: str,
    columns: list[str],
    where: str,
    *,
    header: bool = False,
    role: str = "url",
) -> str:
    """``role`` is which column is missing: ``url`` (``--url-column``), ``caption`` or
    ``verify-hash``."""
    shown = ", ".join(_show(c) for c in columns[:_SHOWN_COLUMNS]) or "none"
    if len(columns) > _SHOWN_COLUMNS:
        shown += f", ... ({len(columns)} in all)"
    py = role.replace("-", "_")
    what = "URL" if role == "url" else role.replace("-", " ")
    message = (
        f"{name}: {where} has no column {column!r} (columns: {shown}); "
        f"choose the {what} column with --{role}-column ({py}_column= in Python)"
    )
    guess = _guess(column, columns)
    if guess is not None:
        message += f"; perhaps --{role}-column {shlex.quote(guess)} ({py}_column={guess!r})"
    elif header and any(c.startswith(("http://", "https://")) for c in columns):
        message += (
            "; that line looks like data: add a header row, "
            "or read a plain list of URLs with --input-format txt"
        )
    return message


def _sniff(line: int, data: bytes, spec: _Spec) -> None:
    """Refuse an input that is plainly not text: say what it is instead."""
    name = spec.name
    if line == 1:
        if data.startswith(b"\x1f\x8b"):
            how = (
                "pipe it through gunzip"
                if spec.stdin
                else "give it a name ending in .gz, or gunzip it"
            )
            raise InputError(f"{name} is gzip-compressed: {how}")
        if data.startswith(b"PAR1"):
            how = (
                "save it to a file and give its name"
                if spec.stdin
                else "choose --input-format parquet (format='parquet' in Python)"
            )
            raise InputError(f"{name} is a parquet file: {how}")
        if data.startswith(b"PK\x03\x04"):
            raise InputError(f"{name} is a zip archive: unpack it first")
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise InputError(f"{name} is UTF-16 text: save it as UTF-8")
    if b"\x00" in data:
        raise InputError(
            f"{name}: line {line} contains NUL bytes: this is binary data (or UTF-16 text), "
            f"not {_LABELS[spec.format]}"
        )


# --------------------------------------------------------------------------- text formats


def _rows_txt(stream: _Lines, name: str) -> Iterator[_Row]:
    for line, data, truncated in _physical_lines(stream, name):
        if truncated:
            yield _too_long(line, data)
            continue
        text = _decode(line, data)
        if isinstance(text, _Row):
            yield text
            continue
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            yield _Row(line, stripped, {})


def _rows_jsonl(stream: _Lines, name: str, url_column: str) -> Iterator[_Row]:
    seen_object = False
    for line, data, truncated in _physical_lines(stream, name):
        if truncated:
            yield _too_long(line, data)
            continue
        text = _decode(line, data)
        if isinstance(text, _Row):
            yield text
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as exc:
            yield _bad(line, text, ErrorCode.BAD_INPUT, f"invalid JSON: {exc}")
            continue
        except RecursionError:
            yield _bad(line, text, ErrorCode.BAD_INPUT, "invalid JSON: nested too deeply")
            continue
        if isinstance(obj, dict) and not seen_object:
            seen_object = True
            if url_column not in obj:
                raise InputError(
                    _no_column(name, url_column, list(obj), f"the first object (line {line})")
                )
        yield _row_from_value(line, obj, url_column, text)


def _row_from_value(line: int | None, obj: Any, url_column: str, raw: str) -> _Row:
    """A row from a JSON value or an iterable's item: a URL string or a mapping."""
    if isinstance(obj, str):
        return _Row(line, obj, {})
    if isinstance(obj, Mapping):
        url = obj.get(url_column)
        if not isinstance(url, str):
            problem = "is missing" if url is None else f"is not a string ({type(url).__name__})"
            return _bad(line, raw, ErrorCode.BAD_INPUT, f"the {url_column!r} field {problem}")
        meta = {str(k): v for k, v in obj.items() if k != url_column}
        return _Row(line, url, meta)
    return _bad(
        line,
        raw,
        ErrorCode.BAD_INPUT,
        f"expected a URL string or an object, got {type(obj).__name__}",
    )


# --------------------------------------------------------------------------- csv / tsv


class _RecordTooLong(Exception):
    """A csv/tsv record over the bound: lines ``start`` to ``end``; ``head`` its first line."""

    def __init__(self, start: int, end: int, head: bytes) -> None:
        super().__init__(start, end)
        self.start, self.end, self.head = start, end, head


class _RecordFeed:
    """Physical lines as text for the csv parser, at most :data:`MAX_LINE_BYTES` a record.

    A class, not a generator: the exception it raises for an over-long record passes through
    the parser, which then starts afresh at the next line (a generator would be finished).
    ``start`` and ``head`` are the current record's first line number and bytes.
    """

    def __init__(self, lines: Iterator[tuple[int, bytes, bool]]) -> None:
        self._lines = lines
        self._size = 0
        self.start = 0
        self.head = b""

    def new_record(self) -> None:
        self._size = 0

    def __iter__(self) -> _RecordFeed:
        return self

    def __next__(self) -> str:
        number, data, truncated = next(self._lines)
        if self._size == 0:
            self.start, self.head = number, data[: MAX_RAW_CHARS * 4]
        self._size += len(data) + 1
        if truncated or self._size > MAX_LINE_BYTES:
            raise _RecordTooLong(self.start, number, self.head)
        # surrogateescape keeps invalid bytes visible to the row check instead of failing
        # the parser's whole iteration.
        return data.decode("utf-8", "surrogateescape") + "\n"


def _raise_field_limit() -> None:
    """csv's process-wide field limit, raised to one record's bound if it is lower. Raising it
    cannot break a host program's own parsing (it only accepts longer fields); lowering or
    restoring it around our rows would race with the host's threads."""
    if csv.field_size_limit() < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)


class _Parser:
    """A csv reader over a :class:`_RecordFeed`: CSV (RFC 4180 quoting) or IANA TSV."""

    def __init__(self, lines: Iterator[tuple[int, bytes, bool]], delimiter: str) -> None:
        _raise_field_limit()
        self.error: type[Exception] = csv.Error
        self.kind = "TSV" if delimiter == "\t" else "CSV"
        self.feed = _RecordFeed(lines)
        # TSV is the IANA flavour: no quoting, so captions with quotes stay intact.
        if delimiter == "\t":
            self._reader = csv.reader(self.feed, delimiter=delimiter, quoting=csv.QUOTE_NONE)
        else:
            self._reader = csv.reader(self.feed, delimiter=delimiter)

    def next(self) -> list[str] | None:
        """The next record (``[]`` for a blank line), None at the end; raises
        :class:`_RecordTooLong` or :attr:`error` for a bad record (the next call goes on)."""
        self.feed.new_record()
        try:
            fields: list[str] = next(self._reader)
        except StopIteration:
            return None
        return fields


def _has_bad_utf8(fields: list[str]) -> bool:
    try:
        "".join(fields).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_header(parser: _Parser, name: str, url_column: str) -> list[str] | None:
    while True:
        try:
            header = parser.next()
        except _RecordTooLong as exc:
            raise InputError(
                f"{name}: the header (line {exc.start}) is longer than {_bound()}: "
                f"is this really a {parser.kind} file?"
            ) from None
        except parser.error as exc:
            raise InputError(
                f"{name}: cannot parse the header (line {parser.feed.start}): {exc}"
            ) from None
        if header is None:
            return None  # an empty file: no items
        if not header:
            continue
        line = parser.feed.start
        if _has_bad_utf8(header):
            raise InputError(
                f"{name}: the header (line {line}) is not valid UTF-8 text; "
                f"is this really a {parser.kind} file? (save it as UTF-8)"
            )
        columns = [h.strip() for h in header]
        if url_column not in columns:
            raise InputError(
                _no_column(name, url_column, columns, f"the header (line {line})", header=True)
            )
        return columns


def _record_too_long(parser: _Parser, exc: _RecordTooLong) -> _Row:
    where = (
        f"line {exc.start}"
        if exc.start == exc.end
        else f"the {parser.kind} row at lines {exc.start}-{exc.end} (an unclosed quote?)"
    )
    return _bad(
        exc.start,
        exc.head.decode("utf-8", "replace"),
        ErrorCode.BAD_INPUT,
        f"{where} is longer than {_bound()}, the limit for one input record",
    )


def _rows_delimited(stream: _Lines, name: str, url_column: str, delimiter: str) -> Iterator[_Row]:
    parser = _Parser(_physical_lines(stream, name), delimiter)
    header = _read_header(parser, name, url_column)
    if header is None:
        return
    index = header.index(url_column)
    feed = parser.feed
    while True:
        try:
            fields = parser.next()
        except _RecordTooLong as exc:
            yield _record_too_long(parser, exc)
            continue
        except parser.error as exc:
            raw = feed.head.decode("utf-8", "replace")
            yield _bad(feed.start, raw, ErrorCode.BAD_INPUT, f"malformed {parser.kind} row: {exc}")
            continue
        if fields is None:
            return
        if fields:
            yield _delimited_row(feed.start, fields, header, index, delimiter)


def _delimited_row(
    line: int, fields: list[str], header: list[str], index: int, delimiter: str
) -> _Row:
    if _has_bad_utf8(fields):
        raw = delimiter.join(fields).encode("utf-8", "surrogateescape")
        return _bad(line, raw.decode("utf-8", "replace"), ErrorCode.BAD_INPUT, "invalid UTF-8")
    if len(fields) > len(header):
        return _bad(
            line,
            delimiter.join(fields),
            ErrorCode.BAD_INPUT,
            f"row has {len(fields)} fields but the header has {len(header)}",
        )
    if index >= len(fields):
        return _bad(
            line,
            delimiter.join(fields),
            ErrorCode.BAD_INPUT,
            f"row has {len(fields)} fields and no {header[index]!r} field",
        )
    meta = {h: v for i, (h, v) in enumerate(zip(header, fields, strict=False)) if i != index}
    return _Row(line, fields[index], meta)


# --------------------------------------------------------------------------- parquet


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(PARQUET_HINT) from None
    return pq


def _open_parquet(spec: _Spec) -> Any:
    pq = _import_parquet()
    path = spec.name
    try:
        if spec.url is not None:
            return pq.ParquetFile(storage.open_input(spec.url, spec.storage_options))
        return pq.ParquetFile(spec.path)
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise InputError(f"{path}: not a readable parquet file: {exc}") from None


def _parquet_columns(spec: _Spec, url_column: str, extra: Mapping[str, str]) -> None:
    with _open_parquet(spec) as pf:
        columns = list(pf.schema_arrow.names)
    if url_column not in columns:
        raise InputError(_no_column(spec.name, url_column, columns, "the schema"))
    _check_extra(spec, extra, columns, "the schema")


def _rows_parquet(spec: _Spec, url_column: str) -> Iterator[_Row]:
    with _open_parquet(spec) as pf:
        columns = list(pf.schema_arrow.names)
        if url_column not in columns:
            raise InputError(_no_column(spec.name, url_column, columns, "the schema"))
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
            for item in batch.to_pylist():
                row += 1
                yield _row_from_value(row, item, url_column, _raw(repr(item.get(url_column))))


# --------------------------------------------------------------------------- iterables


def _rows_iterable(items: Iterable[Any], url_column: str) -> Iterator[_Row]:
    for item in items:
        raw = item if isinstance(item, str) else repr(item)
        yield _row_from_value(None, item, url_column, _raw(raw))


# --------------------------------------------------------------------------- checks


def _check_extra(spec: _Spec, extra: Mapping[str, str], columns: list[str], where: str) -> None:
    """Columns other options name (``extra``: role → column, as in ``--caption-column``,
    ``--verify-hash-column``) must be in the input's columns too."""
    for role, column in extra.items():
        if column not in columns:
            raise InputError(_no_column(spec.name, column, columns, where, role=role))


def _check_start(stream: _Lines, spec: _Spec, url_column: str, extra: Mapping[str, str]) -> None:
    """Read the start of a text input (at most about 2 * MAX_LINE_BYTES) and raise
    InputError if it cannot be this format's input; the readers check the rest as they go."""
    lines = _physical_lines(stream, spec.name, skip_rest=False)
    blank = 0
    for number, data, truncated in lines:
        if number == 1:
            _sniff(1, data, spec)
        if not data.strip() and not truncated:
            blank += len(data) + 1
            if blank > MAX_LINE_BYTES:
                return  # nothing but blank lines so far: not cheap to tell
            continue
        _sniff(number, data, spec)
        break
    else:
        return  # empty
    if spec.format in ("csv", "tsv"):
        delimiter = "\t" if spec.format == "tsv" else ","
        first = iter([(number, data, truncated)])
        parser = _Parser(_chain(first, lines), delimiter)
        header = _read_header(parser, spec.name, url_column)
        if header is not None:
            where = f"the header (line {parser.feed.start})"
            _check_extra(spec, extra, header, where)
    elif spec.format == "jsonl" and not truncated:
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            return  # a bad first line is that item's problem
        if isinstance(obj, dict):
            where = f"the first object (line {number})"
            if url_column not in obj:
                raise InputError(_no_column(spec.name, url_column, list(obj), where))
            _check_extra(spec, extra, list(obj), where)


def _chain(*parts: Iterator[tuple[int, bytes, bool]]) -> Iterator[tuple[int, bytes, bool]]:
    for part in parts:
        yield from part


def check_input(
    source: Source,
    *,
    format: str | None = None,
    url_column: str = "url",
    storage_options: Mapping[str, Any] | None = None,
    caption_column: str | None = None,
    required: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`InputError` now if ``source`` cannot be read as an input at all.

    Cheap: it opens the input and reads only its start: the CSV/TSV header, the first JSONL
    record, the parquet schema, the first line of a text list (binary data, such as gzip or
    parquet bytes under a text name, NUL bytes or UTF-16, is refused). Call it before any work
    so that a bad input leaves nothing behind. :func:`read_input` calls it too; problems later
    in the input are found as it streams. For stdin (``"-"``), what it reads is kept and
    handed to the next reader of stdin, so nothing is lost. An iterable is not checked (that
    would consume it). ``source`` may be an fsspec URL (``s3://bucket/urls.parquet``),
    opened with ``storage_options``. ``caption_column``, when given, must be a column too,
    as must each of ``required`` (role → column: ``{"verify-hash": "md5"}`` is checked as
    ``--verify-hash-column``). A text list has no columns: it is refused with either.
    """
    if not isinstance(source, str | os.PathLike):
        return
    spec = _resolve(source, format, storage_options)
    extra = dict(required or {})
    if caption_column is not None:
        extra = {"caption": caption_column, **extra}
    for role, column in extra.items():
        if spec.format == "txt":
            option = f"--{role}-column ({role.replace('-', '_')}_column= in Python)"
            raise InputError(
                f"{spec.name}: a text list has no columns, so no {role} column {column!r}; "
                f"{option} needs a csv, tsv, jsonl or parquet input"
            )
    if spec.stdin:
        if spec.format == "parquet":
            raise InputError(
                "parquet cannot be read from stdin (-); save it to a file and give its name"
            )
        replay = _stdin().record()
        try:
            _check_start(replay, spec, url_column, extra)
        finally:
            replay.rewind()
        return
    _check_file(spec)
    if spec.format == "parquet":
        _parquet_columns(spec, url_column, extra)
        return
    with _open_binary(spec) as stream:
        _check_start(stream, spec, url_column, extra)


# --------------------------------------------------------------------------- public API


def _to_item(position: int, row: _Row) -> InputItem:
    if row.error is not None:
        return BadInput(position, row.line, row.value, row.error[0], row.error[1])
    try:
        url = validate_url(row.value)
    except InvalidURLError as exc:
        return BadInput(position, row.line, _raw(row.value), exc.code, exc.message)
    return Job(position=position, url=url, line=row.line, meta=row.meta)


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise ConfigError(
            f"shard {k}/{n} is invalid: need 0 <= K < N (--shard K/N, shard=(k, n) in Python)"
        )
    return k, n


def _numbered(rows: Iterator[_Row], shard: tuple[int, int]) -> Iterator[InputItem]:
    k, n = shard
    for position, row in enumerate(rows):
        # Positions stay global so the journals of different shards can be merged.
        if position % n == k:
            yield _to_item(position, row)


def _file_rows(spec: _Spec, url_column: str) -> Iterator[_Row]:
    if spec.format == "parquet":
        assert not spec.stdin  # stdin parquet is refused by check_input
        yield from _rows_parquet(spec, url_column)
        return
    stream: _Lines
    if spec.stdin:
        stream = _stdin()  # not ours to close
        yield from _text_rows(stream, spec, url_column)
        return
    with _open_binary(spec) as file:
        yield from _text_rows(file, spec, url_column)


def _text_rows(stream: _Lines, spec: _Spec, url_column: str) -> Iterator[_Row]:
    if spec.format == "txt":
        yield from _rows_txt(stream, spec.name)
    elif spec.format == "jsonl":
        yield from _rows_jsonl(stream, spec.name, url_column)
    else:
        delimiter = "\t" if spec.format == "tsv" else ","
        yield from _rows_delimited(stream, spec.name, url_column, delimiter)


def read_input(
    source: Source,
    *,
    format: str | None = None,
    url_column: str = "url",
    shard: tuple[int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[InputItem]:
    """Stream the items of ``source`` as :class:`Job` or :class:`BadInput`, in input order.

    ``source`` is a path (format from the extension, ``.gz`` variants of text formats
    included, or ``format=``), ``"-"`` for stdin (txt unless ``format=``), or an iterable of
    URL strings / mappings with a ``url_column`` key. ``shard=(k, n)`` keeps the items whose
    position ``% n == k``. Whole-input problems (missing file, unknown format, no URL column,
    binary data) raise :class:`InputError` here, before iteration (see :func:`check_input`);
    per-item problems, such as a record over :data:`MAX_LINE_BYTES`, become BadInput.
    """
    shard_kn = _check_shard(shard)
    if isinstance(source, str | os.PathLike):
        spec = _resolve(source, format, storage_options)
        check_input(source, format=format, url_column=url_column, storage_options=storage_options)
        return _numbered(_file_rows(spec, url_column), shard_kn)
    return _numbered(_rows_iterable(source, url_column), shard_kn)


def _count_newlines(spec: _Spec) -> int | None:
    assert spec.path is not None
    count = 0
    last = b"\n"
    try:
        with spec.path.open("rb") as stream:
            while chunk := stream.read(_COUNT_CHUNK):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return None
    return count + (last != b"\n")


def estimate_total(
    source: Source,
    *,
    format: str | None = None,
) -> int | None:
    """A cheap count of data items for progress bars, or None when it is not cheap.

    Text formats count newlines (minus the header for csv/tsv; blank and comment lines are
    included, so it is an upper bound); parquet reads ``num_rows`` from the footer. Stdin,
    gzip files and unsized iterables give None. Never raises for an unreadable source:
    :func:`read_input` reports that.
    """
    if not isinstance(source, str | os.PathLike):
        return len(source) if isinstance(source, Sized) else None
    try:
        spec = _resolve(source, format)
    except InputError:
        return None
    if spec.path is None or spec.gz:  # stdin, a URL
        return None
    if spec.format == "parquet":
        try:
            with _open_parquet(spec) as pf:
                return int(pf.metadata.num_rows)
        except InputError:
            return None
    lines = _count_newlines(spec)
    if lines is not None and spec.format in ("csv", "tsv"):
        lines = max(0, lines - 1)
    return lines
