"""One download spread over a real Dask LocalCluster of worker processes (issue 12, step 1).

The cluster's workers are real processes started by distributed's nanny; the origin is the
embedded one on loopback; every result is compared, row for row, with a single-machine run of
the same input (RELIABILITY.md cases 43 and 47).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster_helpers import (
    LOOPBACK,
    S3,
    WorkerKiller,
    client,
    mixed_input,
    rows,
    s3,
    scratch,
    shard_keys,
)
from durability_helpers import all_shard_keys, assert_has_output
from fetchpool import Origin, Status, download
from fetchpool.cluster import plan as plans
from fetchpool.errors import ConfigError
from fetchpool.state.paths import part_done_name
from fetchpool.storage import Store
from reliability_helpers import cli, cli_env

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow
__all__ = ["client", "s3", "scratch"]  # fixtures, imported for pytest
FORMATS = ["files", "webdataset", "parquet"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cluster_run_equals_a_single_machine_run(client: Any, tmp_path: Path, fmt: str) -> None:
    # The size: 5,000 rows, with repeated URLs, 404s and bad lines.
    with Origin(latency=0.005) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=5000)
        options = {"format": fmt, "shard_size": 200, "threads": 16, **LOOPBACK}
        single = download(src, tmp_path / "single", **options)
        spread = download(src, tmp_path / "dest", cluster=client, parts=5, **options)
    assert spread.exit_code == single.exit_code == 1  # the 404s and bad lines
    assert rows(spread) == rows(single)
    assert spread.counts == single.counts and spread.errors == single.errors
    plan = plans.load(Store(tmp_path / "dest"))  # pinned: a rerun must match it
    assert plan is not None and plan.parts == 5
    if fmt == "webdataset":
        keys = shard_keys(tmp_path / "dest")
        ok = {f"{r.position:09d}" for r in spread.records() if r.status is Status.OK}
        assert set(keys) == ok and set(keys.values()) == {1}


def test_the_cli_runs_on_a_local_cluster_and_the_manifest_reads_the_destination(
    tmp_path: Path,
) -> None:
    with Origin(latency=0.02) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=120)
        dest = tmp_path / "dest"
        done = subprocess.run(
            cli("get", str(src), "-o", str(dest), "--allow-private-networks",
                "--cluster", "local:2", "--parts", "3", "--resize", "32"),
            env=cli_env(), capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr  # 404s and bad lines; every image ok
    assert "process_failed" not in done.stderr, "the CPU stage works inside Dask workers"
    manifest = subprocess.run(
        cli("manifest", str(dest), "--format", "csv"), env=cli_env(), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert manifest.returncode == 0, manifest.stderr
    lines = manifest.stdout.splitlines()
    assert len(lines) == 1 + 120
    assert all(",part-0000" in line for line in lines[1:] if ",ok," in line)


def test_a_rerun_submits_only_unfinished_parts_and_a_different_plan_is_refused(
    client: Any, tmp_path: Path
) -> None:
    with Origin(latency=0.02) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=80)
        dest = tmp_path / "dest"
        first = download(src, dest, cluster=client, parts=4, **LOOPBACK)
        assert first.items == 80
        marks = {k: (dest / part_done_name(k)).stat().st_mtime_ns for k in range(4)}
        (dest / part_done_name(2)).unlink()  # as if the driver died before part 2 was noted
        origin.reset_counters()
        again = download(src, dest, cluster=client, parts=4, **LOOPBACK)
        assert origin.requests("/small/") == [], "finished work is not fetched again"
        assert rows(again) == rows(first)
        assert (dest / part_done_name(2)).exists()
        for k in (0, 1, 3):  # not run again
            assert (dest / part_done_name(k)).stat().st_mtime_ns == marks[k]
        with pytest.raises(ConfigError, match="--parts 4"):
            download(src, dest, cluster=client, parts=3, **LOOPBACK)
        other = mixed_input(origin, tmp_path / "other.txt", count=81)
        with pytest.raises(ConfigError, match="another input"):
            download(other, dest, cluster=client, **LOOPBACK)
        with pytest.raises(ConfigError, match="holds a cluster run"):
            download(src, dest, **LOOPBACK)  # the same input without --cluster
        download(src, tmp_path / "alone", **LOOPBACK)
        with pytest.raises(ConfigError, match="made without --cluster"):
            download(src, tmp_path / "alone", cluster=client, **LOOPBACK)


@pytest.fixture(scope="module")
def slow_origin() -> Iterator[Origin]:
    """One origin for the kill matrix, so every variant downloads the same URLs and the
    single-machine run of each format is made once."""
    with Origin(latency=0.1) as origin:
        yield origin


_SINGLE: dict[str, list[tuple[Any, ...]]] = {}

#: (place, format, engine): every format and both fetch engines in a local destination;
#: every format, and the process engine once, in S3 (RELIABILITY.md cases 43, 47, 48).
KILL_MATRIX = [
    *[("local", fmt, engine) for fmt in FORMATS for engine in ("threads", "processes")],
    ("s3", "files", "threads"),
    ("s3", "webdataset", "processes"),
    ("s3", "parquet", "threads"),
]


@pytest.mark.parametrize(("place", "fmt", "engine"), KILL_MATRIX)
def test_a_worker_killed_mid_part_changes_nothing(
    client: Any,
    slow_origin: Origin,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    place: str,
    fmt: str,
    engine: str,
) -> None:
    """SIGKILL one worker at ~30%: Dask runs its part again elsewhere, which resumes from
    the part's journal (on the worker's scratch, for S3); the merged result equals a
    single-machine run, every ok row has its output, and no sample is in two shards."""
    origin = slow_origin
    src = mixed_input(origin, tmp_path_factory.getbasetemp() / "kill-urls.txt", count=200)
    options: dict[str, Any] = {"format": fmt, "shard_size": 10, "threads": 4, **LOOPBACK}
    if fmt not in _SINGLE:
        _SINGLE[fmt] = rows(download(src, tmp_path / "single", **options))
    if engine == "processes":
        options["fetch_processes"] = 2
    dest: str | Path = tmp_path / "dest"
    if place == "s3":
        s3: S3 = request.getfixturevalue("s3")
        dest = f"s3://{s3.bucket(f'kill-{uuid.uuid4().hex[:8]}')}/ds"
        options["storage_options"] = s3.storage_options
    pids = sorted(client.run(os.getpid).values())
    origin.reset_counters()
    killer = WorkerKiller(origin, pids[0], after=45)  # ~30% of the images
    killer.start()
    try:
        spread = download(src, dest, cluster=client, parts=4, **options)
    finally:
        killer.join()
    assert killer.killed
    assert rows(spread) == _SINGLE[fmt]
    here = materialize(dest, tmp_path / "copy", request)
    cache: dict[str, Counter[str]] = {}
    for record in spread.records(Status.OK):
        assert_has_output(here, fmt, record, cache)
    if fmt != "files":
        keys = all_shard_keys(here)
        assert set(keys.values()) == {1}, "no sample in two shards"
        assert len(keys) == spread.ok
    leftover = [p for p in here.rglob(".fp-*") if "tmp" not in p.parts]
    assert leftover == []


def materialize(dest: str | Path, copy: Path, request: pytest.FixtureRequest) -> Path:
    """A local folder with what ``dest`` holds: itself, or a download of the bucket's."""
    if isinstance(dest, Path):
        return dest
    s3: S3 = request.getfixturevalue("s3")
    s3.filesystem().get(dest.removeprefix("s3://"), str(copy), recursive=True)
    return copy


@pytest.mark.parametrize(
    ("fmt", "engine"), [("files", "threads"), ("webdataset", "processes"), ("parquet", "threads")]
)
def test_killing_the_driver_leaves_no_process_and_reruns_finish_the_run(
    tmp_path: Path, fmt: str, engine: str
) -> None:
    """kill -9 of `get --cluster local:2`, twice, at different moments: the local cluster's
    workers and their children go with it every time (case 46); after each kill what is in
    DEST holds (every ok row has its output, no sample twice, no stray temp file), and the
    same command then finishes the run with the single-machine result (cases 43, 47)."""
    from durability_helpers import TAG_VAR, tagged_pids, wait_no_tagged_processes

    tag = uuid.uuid4().hex
    env = {**cli_env(), TAG_VAR: tag}
    with Origin(latency=0.3) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=160)
        dest = tmp_path / "dest"
        args = cli("get", str(src), "-o", str(dest), "--allow-private-networks", "-q",
                   "--cluster", "local:2", "--parts", "4", "--threads", "4",
                   "--format", fmt, "--shard-size", "10")  # fmt: skip
        if engine == "processes":
            args += ["--fetch-processes", "2"]
        for kill_at in (20, 70):
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            driver = subprocess.Popen(args, env=env, start_new_session=True, **quiet)
            try:
                deadline = time.monotonic() + 90
                while len(origin.requests("/small/")) < kill_at and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert driver.poll() is None and len(tagged_pids(tag)) >= 3, "workers running"
                driver.send_signal(signal.SIGKILL)
                driver.wait(timeout=30)
                left = wait_no_tagged_processes(tag, 15.0)
            finally:
                if driver.poll() is None:
                    driver.kill()
            assert left == [], f"processes outlived the driver: {left}"
            check_cluster_dest(dest, fmt)
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180,
                               check=False)  # fmt: skip
        assert again.returncode == 1, again.stderr  # the 404s and bad lines
        single = download(src, tmp_path / "single", threads=4, format=fmt, **LOOPBACK)
    from fetchpool.state.journal import iter_journal

    assert rows(iter_journal(dest)) == rows(single)
    assert check_cluster_dest(dest, fmt) == single.ok
    assert wait_no_tagged_processes(tag, 15.0) == []


def check_cluster_dest(dest: Path, fmt: str) -> int:
    """What a cluster run's local DEST must hold at any moment; the number of ok rows."""
    from fetchpool.state.journal import iter_journal

    if not (dest / ".fetchpool" / "plan.json").is_file():
        return 0  # killed before the split was pinned: nothing to hold yet
    cache: dict[str, Counter[str]] = {}
    ok = 0
    for record in iter_journal(dest, status=Status.OK):
        assert_has_output(dest, fmt, record, cache)
        ok += 1
    if fmt != "files":
        repeated = {k: n for k, n in all_shard_keys(dest).items() if n > 1}
        assert not repeated, f"samples in two shards: {repeated}"
    stray = [p for p in dest.rglob(".fp-*") if "tmp" not in p.parts and "parts" not in p.parts]
    assert stray == [], stray
    return ok


def test_ctrl_c_on_the_driver_stops_the_parts_and_saves_their_state(tmp_path: Path) -> None:
    with Origin(latency=0.3) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=240)
        dest = tmp_path / "dest"
        args = cli("get", str(src), "-o", str(dest), "--allow-private-networks", "-q",
                   "--cluster", "local:2", "--parts", "4", "--threads", "4")  # fmt: skip
        driver = subprocess.Popen(
            args, env=cli_env(), start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while len(origin.requests("/small/")) < 30 and time.monotonic() < deadline:
                time.sleep(0.05)
            driver.send_signal(signal.SIGINT)
            _, stderr = driver.communicate(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == 130, stderr
        from fetchpool.state.journal import iter_journal

        saved = list(iter_journal(dest))
        assert 0 < len(saved) < 240, "the parts stopped part-way and kept what they finished"
        origin.reset_counters()
        again = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=180,
                               check=False)  # fmt: skip
        assert again.returncode == 1, again.stderr
        refetched = {r.path for r in origin.requests("/small/")}
        done_before = {r.url.split("/", 3)[3] for r in saved if r.status is Status.OK}
        assert not refetched & {f"/{p}" for p in done_before}, "finished work is kept"
        assert len(list(iter_journal(dest))) == 240


def test_a_part_that_keeps_failing_ends_as_an_error_naming_the_part(
    client: Any, tmp_path: Path
) -> None:
    """Part 1 cannot write (its folder's name is taken by a file): the run ends with exit 2,
    ``part_failed``, naming part 1 and the cause; the other parts finish and are kept."""
    with Origin() as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=60)
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "part-00001").write_text("in the way")
        report = download(src, dest, cluster=client, parts=3, **LOOPBACK)
    assert report.exit_code == 2 and report.fatal_kind == "part_failed"
    assert report.fatal is not None and report.fatal.startswith("part 1: ")
    assert "part-00001" in report.fatal
    assert (dest / part_done_name(0)).exists() and (dest / part_done_name(2)).exists()
    assert not (dest / part_done_name(1)).exists()
