"""Where fetchpool keeps its own files inside an output folder (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

STATE_DIR = ".fetchpool"
DB_NAME = "state.db"
LOCK_NAME = "lock"
TMP_NAME = "tmp"


def state_dir(out: Path) -> Path:
    """``OUT/.fetchpool``."""
    return Path(out) / STATE_DIR


def db_path(out: Path) -> Path:
    """``OUT/.fetchpool/state.db``: the journal."""
    return state_dir(out) / DB_NAME


def lock_path(out: Path) -> Path:
    """``OUT/.fetchpool/lock``: flock()ed by the active run."""
    return state_dir(out) / LOCK_NAME


def tmp_dir(out: Path) -> Path:
    """``OUT/.fetchpool/tmp``: temp files, same filesystem as OUT so renames are atomic."""
    return state_dir(out) / TMP_NAME


# A cluster run's destination (docs/distributed.md), as names relative to it, "/"-separated so
# they serve local folders and object stores alike.
PLAN_NAME = f"{STATE_DIR}/plan.json"
PARTS_NAME = f"{STATE_DIR}/parts"


def part_name(index: int) -> str:
    """``part-00007``: part 7's output folder in the destination."""
    return f"part-{index:05d}"


def part_input_name(index: int) -> str:
    """``.fetchpool/parts/part-00007.jsonl.gz``: the items of part 7."""
    return f"{PARTS_NAME}/{part_name(index)}.jsonl.gz"


def part_done_name(index: int) -> str:
    """``.fetchpool/parts/part-00007.done``: part 7 finished (and published): its counts."""
    return f"{PARTS_NAME}/{part_name(index)}.done"


def part_records_name(index: int) -> str:
    """``.fetchpool/parts/part-00007.records.jsonl.gz``: part 7's records, published with
    its outputs when the part ran on scratch (object storage): its journal stays behind."""
    return f"{PARTS_NAME}/{part_name(index)}.records.jsonl.gz"


def shard_companions(shard: str) -> list[str]:
    """Files published with a shard, before it: ``00003_stats.json`` and, beside a tar,
    ``00003.parquet`` (its metadata). A shard a crash left without its name loses them too."""
    stem, _, suffix = shard.rpartition(".")
    names = [f"{stem}_stats.json"]
    if suffix == "tar":
        names.append(f"{stem}.parquet")
    return names
