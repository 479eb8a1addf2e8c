"""The engine: the generic task runner (and, later, the download pipeline built on it)."""

from __future__ import annotations

from fetchpool.engine.runner import Done, Run, TaskPool, run

__all__ = ["Done", "Run", "TaskPool", "run"]
