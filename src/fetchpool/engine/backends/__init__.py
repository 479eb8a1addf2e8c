"""Fetch backends: where fetch attempts run, behind one protocol, chosen by ``--engine``.

As :mod:`concurrent.futures` has one module per executor behind ``Executor``, each backend is
one module here behind :class:`FetchBackend`:

* :mod:`~fetchpool.engine.backends.threads` — fetch threads in the run's own process;
* :mod:`~fetchpool.engine.backends.processes` — ``--fetch-processes`` worker processes,
  each with its own threads (and its own GIL);
* :mod:`~fetchpool.engine.backends.multiplexed` — one selector loop thread driving many
  non-blocking connections (:mod:`fetchpool.fetch.multiplex`).

A new engine is one more module with ``build(setup) -> FetchBackend`` and
``check_fetcher(factory)``, and one more line in :data:`BACKENDS`; the pipeline never names a
backend. What the run gives a backend is a :class:`BackendSetup`: the fetch configuration,
picklable *factories* for the fetcher and (when fetches publish their own files) the writer,
so any fetcher and writer travel to a worker process, and the ``on_done`` callback that takes
every result.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fetchpool.config import FetchConfig
    from fetchpool.engine.runner import Done
    from fetchpool.models import Job, Record
    from fetchpool.stages import Fetcher, Writer

#: Builds a fetcher from the temp folder its bodies go to (``OUT/.fetchpool/tmp``); called in
#: the process that runs the fetches, so for a worker process it must pickle (a module-level
#: function, or :func:`functools.partial` of one).
FetcherFactory = Callable[[Path], "Fetcher"]
#: Builds a concurrent writer (the files writer) in the process that publishes with it.
WriterFactory = Callable[[], "Writer"]

#: Every backend, by its ``--engine`` name: the module that builds it. Modules are imported
#: only when their backend runs (the processes one brings multiprocessing along).
BACKENDS: dict[str, str] = {
    "threads": "fetchpool.engine.backends.threads",
    "processes": "fetchpool.engine.backends.processes",
    "multiplexed": "fetchpool.engine.backends.multiplexed",
}


class FetchBackend(Protocol):
    """The contract a fetch engine implements.

    * ``submit(job, label, attempt)`` starts (or queues, until :meth:`flush`) attempt number
      ``attempt`` at ``job`` and returns its task id; ``label`` (the host) travels to the
      :class:`~fetchpool.engine.runner.Done`. It must not block for long: the run loop calls it.
    * Every submitted attempt is delivered exactly once to the ``on_done`` callback given when
      the backend was built, as a ``Done[Record]``, from any thread the backend owns: ``on_done``
      is thread-safe and quick (it queues the result for the run loop). A backend never raises
      for an item: a failed fetch, a bug in the fetcher, a worker process that died, are each a
      failed :class:`~fetchpool.models.Record` (``internal_error`` for the last two).
    * With a writer (the files writer), a backend publishes each ``ok`` record before
      delivering it (link to the final name). A hurried stop must never leave a file named
      whose result the run loop will not see: once :meth:`shutdown` with ``cancel`` returns,
      every publication started has been delivered (threads: the publish gate), or its
      process is dead (its file is adopted as identical by the next run).
    * :meth:`shutdown` stops: by default after every in-flight attempt is delivered;
      with ``cancel``, dropping queued attempts and abandoning running ones (their results may
      still arrive or not; the run counts them unfinished); ``wait=False`` with ``cancel``
      does not wait for attempts that cannot be interrupted (threads end theirs, bounded by
      the timeouts, unheard). A backend closes its own fetchers.
    """

    @property
    def in_flight(self) -> int:
        """Attempts submitted and not yet delivered."""

    def submit(self, job: Job, label: str = "", attempt: int = 1) -> int: ...

    def flush(self) -> None:
        """Start what was submitted, if ``submit`` only queued it."""

    def shutdown(self, *, cancel: bool = False, wait: bool = True) -> None: ...


@dataclass(frozen=True, slots=True)
class BackendSetup:
    """What the run gives a backend to build itself from."""

    fetch: FetchConfig
    tmp_dir: Path
    on_done: Callable[[Done[Record]], None]
    #: A fetcher factory given by the caller (``download(fetcher=...)``); None: the HTTP
    #: client, built by each backend from its share of ``fetch``.
    fetcher: FetcherFactory | None = None
    #: The run's concurrent writer, when fetches publish their files: shared in-process.
    writer: Writer | None = None
    #: The same writer, built again in a worker process (it must pickle).
    writer_factory: WriterFactory | None = None

    @property
    def publishes(self) -> bool:
        """Whether fetches publish their own files (then bodies are fsynced as written)."""
        return self.writer is not None


def check_engine(config: FetchConfig, fetcher: FetcherFactory | None = None) -> None:
    """Refuse, in the CLI's words and before a run touches its output folder, an engine that
    is not registered, or a ``fetcher`` factory that it cannot run (:class:`ConfigError`)."""
    if config.engine not in BACKENDS:
        from fetchpool.errors import ConfigError  # here: the CLI reads this module at start

        raise ConfigError(f"--engine {config.engine!r}: choose {' or '.join(sorted(BACKENDS))}")
    if fetcher is not None:
        _module(config.engine).check_fetcher(fetcher)


def build_backend(setup: BackendSetup) -> FetchBackend:
    """The backend ``--engine`` (``setup.fetch.engine``) names, built from ``setup``."""
    check_engine(setup.fetch)
    backend: FetchBackend = _module(setup.fetch.engine).build(setup)
    return backend


def _module(engine: str) -> Any:
    """A backend's module: ``build(setup) -> FetchBackend`` and ``check_fetcher(factory)``,
    which raises :class:`ConfigError` for a fetcher factory the backend cannot run."""
    return importlib.import_module(BACKENDS[engine])


__all__ = [
    "BACKENDS",
    "BackendSetup",
    "FetchBackend",
    "FetcherFactory",
    "WriterFactory",
    "build_backend",
    "check_engine",
]
