"""The plan of a cluster run: how the input is cut into parts, pinned in DEST.

::

    DEST/
      .fetchpool/plan.json              input fingerprint, number of parts, partitioning
      .fetchpool/parts/part-00007.jsonl.gz   the items of part 7 (global positions kept)
      .fetchpool/parts/part-00007.done  part 7 finished: its counts (JSON)
      part-00007/                       part 7's output: an ordinary fetchpool output folder

An item goes to part ``sha256(url) mod parts`` (a bad line, which has no URL, to ``position mod
parts``), so every copy of a URL lands in one part and de-duplication gives what a single run
gives. The driver writes the part files in one streaming pass over the input, so no part ever
reads the whole input and memory holds one buffered writer per part, whatever the input's length.
Part files are written under temp names and renamed, and ``plan.json`` is written last: a split
killed half-way leaves no plan and is redone; a finished one is reused by every rerun.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from fetchpool import fsutil
from fetchpool.errors import ConfigError, InputError, OutputError
from fetchpool.models import BadInput, ErrorCode, Job
from fetchpool.state.paths import STATE_DIR

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


def plan_path(dest: Path) -> Path:
    return Path(dest) / STATE_DIR / "plan.json"


def parts_dir(dest: Path) -> Path:
    return Path(dest) / STATE_DIR / "parts"


def part_file(dest: Path, index: int) -> Path:
    return parts_dir(dest) / f"part-{index:05d}.jsonl.gz"


def done_file(dest: Path, index: int) -> Path:
    return parts_dir(dest) / f"part-{index:05d}.done"


def part_folder(dest: Path, index: int) -> Path:
    """Where part ``index`` writes: an ordinary output folder with its own journal."""
    return Path(dest) / f"part-{index:05d}"


def part_of(item: Job | BadInput, parts: int) -> int:
    if isinstance(item, Job):
        digest = hashlib.sha256(item.url.encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big") % parts
    return item.position % parts


def fingerprint(source: str | os.PathLike[str]) -> tuple[str, int, str]:
    """(resolved name, size, fingerprint) of an input file."""
    path = Path(source)
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            head = stream.read(FINGERPRINT_BYTES)
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from exc
    digest = hashlib.sha256(head + size.to_bytes(8, "big")).hexdigest()
    return str(path.resolve()), size, digest


def load(dest: Path) -> Plan | None:
    """The plan pinned in ``dest``, or None when there is none (yet)."""
    path = plan_path(dest)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Plan(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise OutputError(
            f"the plan {path} is unreadable ({exc}); move it away to start over"
        ) from exc


def check_matches(found: Plan, wanted: Plan, dest: Path) -> None:
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


def split(items: Iterator[Job | BadInput], dest: Path, plan: Plan) -> list[int]:
    """Write the part files of ``plan`` from ``items`` (one pass), then pin the plan.

    Returns the number of items in each part. Part files are written under temp names and
    renamed; ``plan.json`` is written last, so a split killed half-way is simply redone.
    """
    folder = parts_dir(dest)
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
            zipped = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1))
            text = io.TextIOWrapper(zipped, encoding="utf-8", newline="\n")
            writers.append(stack.enter_context(text))
        for item in items:
            index = part_of(item, plan.parts)
            writers[index].write(_encode(item))
            counts[index] += 1
    for index, temp in enumerate(temps):
        fsutil.sync_file(temp)
        os.replace(temp, part_file(dest, index))
    fsutil.fsync_dir(folder)
    _write_json(plan_path(dest), asdict(plan))
    return counts


def read_part(dest: Path, index: int) -> Iterator[Job | BadInput]:
    """The items of part ``index``, in input order, with their global positions."""
    with gzip.open(part_file(dest, index), "rt", encoding="utf-8") as stream:
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


def write_done(dest: Path, index: int, summary: dict[str, Any]) -> None:
    _write_json(done_file(dest, index), summary)


def read_done(dest: Path, index: int) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(done_file(dest, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    handle, temp = fsutil.create_temp(path.parent, ".json.part")
    try:
        with handle:
            handle.write(json.dumps(data, indent=1, sort_keys=True).encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        fsutil.discard(temp)
    fsutil.fsync_dir(path.parent)
