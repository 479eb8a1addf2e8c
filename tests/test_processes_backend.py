"""The ``processes`` engine builds each worker's fetcher from the caller's factory: what a
run reports when that factory cannot build one in the worker."""

from __future__ import annotations

from pathlib import Path

from fetchpool import download
from fetchpool.models import ErrorCode, Status
from fetchpool.stages import Fetcher


def no_fetcher_here(tmp_dir: Path) -> Fetcher:
    """A module-level factory (it pickles, so it reaches the worker) that raises there."""
    raise RuntimeError(f"no fetcher here for {tmp_dir.name}")


def test_a_factory_that_raises_in_the_worker_is_named_in_every_lost_item(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    urls = [f"http://h{n}.test/{n}.jpg" for n in range(6)]
    report = download(urls, out, engine="processes", threads=2, fetcher=no_fetcher_here)
    assert report.failed == len(urls) and report.exit_code == 1
    records = list(report.records())
    assert {record.status for record in records} == {Status.FAILED}
    assert {record.error_code for record in records} == {ErrorCode.INTERNAL_ERROR}
    for record in records:
        # Why the worker went away, not "exited (None)": the factory's own error.
        assert record.error_message is not None
        assert "could not start: RuntimeError: no fetcher here for tmp" in record.error_message
    assert list((out / ".fetchpool" / "tmp").iterdir()) == []
