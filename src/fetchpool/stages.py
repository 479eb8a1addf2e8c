"""The seams between stages: one Protocol with one main method each. Bottom layer.

Contracts every implementation keeps:

* :class:`Fetcher` makes **one attempt** at a URL (following redirects). It never sleeps for
  a retry: the scheduler owns retries, backoff and ``Retry-After``, so a slow or rate-limited
  host costs only its own items, never a thread. On success the record has ``status=OK``,
  ``temp_path`` (a complete, fsynced temp file inside the run's temp folder), ``bytes`` and
  ``sha256`` (also as ``fetched_bytes`` / ``fetched_sha256``, which the CPU stage leaves as
  they are), ``content_type``, ``extension`` and ``final_url``; on failure ``status=FAILED``
  with ``error_code`` / ``error_message`` / ``http_status`` / ``retry_after`` and no temp file.
  It must be safe to call from many threads at once.
* :class:`Writer` publishes records whose ``temp_path`` is set and returns the records whose
  publication is now **durable** (file renamed and fsynced, or shard closed). Only those are
  journaled, so a crash never leaves the journal claiming more than the disk holds. ``close``
  flushes what is still buffered and returns those records too. ``sync`` makes every
  publication so far durable; the journal calls it before each commit, so a writer may batch
  its directory fsyncs. Called from one thread, unless ``concurrent`` is True: then ``write``
  may run in many threads at once (the pipeline then publishes in the fetch threads). When
  ``holds_rows`` is True, ``write`` also takes every failed or skipped record and returns it
  with the shard that was open (each input row is then in one shard's metadata).
* :class:`ShardLedger` is what a writer that publishes many records in one file (a shard)
  tells before and after naming it, so the shard and its records become durable together:
  the journal implements it (``stage`` commits the rows before the shard gets its name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fetchpool.models import Job, Record


class Fetcher(Protocol):
    def fetch(self, job: Job) -> Record: ...

    def close(self) -> None: ...


class Writer(Protocol):
    concurrent: bool
    #: ``write`` also takes failed and skipped records and returns them with a shard.
    holds_rows: bool

    def write(self, record: Record) -> list[Record]: ...

    def sync(self) -> None: ...

    def close(self) -> list[Record]: ...


class ShardLedger(Protocol):
    def stage(self, shard: str, size: int, records: Sequence[Record]) -> None: ...

    def unstage(self, shard: str) -> None: ...
