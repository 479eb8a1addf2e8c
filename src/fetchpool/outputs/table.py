"""The columns every dataset output shares, and one run's Arrow schema for them.

:data:`SAMPLE_FIELDS` is the one list of Record fields shown in a sample's metadata:
WebDataset's ``KEY.json``, Parquet's columns and each shard's metadata file
(``NNNNN.parquet`` beside ``NNNNN.tar``) all read it, so a Record field added here appears in
all three.

Input columns keep their types. One run's Parquet files must share one schema (``datasets``
and ``pyarrow.dataset`` read many shards as one table), so the run's schema is pinned once and
every later shard follows it (:class:`TablePlan`):

* when OUT already holds a Parquet file of ours (a resumed run), its schema is kept;
* otherwise the first shard written decides, column by column, from its non-null values: all
  strings → ``string``; anything pyarrow infers one type for (ints → ``int64``, ints and
  floats → ``double``, bools, lists, structs) → that type; a column that mixes types (``"a"``
  and ``3``), a nested value pyarrow cannot unify, or only nulls → ``string`` holding JSON
  text for anything that is not a string.

A value that does not fit its column's pinned type later (``"n/a"`` in an ``int64`` column)
is stored as null, with a warning; the journal and ``fetchpool manifest`` keep the original.
A column first seen after the schema was pinned is left out of Parquet (also with a warning).
CSV/TSV inputs are text: their columns are strings.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fetchpool.models import DOWNLOAD_DIGESTS, Record

log = logging.getLogger("fetchpool")

#: Record fields in every sample's metadata, with their Arrow type, in column order.
SAMPLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("url", "string"),
    ("final_url", "string"),
    ("width", "int32"),
    ("height", "int32"),
    ("orig_width", "int32"),
    ("orig_height", "int32"),
    ("image_format", "string"),
    ("bytes", "int64"),
    ("sha256", "string"),
    ("content_type", "string"),
    ("http_status", "int32"),
    # Digests of the download (as fetched, decoded from Content-Encoding): sha256 always,
    # md5 / sha512 when --hash (or --verify-hash-type) asks; ``sha256`` is of the sample.
    ("fetched_sha256", "string"),
    *((name, "string") for name in DOWNLOAD_DIGESTS),
    ("exif", "string"),  # --save-exif: the original's EXIF tags as JSON text ("{}": none)
)
#: Columns of every row: a sample or a failure (each shard's metadata lists both).
ROW_FIELDS: tuple[tuple[str, str], ...] = (
    ("key", "string"),
    ("position", "int64"),
    ("status", "string"),
    ("error_code", "string"),
    ("error_message", "string"),
    *SAMPLE_FIELDS,
)
#: The Parquet output's image: the storage of a ``datasets`` ``Image`` feature.
IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
EXT_COLUMN = "ext"
#: Our column names: an input column named so becomes ``meta_<name>`` (``caption`` is ours
#: only with ``--caption-column``).
FIXED = frozenset({name for name, _ in ROW_FIELDS} | {IMAGE_COLUMN, EXT_COLUMN})
#: Features ``datasets`` reads from the schema's ``huggingface`` metadata; the other columns'
#: features follow from their Arrow types.
HF_FEATURES = {IMAGE_COLUMN: {"_type": "Image"}}

_PARQUET = re.compile(r"\d{5,}\.parquet")
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


def caption_text(record: Record, column: str | None) -> str:
    """The caption of ``record`` (``--caption-column``): text, ``""`` when the row has none."""
    if column is None:
        return ""
    return meta_value(record.meta.get(column)) or ""


def pyarrow_modules() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``; raises :class:`ConfigError` with the install hint."""
    from fetchpool.errors import ConfigError

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError(
            "parquet output and shard metadata need pyarrow: pip install 'fetchpool[parquet]'"
        ) from exc
    return pa, pq


@dataclass(frozen=True, slots=True)
class _Column:
    name: str
    source: str  # "field", "image", "ext", "caption" or "meta"
    key: str  # the Record field or the input column it comes from
    type: Any  # pyarrow DataType


class TablePlan:
    """One run's columns and their Arrow types (see the module docstring).

    ``image`` adds the Parquet output's ``image`` and ``ext`` columns; ``caption`` (the
    ``--caption-column``) adds ``caption``; ``digests`` the ``md5`` / ``sha512`` columns
    (``--hash``). :meth:`table` builds a shard's rows (or a row
    group's), pinning the schema on first use.
    """

    def __init__(
        self, out: Path, *, image: bool, caption: str | None, digests: Sequence[str] = ()
    ) -> None:
        self.modules = self._pa, self._pq = pyarrow_modules()
        self._image = image
        self._caption = caption
        # md5 / sha512 columns only when computed (--hash): else an input column of that
        # name keeps it
        self._fixed = FIXED - {n for n in DOWNLOAD_DIGESTS if n not in digests}
        self._columns: list[_Column] | None = None
        self.schema: Any = None
        self._warned: set[str] = set()
        pinned = _existing_schema(self._pq, out)
        if pinned is not None:
            self._pin(pinned)

    # -- schema ------------------------------------------------------------------------------

    def _pin(self, schema: Any) -> None:
        columns = []
        for field in schema:
            name = field.name
            if name == IMAGE_COLUMN:
                columns.append(_Column(name, "image", name, field.type))
            elif name == EXT_COLUMN:
                columns.append(_Column(name, "ext", name, field.type))
            elif name == CAPTION_COLUMN and self._caption is not None:
                columns.append(_Column(name, "caption", name, field.type))
            elif name in self._fixed:
                columns.append(_Column(name, "field", name, field.type))
            else:
                bare = name.removeprefix("meta_")
                key = bare if bare in self._fixed else name
                columns.append(_Column(name, "meta", key, field.type))
        self._columns = columns
        self.schema = schema

    def _infer(self, records: Sequence[Record]) -> None:
        pa = self._pa
        columns = [_Column("key", "field", "key", pa.string())]
        columns.append(_Column("position", "field", "position", pa.int64()))
        columns.append(_Column("url", "field", "url", pa.string()))
        if self._image:
            storage = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            columns.append(_Column(IMAGE_COLUMN, "image", IMAGE_COLUMN, storage))
            columns.append(_Column(EXT_COLUMN, "ext", EXT_COLUMN, pa.string()))
        columns += [
            _Column(name, "field", name, getattr(pa, kind)())
            for name, kind in ROW_FIELDS
            if name not in ("key", "position", "url") and name in self._fixed
        ]
        if self._caption is not None:
            columns.append(_Column(CAPTION_COLUMN, "caption", CAPTION_COLUMN, pa.string()))
        taken = {c.name for c in columns} | ({CAPTION_COLUMN} if self._caption else set())
        for key in _meta_names(records, skip=self._caption):
            name = f"meta_{key}" if key in self._fixed else key
            if name in taken:
                continue  # meta_<x> clashing with an input column literally named so
            taken.add(name)
            values = [r.meta.get(key) for r in records]
            columns.append(_Column(name, "meta", key, _infer_type(pa, values)))
        metadata = {b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()}
        schema = pa.schema([(c.name, c.type) for c in columns])
        self._pin(schema.with_metadata(metadata) if self._image else schema)

    # -- rows --------------------------------------------------------------------------------

    def table(self, records: Sequence[Record], read_image: Callable[[Record], bytes | None]) -> Any:
        """The Arrow table of ``records`` in the run's schema (pinned now if it is not yet)."""
        if self._columns is None:
            self._infer(records)
        assert self._columns is not None
        self._warn_unknown(records)
        arrays = [self._array(column, records, read_image) for column in self._columns]
        return self._pa.Table.from_arrays(arrays, schema=self.schema)

    def _array(
        self, column: _Column, records: Sequence[Record], read_image: Callable[[Record], Any]
    ) -> Any:
        if column.source == "image":
            values: list[Any] = []
            for record in records:
                data = read_image(record)
                path = f"{sample_key(record)}.{sample_extension(record)}"
                values.append(None if data is None else {"bytes": data, "path": path})
        elif column.source == "ext":
            values = [sample_extension(r) if r.ok else None for r in records]
        elif column.source == "caption":
            values = [caption_text(r, self._caption) if r.ok else None for r in records]
        elif column.source == "meta":
            values = [r.meta.get(column.key) for r in records]
        else:
            values = [_field(r, column.key) for r in records]
        return self._convert(column, values)

    def _convert(self, column: _Column, values: list[Any]) -> Any:
        pa = self._pa
        if pa.types.is_string(column.type):
            values = [meta_value(v) for v in values]
        try:
            return pa.array(values, type=column.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        fitted: list[Any] = []
        for value in values:
            try:
                pa.array([value], type=column.type)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                self._warn(column.name, f"a value does not fit its type {column.type}")
                fitted.append(None)
            else:
                fitted.append(value)
        return pa.array(fitted, type=column.type)

    def _warn_unknown(self, records: Sequence[Record]) -> None:
        known = {c.key for c in self._columns or () if c.source == "meta"}
        for key in _meta_names(records, skip=self._caption):
            if key not in known:
                self._warn(key, "the column appeared after the run's schema was fixed")

    def _warn(self, column: str, why: str) -> None:
        if column not in self._warned:
            self._warned.add(column)
            log.warning(
                "Parquet column %r: %s; stored as null there (the journal keeps the value)",
                column,
                why,
            )


def _field(record: Record, name: str) -> Any:
    if name == "key":
        return sample_key(record)
    value = getattr(record, name)
    return value.value if isinstance(value, Enum) else value


def _meta_names(records: Iterable[Record], *, skip: str | None) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        for name in record.meta:
            if name != skip:
                names.setdefault(str(name), None)
    return list(names)


def _infer_type(pa: Any, values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    if not present or all(isinstance(v, str) for v in present):
        return pa.string()
    if any(isinstance(v, bool) for v in present) and not all(isinstance(v, bool) for v in present):
        return pa.string()  # pyarrow would turn True into 1
    try:
        inferred = pa.array(present).type
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.string()
    return inferred if _writable(pa, inferred) else pa.string()


def _writable(pa: Any, kind: Any) -> bool:
    """Parquet (and ``datasets``) take it: no null type, no struct without fields."""
    if pa.types.is_null(kind):
        return False
    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(
            _writable(pa, kind.field(i).type) for i in range(kind.num_fields)
        )
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return bool(_writable(pa, kind.value_type))
    return not pa.types.is_dictionary(kind)


def _existing_schema(pq: Any, out: Path) -> Any:
    """The schema of the lowest-numbered ``NNNNN.parquet`` in ``out``, or None."""
    try:
        with os.scandir(out) as entries:
            names = sorted(
                (e.name for e in entries if _PARQUET.fullmatch(e.name)), key=lambda n: int(n[:-8])
            )
    except OSError:
        return None
    for name in names:
        try:
            return pq.read_schema(str(out / name))
        except Exception:  # noqa: BLE001, S112 - not ours, or unreadable: try the next one
            continue
    return None
