"""fetchpool: download large lists of URLs fast, resumably, and show what happened.

>>> import fetchpool
>>> report = fetchpool.download("urls.txt", "out", threads=64)   # doctest: +SKIP
>>> report.ok, report.failed, report.exit_code                    # doctest: +SKIP

The public API is re-exported here and loaded on first use, so ``import fetchpool`` (and the
``fetchpool --help`` that imports it) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fetchpool.config import FetchConfig, ImageConfig, Options, OutputConfig
    from fetchpool.engine.pipeline import Pipeline, download
    from fetchpool.engine.runner import Done, Run, TaskPool, run
    from fetchpool.errors import (
        ConfigError,
        DiskFullError,
        FetchError,
        FetchpoolError,
        InputError,
        LockedError,
        OutputError,
        ProcessError,
        StateError,
    )
    from fetchpool.events import ItemFinished, Observer, RunFinished, RunStarted
    from fetchpool.fetch import HttpFetcher, MockFetcher, MockResponse
    from fetchpool.models import ErrorCode, Job, Record, Report, Status, TaskRecord
    from fetchpool.origin import Origin

_EXPORTS = {
    "ConfigError": "fetchpool.errors",
    "DiskFullError": "fetchpool.errors",
    "Done": "fetchpool.engine.runner",
    "ErrorCode": "fetchpool.models",
    "FetchConfig": "fetchpool.config",
    "FetchError": "fetchpool.errors",
    "FetchpoolError": "fetchpool.errors",
    "HttpFetcher": "fetchpool.fetch",
    "ImageConfig": "fetchpool.config",
    "InputError": "fetchpool.errors",
    "ItemFinished": "fetchpool.events",
    "Job": "fetchpool.models",
    "LockedError": "fetchpool.errors",
    "MockFetcher": "fetchpool.fetch",
    "MockResponse": "fetchpool.fetch",
    "Observer": "fetchpool.events",
    "Options": "fetchpool.config",
    "Origin": "fetchpool.origin",
    "OutputConfig": "fetchpool.config",
    "OutputError": "fetchpool.errors",
    "Pipeline": "fetchpool.engine.pipeline",
    "ProcessError": "fetchpool.errors",
    "Record": "fetchpool.models",
    "Report": "fetchpool.models",
    "Run": "fetchpool.engine.runner",
    "RunFinished": "fetchpool.events",
    "RunStarted": "fetchpool.events",
    "StateError": "fetchpool.errors",
    "Status": "fetchpool.models",
    "TaskPool": "fetchpool.engine.runner",
    "TaskRecord": "fetchpool.models",
    "download": "fetchpool.engine.pipeline",
    "run": "fetchpool.engine.runner",
}

__all__ = [
    "ConfigError",
    "DiskFullError",
    "Done",
    "ErrorCode",
    "FetchConfig",
    "FetchError",
    "FetchpoolError",
    "HttpFetcher",
    "ImageConfig",
    "InputError",
    "ItemFinished",
    "Job",
    "LockedError",
    "MockFetcher",
    "MockResponse",
    "Observer",
    "Options",
    "Origin",
    "OutputConfig",
    "OutputError",
    "Pipeline",
    "ProcessError",
    "Record",
    "Report",
    "Run",
    "RunFinished",
    "RunStarted",
    "StateError",
    "Status",
    "TaskPool",
    "TaskRecord",
    "download",
    "run",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fetchpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
