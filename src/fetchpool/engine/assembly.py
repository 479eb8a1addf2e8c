"""Assembly: a run's stages built from its options, and the one plan for publishing.

::

    Options ──▶ writer (files | webdataset | parquet; the journal as its shard ledger)
            ──▶ image stage (process pool), when images are processed
            ──▶ publish plan: where each item gets its final name, decided once, here
            ──▶ fetch backend (--engine), publishing in fetch when the plan says so
            ──▶ publisher threads, when the plan says so

Each item is published (linked to its final name, or written into a shard) in exactly one
place, the one :class:`PublishPlan` names. The run loop reads the plan; it never infers it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetchpool.config import Options
from fetchpool.engine.backends import BackendSetup, FetchBackend, FetcherFactory, build_backend
from fetchpool.engine.runner import Done, TaskPool
from fetchpool.models import Record
from fetchpool.stages import Writer

if TYPE_CHECKING:
    from fetchpool.state.journal import Journal

#: Threads that publish CPU-stage results: fsync + link are short and disk-bound; a few
#: overlap them without taking fetch threads.
PUBLISH_THREADS = 4


class PublishPlan(enum.Enum):
    """Where each item is published."""

    #: The files writer and no CPU stage: the fetch backend links each file as soon as it is
    #: fetched, so the link and its syscalls run in parallel, not in the run loop.
    IN_FETCH = "in_fetch"
    #: The files writer after the CPU stage: a few publisher threads link the results, for
    #: the same reason.
    AFTER_CPU_IN_PUBLISHERS = "after_cpu_in_publishers"
    #: A writer that is not concurrent (a shard is one file): the run loop writes each item.
    IN_LOOP = "in_loop"

    @classmethod
    def choose(cls, writer: Writer, cpu_stage: bool) -> PublishPlan:
        if not writer.concurrent:
            return cls.IN_LOOP
        return cls.AFTER_CPU_IN_PUBLISHERS if cpu_stage else cls.IN_FETCH


@dataclass(frozen=True, slots=True)
class Stages:
    """A run's stages, in data-flow order, and the plan that ties them."""

    writer: Writer
    images: Any  # fetchpool.process.ImageStage, or None when images are not processed
    backend: FetchBackend
    publishers: TaskPool[Record] | None  # with AFTER_CPU_IN_PUBLISHERS only
    plan: PublishPlan

    @property
    def holds_rows(self) -> bool:
        """A sharded writer keeps failed and skipped rows with its open shard (its metadata):
        they are journaled when it is published, like its samples."""
        return self.writer.holds_rows


def assemble(
    out: Path,
    options: Options,
    journal: Journal,
    *,
    fetcher: FetcherFactory | None,
    on_fetched: Callable[[Done[Record]], None],
    on_processed: Callable[[Record], None],
    on_published: Callable[[Done[Record]], None],
) -> Stages:
    """Build the stages of a run into ``out``; results reach the three callbacks, from the
    stages' own threads."""
    from fetchpool.outputs import make_writer

    writer = make_writer(out, options.output, ledger=journal, digests=options.fetch.digests)
    journal.before_commit = writer.sync
    images = _image_stage(out, options, on_processed)
    plan = PublishPlan.choose(writer, images is not None)
    publishers: TaskPool[Record] | None = None
    if plan is PublishPlan.AFTER_CPU_IN_PUBLISHERS:
        publishers = TaskPool("threads", PUBLISH_THREADS, name="publish", on_done=on_published)
    in_fetch = plan is PublishPlan.IN_FETCH
    setup = BackendSetup(
        options.fetch,
        out / ".fetchpool" / "tmp",
        on_fetched,
        fetcher=fetcher,
        # The run's writer in this process; the same writer built again in a worker process.
        writer=writer if in_fetch else None,
        writer_factory=partial(make_writer, out, options.output) if in_fetch else None,
    )
    return Stages(writer, images, build_backend(setup), publishers, plan)


def _image_stage(out: Path, options: Options, on_processed: Callable[[Record], None]) -> Any:
    if not options.image.active:
        return None
    from fetchpool.process import ImageStage

    return ImageStage(options.image, out / ".fetchpool" / "tmp", on_processed)
