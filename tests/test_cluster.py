"""One download spread over a real Dask LocalCluster of worker processes (issue 12, step 1).

The cluster's workers are real processes started by distributed's nanny; the origin is the
embedded one on loopback; every result is compared, row for row, with a single-machine run of
the same input (RELIABILITY.md cases 43 and 47).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetchpool import Origin, Status, download
from fetchpool.cluster import plan as plans
from fetchpool.errors import ConfigError
from reliability_helpers import cli, cli_env

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

LOOPBACK: dict[str, Any] = {"allow_private_networks": True}


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A LocalCluster of 2 worker processes (as ``--cluster local:2`` starts one)."""
    import dask

    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
    with distributed.Client(cluster) as connected:
        yield connected
    cluster.close()


def mixed_input(origin: Origin, path: Path, count: int = 240) -> Path:
    """Images with repeated URLs, 404s and bad lines, as real lists have them."""
    lines = []
    for i in range(count):
        if i % 40 == 7:
            lines.append("not a url")
        elif i % 30 == 3:
            lines.append(origin.url(f"/status/404?n={i}"))
        else:
            lines.append(origin.image_url(i % (count * 3 // 4), small=True))
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def rows(report: Any) -> list[tuple[Any, ...]]:
    return [
        (r.position, r.url, r.status, r.error_code, r.sha256, r.bytes) for r in report.records()
    ]


def shard_keys(dest: Path) -> Counter[str]:
    keys: Counter[str] = Counter()
    for shard in dest.rglob("*.tar"):
        if ".fetchpool" in shard.parts:
            continue
        with tarfile.open(shard) as tar:
            keys.update(m.name.split(".")[0] for m in tar if m.name.endswith(".json"))
    return keys


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_a_cluster_run_equals_a_single_machine_run(client: Any, tmp_path: Path, fmt: str) -> None:
    with Origin(latency=0.02) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt")
        options = {"format": fmt, "shard_size": 20, "threads": 8, **LOOPBACK}
        single = download(src, tmp_path / "single", **options)
        spread = download(src, tmp_path / "dest", cluster=client, parts=5, **options)
    assert spread.exit_code == single.exit_code == 1  # the 404s and bad lines
    assert rows(spread) == rows(single)
    assert spread.counts == single.counts and spread.errors == single.errors
    plan = plans.load(tmp_path / "dest")  # pinned: a rerun must match it
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
        marks = {k: plans.done_file(dest, k).stat().st_mtime_ns for k in range(4)}
        plans.done_file(dest, 2).unlink()  # as if the driver died before part 2 was noted
        origin.reset_counters()
        again = download(src, dest, cluster=client, parts=4, **LOOPBACK)
        assert origin.requests("/small/") == [], "finished work is not fetched again"
        assert rows(again) == rows(first)
        assert plans.done_file(dest, 2).exists()
        for k in (0, 1, 3):  # not run again
            assert plans.done_file(dest, k).stat().st_mtime_ns == marks[k]
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


def test_a_worker_killed_mid_part_changes_nothing(client: Any, tmp_path: Path) -> None:
    """SIGKILL one worker at ~30%: Dask runs its part again elsewhere, which resumes from
    the part's journal; the merged result equals a single-machine run, with no sample twice."""
    pids = sorted(client.run(os.getpid).values())
    with Origin(latency=0.1) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=200)
        options = {"format": "webdataset", "shard_size": 10, "threads": 4, **LOOPBACK}
        killed: list[int] = []

        def kill_at_30_percent() -> None:
            deadline = time.monotonic() + 60
            while len(origin.requests("/small/")) < 45 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        killer = threading.Thread(target=kill_at_30_percent)
        killer.start()
        spread = download(src, tmp_path / "dest", cluster=client, parts=4, **options)
        killer.join()
        single = download(src, tmp_path / "single", **options)
    assert killed
    assert rows(spread) == rows(single)
    keys = shard_keys(tmp_path / "dest")
    assert set(keys.values()) == {1}, "no sample in two shards"
    assert len(keys) == single.ok
    leftover = [p for p in (tmp_path / "dest").rglob(".fp-*") if "tmp" not in p.parts]
    assert leftover == []


def test_killing_the_driver_leaves_no_process_and_the_rerun_finishes(tmp_path: Path) -> None:
    """kill -9 of `get --cluster local:2` mid-run: the local cluster's workers and their
    children go with it (case 46), and the same command then finishes the run (case 47)."""
    import uuid

    from durability_helpers import TAG_VAR, tagged_pids, wait_no_tagged_processes

    tag = uuid.uuid4().hex
    env = {**cli_env(), TAG_VAR: tag}
    with Origin(latency=0.3) as origin:
        src = mixed_input(origin, tmp_path / "urls.txt", count=160)
        dest = tmp_path / "dest"
        args = cli("get", str(src), "-o", str(dest), "--allow-private-networks", "-q",
                   "--cluster", "local:2", "--parts", "4", "--threads", "4")  # fmt: skip
        driver = subprocess.Popen(args, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while len(origin.requests("/small/")) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert driver.poll() is None and len(tagged_pids(tag)) >= 3, "workers running"
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=30)
            left = wait_no_tagged_processes(tag, 15.0)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert left == [], f"processes outlived the driver: {left}"
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180,
                               check=False)  # fmt: skip
        assert again.returncode == 1, again.stderr  # the 404s and bad lines
        single = download(src, tmp_path / "single", threads=4, **LOOPBACK)
    from fetchpool.state.journal import iter_journal

    merged = [(r.position, r.url, r.status, r.error_code, r.sha256, r.bytes)
              for r in iter_journal(dest)]  # fmt: skip
    assert merged == rows(single)
    assert wait_no_tagged_processes(tag, 15.0) == []


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
