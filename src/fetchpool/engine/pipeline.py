"""The download pipeline: a bounded scheduler feeding a fetch backend, a CPU stage and writers.

::

    read_input ──▶ admit ──(bad line, done before, duplicate)──────────────────▶ finish
                     │                                            (engine/admission.py)
                     ▼ per-host queues (HostScheduler: per-host cap, rate, Retry-After)
                   dispatch ──▶ FetchBackend (--engine: threads | processes) ── one attempt
                                      │ on_done                 (Fetcher.fetch(job))
                                      ▼
                   events queue ◀── ImageStage (process pool), when images are processed
                     │
        loop thread: retry? ──▶ scheduler.add_later(backoff / Retry-After)
                     │ ok                                              (engine/loop.py)
                     ▼
                   publish, where the publish plan says ──▶ durable records ──▶ Journal.put
                   (engine/assembly.py builds the stages and decides the plan)  ──▶ observers

Everything stateful (journal, writer, scheduler, observers) is touched only by the loop
thread, so none of it needs locks; fetch threads and the CPU stage talk to it through one
queue of typed events. At most ``Options.in_flight`` input items are open at once (read but
not finished): memory grows with concurrency, never with the input's length.

This module is the front: :class:`Pipeline` (one run over one output folder, stoppable) and
:func:`download`; the run's loop, its admission and its assembly live beside it.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from fetchpool.config import Options
from fetchpool.engine.backends import FetcherFactory, check_engine
from fetchpool.engine.loop import Controls, RunLoop
from fetchpool.errors import ConfigError, DiskFullError, FetchpoolError
from fetchpool.events import Broadcast, Observer, RunFinished, RunStarted
from fetchpool.models import BadInput, Job, Report
from fetchpool.storage import is_remote

Source = str | os.PathLike[str] | Iterable[str | Mapping[str, Any]]


class Pipeline:
    """One run over one output folder. Use :func:`download` unless you need ``stop()``."""

    def __init__(
        self,
        out: Path,
        options: Options,
        *,
        fetcher: FetcherFactory | None = None,
        observers: Iterable[Observer] = (),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` is the monotonic clock the loop and its scheduler read (backoff, rate
        limits, Retry-After), injectable so that scheduling is tested without sleeping."""
        check_engine(options.fetch, fetcher)
        self.out = out
        self.options = options
        self._custom_fetcher = fetcher
        self._observers = Broadcast(observers)
        self._rng = rng or random.Random()
        self._clock = clock
        self._controls = Controls.new()
        from fetchpool.state.journal import iter_journal

        self._report = Report(out=out, source=partial(iter_journal, out))

    def stop(self, *, hurry: bool = False) -> None:
        """Ask the run to stop: no new work starts; finished work is kept. Thread-safe, and
        safe in a signal handler.

        Items in flight are finished and journaled first, unless ``hurry``: then they are
        abandoned (not journaled, so the next run fetches them) and the run returns as soon
        as the journal has committed what is finished. A stop may be hurried later.
        """
        self._controls.stop(hurry=hurry)

    @property
    def report(self) -> Report:
        """The run's report as it stands (counts grow while the run goes on): read it from
        another thread for progress, never change it."""
        return self._report

    @property
    def hurried(self) -> bool:
        """Whether a stop was hurried: fetch threads may still be winding down."""
        return self._controls.hurrying.is_set()

    def run(self, source: Source) -> Report:
        from fetchpool.inputs import check_input, read_input

        # A missing file, an unknown format or no URL column: refused before OUT is touched.
        check_input(
            source,
            format=self.options.input_format,
            url_column=self.options.url_column,
            caption_column=self.options.output.caption_column,
            required=self.options.required_columns,
        )
        if (self.out / ".fetchpool" / "plan.json").is_file():
            raise ConfigError(
                f"{self.out} holds a cluster run (its parts are in {self.out}/part-*): "
                "rerun it with --cluster, or write this run elsewhere"
            )
        name, size = _describe(source)
        return self.run_items(
            lambda: read_input(
                source,
                format=self.options.input_format,
                url_column=self.options.url_column,
                shard=self.options.shard,
            ),
            source_name=name,
            source_size=size,
            total=lambda: self._total(source),
        )

    def run_items(
        self,
        items: Callable[[], Iterator[Job | BadInput]],
        *,
        source_name: str | None = None,
        source_size: int | None = None,
        total: Callable[[], int | None] = lambda: None,
    ) -> Report:
        """Run over input items already read and numbered (``items()`` is called once the
        journal is open): what :meth:`run` does after reading, and what a part of a cluster
        run does with its part of the input (positions stay those of the whole input)."""
        from fetchpool.heap import keep_heap_trimmed
        from fetchpool.state.journal import Journal

        keep_heap_trimmed()
        started = time.perf_counter()
        try:
            with Journal.open(
                self.out,
                source=source_name,
                source_size=source_size,
                settings=self.options.recorded(),
            ) as journal:
                self._observers.on_event(RunStarted(total=total(), out=str(self.out)))
                loop = RunLoop(
                    self.out,
                    self.options,
                    journal,
                    self._report,
                    observers=self._observers,
                    controls=self._controls,
                    fetcher=self._custom_fetcher,
                    rng=self._rng,
                    clock=self._clock,
                )
                loop.run(items())
        except DiskFullError as exc:  # the journal's last commit, at close
            self._report.fail_run("disk_full", str(exc))
            self._controls.stop()
        self._report.wall = time.perf_counter() - started
        self._observers.on_event(
            RunFinished(wall=self._report.wall, interrupted=self._report.interrupted)
        )
        return self._report

    def _total(self, source: Source) -> int | None:
        from fetchpool.inputs import estimate_total

        if not isinstance(source, str | os.PathLike) or str(source) == "-":
            return None
        try:
            return estimate_total(source, format=self.options.input_format)
        except (FetchpoolError, OSError, ValueError):
            return None


def _describe(source: Source) -> tuple[str | None, int | None]:
    """The input's name and size for the journal's ``runs`` table, when it has them."""
    if isinstance(source, str | os.PathLike):
        if str(source) == "-":
            return "<stdin>", None
        path = Path(source)
        try:
            return str(path.resolve()), path.stat().st_size
        except OSError:
            return str(path), None
    return None, None


def download(
    source: Source,
    out: str | os.PathLike[str],
    *,
    observers: Iterable[Observer] = (),
    fetcher: FetcherFactory | None = None,
    **options: Any,
) -> Report:
    """Download every URL of ``source`` into the folder ``out``; return what happened.

    ``source`` is a path to a txt/csv/tsv/jsonl/parquet file, ``"-"`` for stdin, or an iterable
    of URLs or records. Options are the flat names of :class:`fetchpool.config.Options` and its
    stage configs (``threads=64``, ``per_host=16``, ``resize=256``, ``format="webdataset"``...).
    Re-running with the same ``out`` resumes: finished items are not fetched again.
    ``fetcher`` replaces the HTTP client (e.g. ``lambda tmp: MockFetcher(handler, tmp)``);
    with ``engine="processes"`` it is called in each worker process, so it must pickle (a
    module-level function, or ``functools.partial`` of one).
    ``cluster`` (a ``distributed.Client``, ``"tcp://host:8786"`` or ``"local:N"``) spreads the
    run over Dask workers, the input cut into ``parts`` (docs/distributed.md); ``out`` (and
    ``source``) may then be an fsspec URL such as ``s3://bucket/ds``, with ``storage_options``.
    """
    cluster, parts = options.pop("cluster", None), options.pop("parts", None)
    opts = options.pop("options", None) or Options.from_kwargs(**options)
    check_engine(opts.fetch)
    if cluster is not None:
        from fetchpool.cluster import download_on_cluster

        return download_on_cluster(source, out, opts, cluster=cluster, parts=parts)
    if is_remote(out) or is_remote(source):
        raise ConfigError(
            f"{out if is_remote(out) else source}: a URL as destination or input needs "
            "--cluster (e.g. --cluster local:2 on this machine); see docs/distributed.md"
        )
    pipeline = Pipeline(Path(out), opts, fetcher=fetcher, observers=observers)
    return pipeline.run(source)


__all__ = ["FetcherFactory", "Pipeline", "Report", "Source", "download"]
