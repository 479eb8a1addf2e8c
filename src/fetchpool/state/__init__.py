"""Run state: the SQLite journal (resume), the output-folder lock, and manifest export."""

from __future__ import annotations

from fetchpool.redact import redact_url
from fetchpool.state.journal import (
    BATCH_ROWS,
    BATCH_SECONDS,
    Journal,
    check_output_folder,
    iter_journal,
)
from fetchpool.state.manifest import ManifestFormat, export_manifest
from fetchpool.state.paths import db_path, lock_path, state_dir, tmp_dir

__all__ = [
    "BATCH_ROWS",
    "BATCH_SECONDS",
    "Journal",
    "ManifestFormat",
    "check_output_folder",
    "db_path",
    "export_manifest",
    "iter_journal",
    "lock_path",
    "redact_url",
    "state_dir",
    "tmp_dir",
]
