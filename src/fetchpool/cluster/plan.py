"""The plan of a cluster run: how the input is cut into parts, pinned in DEST.

::

    DEST/                                    a local folder or an fsspec URL (s3://bucket/ds)
      .fetchpool/plan.json                   input fingerprint, number of parts, partitioning
      .fetchpool/parts/part-00007.jsonl.gz   the items of part 7 (global positions kept)
      .fetchpool/parts/part-00007.done       part 7 finished and published: its counts (JSON)
      .fetchpool/parts/part-00007.records.jsonl.gz   part 7's records, when it ran on scratch
      part-00007/                            part 7's output (files, shards)

An item goes to part ``sha256(url) mod parts`` (a bad line, which has no URL, to ``position mod
parts``), so every copy of a URL lands in one part and de-duplication gives what a single run
gives. The driver writes the part files in one streaming pass over the input, so no part ever
reads the whole input and memory holds one buffered writer per part, whatever the input's length.
Part files are written under temp names and published whole, and ``plan.json`` is written last:
a split killed half-way leaves no plan and is redone; a finished one is reused by every rerun.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

from fetchpool import fsutil, storage
from fetchpool.errors import ConfigError, InputError, OutputError
from fetchpool.models import BadInput, ErrorCode, Job
from fetchpool.state.paths import (
    PARTS_NAME,
    PLAN_NAME,
    part_done_name,
    part_input_name,
    part_name,
)
from fetchpool.storage import Store

PLAN_VERSION = 1
PARTITIONING = "sha256(url) mod parts; lines without a URL by position mod parts"
#: Bytes of the input hashed into its fingerprint (with its size): cheap, and enough to tell
#: one list from another without reading 10^9 rows.
FINGERPRINT_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    """What a cluster run's DEST is pinned to; a rerun must match it."""

    source: str
    source_size: int | None
    fingerprint: str
    parts: int
    partitioning: str = PARTITIONING
    version: int = PLAN_VERSION
    items: int | None = None  # input items (None: a plan made before this was kept)


def part_folder(dest: Path, index: int) -> Path:
    """Where part ``index`` of a local destination writes: an ordinary output folder."""
    return Path(dest) / part_name(index)


def part_of(item: Job | BadInput, parts: int) -> int:
    if isinstance(item, Job):
        digest = hashlib.sha256(item.url.encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big") % parts
    return item.position % parts


def fingerprint(
    source: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[str, int, str]:
    """(name, size, fingerprint) of an input file, local or remote (``s3://…``)."""
    try:
        if storage.is_remote(source):
            name = str(source)
            size = storage.input_size(name, storage_options)
            with storage.open_input(name, storage_options) as stream:
                head = stream.read(FINGERPRINT_BYTES)
        else:
            path = Path(source)
            name = str(path.resolve())
            size = path.stat().st_size
            with path.open("rb") as stream:
                head = stream.read(FINGERPRINT_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(head + size.to_bytes(8, "big")).hexdigest()
    return name, size, digest


def load(store: Store) -> Plan | None:
    """The plan pinned in ``store``, or None when there is none (yet)."""
    try:
        data = store.read_bytes(PLAN_NAME)
        if data is None:
            return None
        return Plan(**json.loads(data))
    except (OSError, ValueError, TypeError) as exc:
        raise OutputError(
            f"the plan {store.display(PLAN_NAME)} is unreadable ({exc}); move it away to start over"
        ) from exc


def check_matches(found: Plan, wanted: Plan, dest: Store) -> None:
    """Refuse a rerun whose input or partitioning differs from what ``dest`` was made with."""
    if found.fingerprint != wanted.fingerprint or found.source_size != wanted.source_size:
        raise ConfigError(
            f"{dest} holds a cluster run of another input ({found.source}, {found.source_size} "
            f"bytes); this is {wanted.source} ({wanted.source_size} bytes). Write this input "
            "into another destination, or rerun the input that filled this one."
        )
    if (found.parts, found.partitioning, found.version) != (
        wanted.parts,
        wanted.partitioning,
        wanted.version,
    ):
        raise ConfigError(
            f"{dest} was planned with --parts {found.parts}; this run asks for --parts "
            f"{wanted.parts}. Rerun with --parts {found.parts} (or leave --parts out) to resume."
        )


def split(items: Iterator[Job | BadInput], store: Store, plan: Plan) -> Plan:
    """Write the part files of ``plan`` from ``items`` (one pass), then pin the plan.

    Returns the plan as pinned, with the number of items. Part files are written to local temp files
    (in DEST itself when it is local, so they are renamed into place) and published whole;
    ``plan.json`` is written last, so a split killed half-way is simply redone.
    """
    with contextlib.ExitStack() as outer:
        if store.remote:
            folder = Path(outer.enter_context(tempfile.TemporaryDirectory(prefix="fetchpool-")))
        else:
            folder = store.path / PARTS_NAME
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".fp-*"):
                fsutil.discard(str(stale))
        counts = [0] * plan.parts
        temps: list[str] = []
        with contextlib.ExitStack() as stack:
            writers: list[IO[str]] = []
            for _ in range(plan.parts):
                handle, temp = fsutil.create_temp(folder, ".jsonl.gz.part")
                temps.append(temp)
                raw = stack.enter_context(handle)
                zipped = stack.enter_context(
                    gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0)
                )
                text = io.TextIOWrapper(zipped, encoding="utf-8", newline="\n")
                writers.append(stack.enter_context(text))
            for item in items:
                index = part_of(item, plan.parts)
                writers[index].write(_encode(item))
                counts[index] += 1
        for index, temp in enumerate(temps):
            if store.remote:
                store.put_file(temp, part_input_name(index))
                fsutil.discard(temp)
            else:
                fsutil.sync_file(temp)
                os.replace(temp, store.path / part_input_name(index))
        if not store.remote:
            fsutil.fsync_dir(folder)
    pinned = replace(plan, items=sum(counts))
    write_json(store, PLAN_NAME, asdict(pinned))
    return pinned


def read_part(store: Store, index: int) -> Iterator[Job | BadInput]:
    """The items of part ``index``, in input order, with their global positions."""
    with (
        store.open_read(part_input_name(index)) as raw,
        gzip.open(raw, "rt", encoding="utf-8") as stream,
    ):
        for line in stream:
            yield _decode(line)


def _encode(item: Job | BadInput) -> str:
    if isinstance(item, Job):
        row: dict[str, Any] = {"p": item.position, "u": item.url}
        if item.line is not None:
            row["l"] = item.line
        if item.meta:
            row["m"] = dict(item.meta)
    else:
        row = {"p": item.position, "bad": item.raw, "c": item.code.value, "e": item.message}
        if item.line is not None:
            row["l"] = item.line
    return json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"


def _decode(line: str) -> Job | BadInput:
    row = json.loads(line)
    if "bad" in row:
        return BadInput(row["p"], row.get("l"), row["bad"], ErrorCode(row["c"]), row["e"])
    return Job(row["p"], row["u"], row.get("l"), row.get("m") or {})


def write_done(store: Store, index: int, summary: dict[str, Any]) -> None:
    write_json(store, part_done_name(index), summary)


def read_done(store: Store, index: int) -> dict[str, Any] | None:
    try:
        raw = store.read_bytes(part_done_name(index))
        data: dict[str, Any] | None = None if raw is None else json.loads(raw)
    except (OSError, ValueError):
        return None
    return data


def write_json(store: Store, name: str, data: dict[str, Any]) -> None:
    store.write_bytes(name, json.dumps(data, indent=1, sort_keys=True).encode())
