"""The engine: the download pipeline, its fetch backends, the scheduler and the task runner.

The runner's names are re-exported here and loaded on first use, so that reading the engine
registry (``fetchpool.engine.backends``, which the CLI lists in ``--help``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fetchpool.engine.runner import Done, Run, TaskPool, run

__all__ = ["Done", "Run", "TaskPool", "run"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'fetchpool.engine' has no attribute {name!r}")
    return getattr(importlib.import_module("fetchpool.engine.runner"), name)
