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


def part_folders(out: Path) -> list[Path] | None:
    """The part folders of a cluster run's destination (``OUT/part-NNNNN`` with a journal),
    in part order; None when ``out`` is not one (it has no ``.fetchpool/plan.json``)."""
    out = Path(out)
    if not (state_dir(out) / "plan.json").is_file():
        return None
    return sorted(p.parent.parent for p in out.glob("part-*/" + STATE_DIR + "/" + DB_NAME))
