"""Streaming input readers: txt, csv, tsv, jsonl/ndjson, parquet, stdin, and iterables.

Every reader is a generator over a bounded buffer, so memory stays flat whatever the input
size (a physical line is capped at :data:`MAX_LINE_BYTES`; parquet is read batch by batch).
One bad line never stops a run: it becomes a :class:`~fetchpool.models.BadInput`. Only a
problem with the input as a whole (missing file, unknown format, no URL column) raises
:class:`~fetchpool.errors.InputError`.

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
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from fetchpool.errors import ConfigError, InputError
from fetchpool.inputs.urls import MAX_URL_LENGTH, InvalidURLError, validate_url
from fetchpool.models import BadInput, ErrorCode, InputItem, Job

#: Longest physical line kept; the rest of a longer line is skipped (and the item is bad).
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

Source = str | os.PathLike[str] | Iterable[str | Mapping[str, Any]]


class _Row(NamedTuple):
    """One data item before it gets its position: a URL with meta, or a bad item."""

    line: int | None
    value: str  # the URL, or the raw text of a bad item
    meta: Mapping[str, Any]
    error: tuple[ErrorCode, str] | None = None


@dataclass(frozen=True, slots=True)
class _Spec:
    format: str
    path: Path | None  # None: stdin
    gz: bool


# --------------------------------------------------------------------------- format


def _normalize_format(fmt: str) -> str:
    name = fmt.strip().lower().lstrip(".")
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise InputError(f"unknown input format {fmt!r} (use one of: {', '.join(FORMATS)})")
    return name


def _resolve(source: str | os.PathLike[str], fmt: str | None) -> _Spec:
    if isinstance(source, str) and source == "-":
        return _Spec(_normalize_format(fmt or "txt"), None, gz=False)
    path = Path(source)
    name = path.name.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    if fmt is not None:
        spec = _Spec(_normalize_format(fmt), path, gz)
    else:
        ext = Path(base).suffix
        if ext not in _EXTENSIONS:
            raise InputError(
                f"cannot tell the format of {path} from its extension; pass format= "
                f"({', '.join(FORMATS)})"
            )
        spec = _Spec(_EXTENSIONS[ext], path, gz)
    if spec.gz and spec.format == "parquet":
        raise InputError(f"{path}: parquet files are compressed internally; do not gzip them")
    return spec


def _check_file(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"input {path} is not a regular file")


# --------------------------------------------------------------------------- bytes


def _open_binary(spec: _Spec) -> IO[bytes]:
    """Open the source for binary reading (the caller closes it, except stdin)."""
    if spec.path is None:
        stdin: Any = sys.stdin
        buffer = getattr(stdin, "buffer", None)
        if buffer is not None:
            return buffer  # type: ignore[no-any-return]
        if isinstance(stdin, io.TextIOBase):  # a test double without .buffer
            return io.BytesIO(stdin.read().encode("utf-8"))
        return stdin  # type: ignore[no-any-return]
    try:
        if spec.gz:
            return cast(IO[bytes], gzip.open(spec.path, "rb"))
        return spec.path.open("rb")
    except FileNotFoundError:
        raise InputError(f"input file not found: {spec.path}") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {spec.path}: {exc.strerror or exc}") from None


def _physical_lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, bytes, bool]]:
    """Yield ``(line number, bytes without the line ending, truncated?)``, bounded memory."""
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
                while True:
                    rest = stream.readline(MAX_LINE_BYTES)
                    if not rest or rest.endswith(b"\n"):
                        break
            if number == 1 and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
            yield number, chunk.rstrip(b"\r\n"), truncated
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
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
        data.decode("utf-8", "replace"),
        ErrorCode.BAD_INPUT,
        f"line is longer than {MAX_LINE_BYTES} bytes",
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


# --------------------------------------------------------------------------- text formats


def _rows_txt(stream: IO[bytes], name: str) -> Iterator[_Row]:
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


def _rows_jsonl(stream: IO[bytes], name: str, url_column: str) -> Iterator[_Row]:
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
                raise InputError(_no_column(name, url_column, list(obj), f"line {line}"))
        yield _row_from_value(line, obj, url_column, text)


def _row_from_value(line: int | None, obj: Any, url_column: str, raw: str) -> _Row:
    """A row from a JSON value or an iterable's item: a URL string or a mapping."""
    if isinstance(obj, str):
        return _Row(line, obj, {})
    if isinstance(obj, Mapping):
        url = obj.get(url_column)
        if not isinstance(url, str):
            problem = "is missing" if url is None else f"is not a string ({type(url).__name__})"
            return _bad(line, raw, ErrorCode.BAD_INPUT, f"{url_column!r} {problem}")
        meta = {str(k): v for k, v in obj.items() if k != url_column}
        return _Row(line, url, meta)
    return _bad(
        line,
        raw,
        ErrorCode.BAD_INPUT,
        f"expected a URL string or an object, got {type(obj).__name__}",
    )


def _no_column(name: str, column: str, columns: list[str], where: str) -> str:
    shown = ", ".join(repr(c) for c in columns[:20]) or "none"
    return (
        f"{name}: no {column!r} column in the {where} (columns: {shown}); "
        "pass url_column= to pick the URL column"
    )


def _decoded_lines(
    lines: Iterator[tuple[int, bytes, bool]],
) -> Iterator[str]:
    # surrogateescape keeps invalid bytes visible to the row check instead of failing
    # the csv module's whole iteration.
    for _line, data, _truncated in lines:
        yield data.decode("utf-8", "surrogateescape") + "\n"


def _has_bad_utf8(fields: list[str]) -> bool:
    try:
        "".join(fields).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_reader(stream: IO[bytes], name: str, delimiter: str) -> Any:
    # TSV is the IANA flavour: no quoting, so captions with quotes stay intact.
    lines = _decoded_lines(_physical_lines(stream, name))
    if delimiter == "\t":
        return csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE)
    return csv.reader(lines, delimiter=delimiter)


def _read_header(reader: Any, name: str, url_column: str) -> list[str] | None:
    for header in reader:
        if not header:
            continue
        if _has_bad_utf8(header):
            raise InputError(f"{name}: the header row is not valid UTF-8")
        columns = [h.strip() for h in header]
        if url_column not in columns:
            raise InputError(_no_column(name, url_column, columns, "header"))
        return columns
    return None  # an empty file: no items


def _rows_delimited(
    stream: IO[bytes], name: str, url_column: str, delimiter: str
) -> Iterator[_Row]:
    reader = _csv_reader(stream, name, delimiter)
    header = _read_header(reader, name, url_column)
    if header is None:
        return
    index = header.index(url_column)
    last = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _bad(reader.line_num, "", ErrorCode.BAD_INPUT, f"malformed row: {exc}")
            last = reader.line_num
            continue
        line, last = last + 1, reader.line_num
        if fields:
            yield _delimited_row(line, fields, header, index, delimiter)


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
        return _bad(line, delimiter.join(fields), ErrorCode.BAD_INPUT, "row has no URL field")
    meta = {h: v for i, (h, v) in enumerate(zip(header, fields, strict=False)) if i != index}
    return _Row(line, fields[index], meta)


# --------------------------------------------------------------------------- parquet


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(PARQUET_HINT) from None
    return pq


def _open_parquet(path: Path) -> Any:
    pq = _import_parquet()
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise InputError(f"{path}: not a readable parquet file: {exc}") from None


def _rows_parquet(path: Path, url_column: str) -> Iterator[_Row]:
    with _open_parquet(path) as pf:
        columns = list(pf.schema_arrow.names)
        if url_column not in columns:
            raise InputError(_no_column(str(path), url_column, columns, "schema"))
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
        raise ConfigError(f"shard {k}/{n} is invalid: need 0 <= k < n")
    return k, n


def _numbered(rows: Iterator[_Row], shard: tuple[int, int]) -> Iterator[InputItem]:
    k, n = shard
    for position, row in enumerate(rows):
        # Positions stay global so the journals of different shards can be merged.
        if position % n == k:
            yield _to_item(position, row)


def _file_rows(spec: _Spec, url_column: str) -> Iterator[_Row]:
    if spec.format == "parquet":
        assert spec.path is not None  # stdin parquet is refused in read_input
        yield from _rows_parquet(spec.path, url_column)
        return
    name = "<stdin>" if spec.path is None else str(spec.path)
    stream = _open_binary(spec)
    try:
        if spec.format == "txt":
            yield from _rows_txt(stream, name)
        elif spec.format == "jsonl":
            yield from _rows_jsonl(stream, name, url_column)
        else:
            delimiter = "\t" if spec.format == "tsv" else ","
            yield from _rows_delimited(stream, name, url_column, delimiter)
    finally:
        if spec.path is not None:
            stream.close()


def _precheck(spec: _Spec, url_column: str) -> None:
    """Fail before the first item for problems with the file as a whole."""
    if spec.path is None:
        if spec.format == "parquet":
            raise InputError("parquet cannot be read from stdin; save it to a file first")
        return
    _check_file(spec.path)
    if spec.format == "parquet":
        with _open_parquet(spec.path) as pf:
            columns = list(pf.schema_arrow.names)
        if url_column not in columns:
            raise InputError(_no_column(str(spec.path), url_column, columns, "schema"))
    elif spec.format in ("csv", "tsv"):
        delimiter = "\t" if spec.format == "tsv" else ","
        with _open_binary(spec) as stream:
            _read_header(_csv_reader(stream, str(spec.path), delimiter), str(spec.path), url_column)


def read_input(
    source: Source,
    *,
    format: str | None = None,
    url_column: str = "url",
    shard: tuple[int, int] | None = None,
) -> Iterator[InputItem]:
    """Stream the items of ``source`` as :class:`Job` or :class:`BadInput`, in input order.

    ``source`` is a path (format from the extension, ``.gz`` variants of text formats
    included, or ``format=``), ``"-"`` for stdin (txt unless ``format=``), or an iterable of
    URL strings / mappings with a ``url_column`` key. ``shard=(k, n)`` keeps the items whose
    position ``% n == k``. Whole-input problems (missing file, unknown format, no URL column)
    raise :class:`InputError` here, before iteration; per-item problems become BadInput.
    """
    shard_kn = _check_shard(shard)
    if isinstance(source, str | os.PathLike):
        spec = _resolve(source, format)
        _precheck(spec, url_column)
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
    if spec.path is None or spec.gz:
        return None
    if spec.format == "parquet":
        try:
            with _open_parquet(spec.path) as pf:
                return int(pf.metadata.num_rows)
        except InputError:
            return None
    lines = _count_newlines(spec)
    if lines is not None and spec.format in ("csv", "tsv"):
        lines = max(0, lines - 1)
    return lines
